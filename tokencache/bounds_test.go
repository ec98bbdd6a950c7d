package tokencache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func TestBindSeparatesClients(t *testing.T) {
	f := newFixture(t, nil)
	plain := f.h.Key("as_token", Masquerade{})
	asBob := f.h.Key("as_token", Masquerade{UserID: "@bob:x"})
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	keys := map[string]Key{
		"plain": plain, "as bob": asBob,
		"plain@a": f.h.Bind(plain, a), "plain@b": f.h.Bind(plain, b),
		"bob@a": f.h.Bind(asBob, a), "bob@b": f.h.Bind(asBob, b),
		"plain@v6":   f.h.Bind(plain, netip.MustParseAddr("2001:db8::1")),
		"plain@none": f.h.Bind(plain, netip.Addr{}),
	}
	seen := map[Key]string{}
	for name, k := range keys {
		if k.Token != plain.Token {
			t.Errorf("%s: token changed", name)
		}
		if k.Variant == 0 && name != "plain" {
			t.Errorf("%s: variant 0 is the plain key's", name)
		}
		if other, dup := seen[k]; dup {
			t.Errorf("%s and %s share a key", name, other)
		}
		seen[k] = name
	}
	if f.h.Bind(plain, a) != keys["plain@a"] {
		t.Error("Bind is not deterministic")
	}
	other, err := NewHasher([]byte("another hash key, 32 bytes long."))
	if err != nil {
		t.Fatal(err)
	}
	if other.Bind(plain, a).Variant == keys["plain@a"].Variant {
		t.Error("Bind is not keyed")
	}
	if !raceEnabled {
		if n := testing.AllocsPerRun(100, func() { f.h.Bind(plain, a) }); n != 0 {
			t.Errorf("Bind allocates %v times", n)
		}
	}
}

// An answer marked Bound is served only under the bound key it was learned
// for; an unbound one to everyone. Token invalidation drops both.
func TestResolveBoundStoresWhereTheAnswerHolds(t *testing.T) {
	f := newFixture(t, nil)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	fenced := f.h.Key("fenced", Masquerade{})
	user := f.h.Key("user", Masquerade{})
	resolve := func(key Key, addr netip.Addr, ans Answer) (Answer, Result) {
		t.Helper()
		got, res, err := f.c.ResolveBound(t.Context(), key, f.h.Bind(key, addr), func(context.Context) (Answer, error) {
			return ans, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got, res
	}
	bot := positive("@fenced-bot:x", "")
	bot.Bound = true
	unknown := negative
	unknown.Bound = true

	if _, res := resolve(fenced, a, bot); res != Miss {
		t.Fatalf("first lookup: %v", res)
	}
	f.expect(t, fenced, Miss) // not under the shared key
	if got, res := resolve(fenced, a, unknown); res != Hit || got.UserID != "@fenced-bot:x" {
		t.Errorf("same client: %v %+v", res, got)
	}
	if got, res := resolve(fenced, b, unknown); res != Miss || got.Kind != Negative {
		t.Errorf("other client was served the first's answer: %v %+v", res, got)
	}
	if got, res := resolve(fenced, b, bot); res != NegativeHit || got.Kind != Negative {
		t.Errorf("other client's own answer: %v %+v", res, got)
	}
	f.expect(t, f.h.Bind(fenced, a), Hit)

	// An unbound answer is shared: found from any client.
	resolve(user, a, positive("@u:x", "D"))
	if _, res := resolve(user, b, negative); res != Hit {
		t.Errorf("shared answer not shared: %v", res)
	}

	// The token's invalidation drops its bound positive answer; the bound
	// negative one stays (see Scope).
	if n := f.c.InvalidateToken(fenced.Token, "logout"); n != 1 {
		t.Errorf("InvalidateToken dropped %d, want the bound positive answer", n)
	}
	f.expect(t, f.h.Bind(fenced, a), Miss)
	f.expect(t, f.h.Bind(fenced, b), NegativeHit)
	f.expect(t, user, Hit)
}

// Concurrent misses of one key from two clients do not share a lookup: its
// answer may be bound to the client that made it.
func TestResolveBoundFlightsPerClient(t *testing.T) {
	f := newFixture(t, nil)
	key := f.h.Key("fenced", Masquerade{})
	started := [2]chan struct{}{make(chan struct{}), make(chan struct{})}
	answers := [2]Answer{positive("@fenced-bot:x", ""), negative}
	answers[0].Bound, answers[1].Bound = true, true
	var got [2]Answer
	var wg sync.WaitGroup
	for i, addr := range []string{"192.0.2.1", "192.0.2.2"} {
		wg.Go(func() {
			a, _, err := f.c.ResolveBound(t.Context(), key, f.h.Bind(key, netip.MustParseAddr(addr)),
				func(context.Context) (Answer, error) {
					close(started[i])
					// Both lookups must be in flight at once: with one
					// shared flight the other would never start.
					select {
					case <-started[1-i]:
					case <-time.After(10 * time.Second):
						t.Errorf("client %d: the other client's lookup never started", i)
					}
					return answers[i], nil
				})
			if err != nil {
				t.Error(err)
			}
			got[i] = a
		})
	}
	wg.Wait()
	for i := range got {
		if got[i].Kind != answers[i].Kind {
			t.Errorf("client %d got %+v, want its own answer %+v", i, got[i], answers[i])
		}
	}
}

// fillDirect stores a under key as a lookup starting now would.
func fillDirect(c *Cache, key Key, a Answer) { c.fill(key, c.seqNow(), a) }

// Dropping a token's many variants, or a user's many tokens, costs index
// work linear in what is dropped (slices with linear removal made it
// quadratic).
func TestInvalidationIndexWorkIsLinear(t *testing.T) {
	const n = 20_000
	for _, tc := range []struct {
		name string
		fill func(f *fixture, i int)
		drop func(f *fixture) int
	}{
		{"token with many variants", func(f *fixture, i int) {
			u := fmt.Sprintf("@bridge_%d:x", i)
			fillDirect(f.c, f.h.Key("bridge", Masquerade{UserID: u}), positive(u, ""))
		}, func(f *fixture) int { return f.c.InvalidateToken(f.h.Token("bridge"), "logout") }},
		{"user with many devices", func(f *fixture, i int) {
			fillDirect(f.c, f.h.Key(fmt.Sprintf("tok%d", i), Masquerade{}), positive("@bot:x", fmt.Sprintf("D%d", i)))
		}, func(f *fixture) int { return f.c.InvalidateUser("@bot:x", TokenID{}, "deactivate") }},
		{"device of a user with many", func(f *fixture, i int) {
			fillDirect(f.c, f.h.Key(fmt.Sprintf("tok%d", i), Masquerade{}), positive("@bot:x", fmt.Sprintf("D%d", i%2)))
		}, func(f *fixture) int { return f.c.InvalidateDevice("@bot:x", "D1", "device") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, func(c *Config) { c.Size = 2 * n })
			for i := range n {
				tc.fill(f, i)
			}
			before := f.c.indexSteps()
			dropped := tc.drop(f)
			steps := f.c.indexSteps() - before
			if dropped < n/2 {
				t.Fatalf("dropped %d", dropped)
			}
			// Each dropped key is taken out of at most two indexes, at a
			// constant cost each.
			if limit := uint64(4 * dropped); steps > limit {
				t.Errorf("dropping %d keys took %d index steps, want at most %d", dropped, steps, limit)
			}
			checkIndexes(t, f.c)
		})
	}
}

// A large invalidation lets other requests in between batches of at most
// invalidationBatch keys, and while it runs nothing it covers is served or
// stored.
func TestLargeInvalidationRunsInBatches(t *testing.T) {
	const n = 100_000
	var drops struct {
		sync.Mutex
		calls, most int
	}
	f := newFixture(t, func(c *Config) {
		c.Size = n + 10
		c.OnDrop = func(r Reason, k int) {
			if r == "logout" {
				drops.Lock()
				drops.calls++
				drops.most = max(drops.most, k)
				drops.Unlock()
			}
		}
	})
	keys := make([]Key, n)
	for i := range keys {
		u := fmt.Sprintf("@bridge_%d:x", i)
		keys[i] = f.h.Key("bridge", Masquerade{UserID: u})
		fillDirect(f.c, keys[i], positive(u, ""))
	}
	other := f.h.Key("other", Masquerade{})
	fillDirect(f.c, other, positive("@bridge_1:x", "PHONE"))
	late := f.h.Key("late", Masquerade{})

	batches, coveredSeen := 0, 0
	f.c.betweenBatches = func() {
		batches++
		// Another goroutine's Get completes while the invalidation runs.
		done := make(chan Result)
		go func() {
			_, r := f.c.Get(other)
			done <- r
		}()
		if r := <-done; r != Hit {
			t.Errorf("batch %d: unrelated Get: %v", batches, r)
		}
		// A variant not dropped yet is not served, nor stored again.
		var left Key
		for _, k := range keys {
			if f.c.holds(k) {
				left = k
				break
			}
		}
		if left != (Key{}) {
			coveredSeen++
			f.expect(t, left, Miss)
		}
		fillDirect(f.c, keys[0], positive("@bridge_0:x", ""))
		f.expect(t, keys[0], Miss)
		// Answers it does not cover are stored and served as usual.
		fillDirect(f.c, late, positive("@late:x", "D"))
		f.expect(t, late, Hit)
	}
	if got := f.c.InvalidateToken(keys[0].Token, "logout"); got != n {
		t.Errorf("dropped %d, want %d", got, n)
	}
	if want := n/invalidationBatch - 1; batches < want {
		t.Errorf("%d lock releases, want at least %d", batches, want)
	}
	if coveredSeen < batches-1 {
		t.Errorf("only %d of %d pauses had variants left to check", coveredSeen, batches)
	}
	if drops.most > invalidationBatch+1 {
		t.Errorf("one lock hold dropped %d keys, want at most %d", drops.most, invalidationBatch+1)
	}
	for _, k := range keys {
		if _, r := f.c.Get(k); r != Miss {
			t.Fatal("a variant survived")
		}
	}
	f.expect(t, other, Hit)
	f.expect(t, late, Hit)
	// Over: the token's answers are stored again.
	fillDirect(f.c, keys[0], positive("@bridge_0:x", ""))
	f.expect(t, keys[0], Hit)
	checkIndexes(t, f.c)
}

// InvalidateUser spares the given token's answers even when the user's set
// is large, and they stay indexed.
func TestInvalidateLargeUserSparesToken(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Size = 5000 })
	const n = 3 * invalidationBatch
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = f.h.Key(fmt.Sprintf("tok%d", i), Masquerade{})
		fillDirect(f.c, keys[i], positive("@bot:x", fmt.Sprintf("D%d", i)))
	}
	spared := keys[7]
	if got := f.c.InvalidateUser("@bot:x", spared.Token, "password"); got != n-1 {
		t.Errorf("dropped %d, want %d", got, n-1)
	}
	f.expect(t, spared, Hit)
	checkIndexes(t, f.c)
	if got := f.c.InvalidateUser("@bot:x", TokenID{}, "deactivate"); got != 1 {
		t.Errorf("second invalidation dropped %d, want the spared one", got)
	}
	checkIndexes(t, f.c)
}

// Random fills, expiries, evictions and invalidations of sets that grow
// past indexSmall and shrink again keep the indexes exact.
func TestIndexesStayExact(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Size = 300 })
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20_000 {
		user := fmt.Sprintf("@u%d:x", rng.IntN(4))
		tok := fmt.Sprintf("tok%d", rng.IntN(8))
		var m Masquerade
		if rng.IntN(2) == 0 {
			m.UserID = fmt.Sprintf("@m%d:x", rng.IntN(200))
			user = m.UserID
		}
		key := f.h.Key(tok, m)
		switch op := rng.IntN(20); {
		case op < 12:
			fillDirect(f.c, key, positive(user, fmt.Sprintf("D%d", rng.IntN(3))))
		case op < 14:
			fillDirect(f.c, key, negative)
		case op < 15:
			fillDirect(f.c, f.h.Bind(key, netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(4))})), positive(user, ""))
		case op < 16:
			f.c.InvalidateToken(key.Token, "logout")
		case op < 17:
			f.c.InvalidateDevice(user, fmt.Sprintf("D%d", rng.IntN(3)), "device")
		case op < 18:
			f.c.InvalidateUser(user, f.h.Token(fmt.Sprintf("tok%d", rng.IntN(8))), "password")
		case op < 19:
			f.c.LimitLifetime(key.Token, f.clock.Now().Add(time.Duration(rng.IntN(60))*time.Second))
		default:
			f.clock.Advance(time.Duration(rng.IntN(10)) * time.Second)
			f.c.Get(key)
		}
		if i%1000 == 0 {
			checkIndexes(t, f.c)
		}
	}
	checkIndexes(t, f.c)
}

// A batched invalidation walks a set that changes between its batches:
// answers it does not cover keep coming in (and going out) meanwhile. It
// still drops exactly what it covers, and the indexes stay exact.
func TestBatchedInvalidationWhileTheSetChanges(t *testing.T) {
	const n = 5 * invalidationBatch
	f := newFixture(t, func(c *Config) { c.Size = 3 * n })
	for i := range n {
		fillDirect(f.c, f.h.Key(fmt.Sprintf("tok%d", i), Masquerade{}), positive("@bot:x", fmt.Sprintf("D%d", i%2)))
	}
	added := 0
	f.c.betweenBatches = func() {
		// New devices of the same user, and some of the old D0 ones leaving.
		for range 300 {
			fillDirect(f.c, f.h.Key(fmt.Sprintf("new%d", added), Masquerade{}), positive("@bot:x", "D2"))
			added++
		}
		for i := added; i < added+50 && 2*i < n; i++ {
			f.c.InvalidateToken(f.h.Token(fmt.Sprintf("tok%d", 2*i)), "logout")
		}
	}
	if got := f.c.InvalidateDevice("@bot:x", "D1", "device"); got != n/2 {
		t.Errorf("dropped %d, want the %d D1 answers", got, n/2)
	}
	if added == 0 {
		t.Fatal("the invalidation never paused")
	}
	for i := range n {
		_, r := f.c.Get(f.h.Key(fmt.Sprintf("tok%d", i), Masquerade{}))
		if i%2 == 1 && r != Miss {
			t.Fatalf("tok%d (D1) survived", i)
		}
	}
	for i := range added {
		if _, r := f.c.Get(f.h.Key(fmt.Sprintf("new%d", i), Masquerade{})); r != Hit {
			t.Fatalf("new%d (D2) was dropped", i)
		}
	}
	checkIndexes(t, f.c)
}
