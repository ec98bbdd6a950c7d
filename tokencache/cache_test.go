package tokencache

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is a settable time source, so no test sleeps to see an expiry.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Unix(1_700_000_000, 0)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type drops struct {
	mu sync.Mutex
	n  map[Reason]int
}

func (d *drops) add(r Reason, n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n == nil {
		d.n = map[Reason]int{}
	}
	d.n[r] += n
}

func (d *drops) get(r Reason) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n[r]
}

type fixture struct {
	c     *Cache
	clock *clock
	drops *drops
	h     *Hasher
}

func newFixture(t *testing.T, mod func(*Config)) *fixture {
	t.Helper()
	f := &fixture{clock: newClock(), drops: &drops{}}
	cfg := Config{
		Size:          100,
		TTL:           2 * time.Minute,
		NegativeTTL:   10 * time.Second,
		LookupTimeout: time.Second,
		Now:           f.clock.Now,
		OnDrop:        f.drops.add,
	}
	if mod != nil {
		mod(&cfg)
	}
	var err error
	if f.c, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	if f.h, err = NewHasher([]byte("0123456789abcdef0123456789abcdef")); err != nil {
		t.Fatal(err)
	}
	return f
}

func positive(user, device string) Answer {
	return Answer{Kind: Positive, UserID: user, DeviceID: device,
		Body: fmt.Sprintf(`{"user_id":%q,"device_id":%q}`, user, device)}
}

var negative = Answer{Kind: Negative, Body: `{"errcode":"M_UNKNOWN_TOKEN"}`}

// fill resolves key with a fetch that returns a, and fails the test if the
// fetch was not called.
func (f *fixture) fill(t *testing.T, key Key, a Answer) {
	t.Helper()
	called := false
	got, res, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
		called = true
		return a, nil
	})
	if err != nil || res != Miss || !called || got.Kind != a.Kind {
		t.Fatalf("fill: got %v, %v, %v, called=%v", got, res, err, called)
	}
}

func (f *fixture) expect(t *testing.T, key Key, want Result) {
	t.Helper()
	if _, got := f.c.Get(key); got != want {
		t.Errorf("Get: got %v, want %v", got, want)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	good := Config{Size: 1, TTL: time.Second, LookupTimeout: time.Second}
	for name, mod := range map[string]func(*Config){
		"size":          func(c *Config) { c.Size = 0 },
		"ttl":           func(c *Config) { c.TTL = 0 },
		"negative ttl":  func(c *Config) { c.NegativeTTL = -time.Second },
		"lookup budget": func(c *Config) { c.LookupTimeout = 0 },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := good
			mod(&cfg)
			if _, err := New(cfg); err == nil {
				t.Error("New accepted a bad config")
			}
		})
	}
	if _, err := New(good); err != nil {
		t.Errorf("New rejected a good config: %v", err)
	}
}

func TestHitMissNegative(t *testing.T) {
	f := newFixture(t, nil)
	alice, bogus := f.h.Key("tok-alice", Masquerade{}), f.h.Key("tok-bogus", Masquerade{})
	f.expect(t, alice, Miss)
	f.fill(t, alice, positive("@alice:x", "DEV1"))
	f.fill(t, bogus, negative)

	a, res := f.c.Get(alice)
	if res != Hit || a.UserID != "@alice:x" || a.DeviceID != "DEV1" || a.Body != `{"user_id":"@alice:x","device_id":"DEV1"}` {
		t.Errorf("hit: got %+v, %v", a, res)
	}
	f.expect(t, bogus, NegativeHit)
	if n := f.c.Len(); n != 2 {
		t.Errorf("Len: got %d, want 2", n)
	}
	// A second Resolve is answered from the cache without fetching.
	_, res, err := f.c.Resolve(t.Context(), alice, func(context.Context) (Answer, error) {
		t.Error("fetch called for a cached key")
		return Answer{}, nil
	})
	if res != Hit || err != nil {
		t.Errorf("Resolve of cached key: %v, %v", res, err)
	}
}

func TestUncacheableAndErrorsAreNotStored(t *testing.T) {
	f := newFixture(t, nil)
	key := f.h.Key("tok", Masquerade{})
	got, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
		return Answer{Kind: Uncacheable, Body: "rate limited"}, nil
	})
	if err != nil || got.Body != "rate limited" {
		t.Errorf("uncacheable answer not handed back: %+v, %v", got, err)
	}
	f.expect(t, key, Miss)

	boom := errors.New("homeserver down")
	if _, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
		return Answer{}, boom
	}); !errors.Is(err, boom) {
		t.Errorf("error not handed back: %v", err)
	}
	f.expect(t, key, Miss)
}

func TestNegativeCachingDisabled(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.NegativeTTL = 0 })
	key := f.h.Key("tok", Masquerade{})
	f.fill(t, key, negative)
	f.expect(t, key, Miss)
}

func TestExpiry(t *testing.T) {
	f := newFixture(t, nil)
	alice, bogus := f.h.Key("a", Masquerade{}), f.h.Key("b", Masquerade{})
	// The lookup takes 30s: the TTL counts from its reply, not its start.
	if _, _, err := f.c.Resolve(t.Context(), alice, func(context.Context) (Answer, error) {
		f.clock.Advance(30 * time.Second)
		return positive("@alice:x", "D"), nil
	}); err != nil {
		t.Fatal(err)
	}
	f.fill(t, bogus, negative)

	f.clock.Advance(10*time.Second - time.Nanosecond)
	f.expect(t, bogus, NegativeHit)
	f.clock.Advance(time.Nanosecond)
	f.expect(t, bogus, Miss)

	f.clock.Advance(2*time.Minute - 10*time.Second - time.Nanosecond)
	f.expect(t, alice, Hit)
	f.clock.Advance(time.Nanosecond)
	f.expect(t, alice, Miss)
	if got := f.drops.get(ReasonExpired); got != 2 {
		t.Errorf("expired drops: got %d, want 2", got)
	}
	if n := f.c.Len(); n != 0 {
		t.Errorf("expired entries still held: %d", n)
	}
}

func TestMasqueradeVariantsAreSeparate(t *testing.T) {
	f := newFixture(t, nil)
	plain := f.h.Key("as_token", Masquerade{})
	asBob := f.h.Key("as_token", Masquerade{UserID: "@bob:x"})
	asBobDev := f.h.Key("as_token", Masquerade{UserID: "@bob:x", DeviceID: "D"})
	asBobMSC := f.h.Key("as_token", Masquerade{UserID: "@bob:x", MSC3202DeviceID: "D"})
	keys := []Key{plain, asBob, asBobDev, asBobMSC}
	for i := range keys {
		for j := range i {
			if keys[i] == keys[j] {
				t.Fatalf("keys %d and %d collide", i, j)
			}
		}
	}
	f.fill(t, asBob, positive("@bob:x", ""))
	f.expect(t, plain, Miss) // a masqueraded answer is never served plain…
	f.fill(t, plain, positive("@as_bot:x", ""))
	f.expect(t, asBobDev, Miss) // …nor the reverse, nor across variants.
	if a, _ := f.c.Get(asBob); a.UserID != "@bob:x" {
		t.Errorf("variant answer: %+v", a)
	}
}

// A token's invalidation drops every positive answer for it, of every
// variant, and keeps its negative ones: a revoked or unknown token is still
// unknown, and dropping that answer would only send the next request for it
// to the homeserver (replicas on a bus would keep emptying each other's).
func TestInvalidateTokenDropsEveryPositiveVariant(t *testing.T) {
	f := newFixture(t, nil)
	plain := f.h.Key("as_token", Masquerade{})
	asBob := f.h.Key("as_token", Masquerade{UserID: "@bob:x"})
	asCarol := f.h.Key("as_token", Masquerade{UserID: "@carol:x", DeviceID: "C"})
	asEve := f.h.Key("as_token", Masquerade{UserID: "@eve:x"})
	dead := f.h.Key("dead", Masquerade{})
	other := f.h.Key("other", Masquerade{})
	f.fill(t, plain, positive("@as_bot:x", ""))
	f.fill(t, asBob, positive("@bob:x", ""))
	f.fill(t, asCarol, positive("@carol:x", "C"))
	f.fill(t, asEve, negative)
	f.fill(t, dead, negative)
	f.fill(t, other, positive("@bob:x", "PHONE"))

	if n := f.c.InvalidateToken(f.h.Token("as_token"), "logout"); n != 3 {
		t.Errorf("InvalidateToken dropped %d, want 3", n)
	}
	for _, k := range []Key{plain, asBob, asCarol} {
		f.expect(t, k, Miss)
	}
	f.expect(t, asEve, NegativeHit)
	f.expect(t, other, Hit)
	if got := f.drops.get("logout"); got != 3 {
		t.Errorf("drops counted for logout: %d", got)
	}
	if n := f.c.census(); n.variantSets != 1 || len(f.c.userKeys("@bob:x")) != 1 || len(f.c.userKeys("@carol:x")) != 0 {
		t.Errorf("indexes not cleaned: %+v, @bob:x has %d", n, len(f.c.userKeys("@bob:x")))
	}
	checkIndexes(t, f.c)

	// The same from another replica (Apply), and for the passive
	// invalidation a 401 makes: the negative answer stays and is served.
	for _, r := range []Reason{ReasonBus, ReasonUnknownToken} {
		if n := f.c.Apply(Invalidation{Scope: ScopeToken, Token: dead.Token, Reason: r}); n != 0 {
			t.Errorf("%s: dropped %d, want 0", r, n)
		}
		f.expect(t, dead, NegativeHit)
		if n := f.c.InvalidateToken(dead.Token, r); n != 0 {
			t.Errorf("%s: InvalidateToken dropped %d, want 0", r, n)
		}
		f.expect(t, dead, NegativeHit)
	}
	// Only a flush drops negative answers.
	if n := f.c.Flush("flush"); n != 3 {
		t.Errorf("Flush dropped %d, want 3", n)
	}
	f.expect(t, asEve, Miss)
	f.expect(t, dead, Miss)
	checkIndexes(t, f.c)
}

func TestInvalidateDeviceUserFlush(t *testing.T) {
	tests := []struct {
		name      string
		do        func(f *fixture) int
		dropped   int
		wantAlive []string // tokens still cached afterwards
	}{
		{"device", func(f *fixture) int { return f.c.InvalidateDevice("@alice:x", "PHONE", "device") },
			2, []string{"alice-laptop", "bob-phone", "unknown"}},
		{"user", func(f *fixture) int { return f.c.InvalidateUser("@alice:x", TokenID{}, "deactivate") },
			3, []string{"bob-phone", "unknown"}},
		{"user sparing the caller", func(f *fixture) int {
			return f.c.InvalidateUser("@alice:x", f.h.Token("alice-laptop"), "password")
		}, 2, []string{"alice-laptop", "bob-phone", "unknown"}},
		{"flush", func(f *fixture) int { return f.c.Flush("logout_all") }, 5, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			answers := map[string]Answer{
				"alice-phone":   positive("@alice:x", "PHONE"),
				"alice-phone-2": positive("@alice:x", "PHONE"), // e.g. a refreshed token
				"alice-laptop":  positive("@alice:x", "LAPTOP"),
				"bob-phone":     positive("@bob:x", "PHONE"),
				"unknown":       negative,
			}
			for tok, a := range answers {
				f.fill(t, f.h.Key(tok, Masquerade{}), a)
			}
			if n := tt.do(f); n != tt.dropped {
				t.Errorf("dropped %d, want %d", n, tt.dropped)
			}
			alive := map[string]bool{}
			for _, tok := range tt.wantAlive {
				alive[tok] = true
			}
			for tok := range answers {
				_, res := f.c.Get(f.h.Key(tok, Masquerade{}))
				if (res != Miss) != alive[tok] {
					t.Errorf("%s: got %v, want alive=%v", tok, res, alive[tok])
				}
			}
		})
	}
}

func TestSizeBoundsEntriesAndIndexes(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Size = 16 })
	for i := range 5000 {
		tok := fmt.Sprintf("tok-%d", i)
		f.fill(t, f.h.Key(tok, Masquerade{}), positive(fmt.Sprintf("@u%d:x", i), "D"))
		f.fill(t, f.h.Key(tok, Masquerade{UserID: fmt.Sprintf("@m%d:x", i)}), positive(fmt.Sprintf("@m%d:x", i), ""))
		f.fill(t, f.h.Key("bad-"+tok, Masquerade{}), negative)
	}
	n := f.c.census()
	if n.pos != 16 || n.neg != 2 {
		t.Errorf("held: pos %d neg %d", n.pos, n.neg)
	}
	if n.ringNodes != 16 || n.users != 16 || n.rings != 16 || n.variantSets > 16 {
		t.Errorf("indexes outgrew the cache: %+v", n)
	}
	checkIndexes(t, f.c)
	if got := f.drops.get(ReasonCapacity); got != 3*5000-18 {
		t.Errorf("capacity drops: got %d, want %d", got, 3*5000-18)
	}
}

func TestLimitLifetime(t *testing.T) {
	f := newFixture(t, nil)
	// Announced before the token is ever looked up (the login response)…
	early := f.h.Key("early", Masquerade{})
	f.c.LimitLifetime(early.Token, f.clock.Now().Add(30*time.Second))
	f.fill(t, early, positive("@a:x", "D"))
	// …and for a token already cached.
	late := f.h.Key("late", Masquerade{})
	f.fill(t, late, positive("@b:x", "D"))
	f.c.LimitLifetime(late.Token, f.clock.Now().Add(20*time.Second))

	f.clock.Advance(20*time.Second - time.Nanosecond)
	f.expect(t, late, Hit)
	f.clock.Advance(time.Nanosecond)
	f.expect(t, late, Miss)
	f.clock.Advance(10*time.Second - time.Nanosecond)
	f.expect(t, early, Hit)
	f.clock.Advance(time.Nanosecond)
	f.expect(t, early, Miss)

	// A deadline later than the TTL changes nothing.
	long := f.h.Key("long", Masquerade{})
	f.c.LimitLifetime(long.Token, f.clock.Now().Add(time.Hour))
	f.fill(t, long, positive("@c:x", "D"))
	f.clock.Advance(2 * time.Minute)
	f.expect(t, long, Miss)

	// A deadline already passed stores nothing.
	dead := f.h.Key("dead", Masquerade{})
	f.c.LimitLifetime(dead.Token, f.clock.Now())
	f.fill(t, dead, positive("@d:x", "D"))
	f.expect(t, dead, Miss)
}

func TestConcurrentMissesShareOneFetch(t *testing.T) {
	f := newFixture(t, nil)
	key := f.h.Key("tok", Masquerade{})
	var calls atomic.Int32
	release := make(chan struct{})
	fetch := func(context.Context) (Answer, error) {
		calls.Add(1)
		<-release
		return positive("@a:x", "D"), nil
	}
	const n = 50
	var wg sync.WaitGroup
	results := make(chan Answer, n)
	for range n {
		wg.Go(func() {
			a, _, err := f.c.Resolve(t.Context(), key, fetch)
			if err != nil {
				t.Error(err)
			}
			results <- a
		})
	}
	// Let every goroutine reach the flight before answering.
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	close(results)
	for a := range results {
		if a.UserID != "@a:x" {
			t.Errorf("a caller got %+v", a)
		}
	}
	// Some goroutines may have been scheduled after the fill and hit the
	// cache; none may have started a second fetch.
	if got := calls.Load(); got != 1 {
		t.Errorf("fetches: got %d, want 1", got)
	}
}

func TestImpatientCallerDoesNotFailOthers(t *testing.T) {
	f := newFixture(t, nil)
	key := f.h.Key("tok", Masquerade{})
	started, release := make(chan struct{}), make(chan struct{})
	fetch := func(ctx context.Context) (Answer, error) {
		close(started)
		select {
		case <-release:
			return positive("@a:x", "D"), nil
		case <-ctx.Done():
			return Answer{}, ctx.Err()
		}
	}
	impatient, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, _, err := f.c.Resolve(impatient, key, fetch)
		errc <- err
	}()
	<-started
	patient := make(chan Answer, 1)
	go func() {
		a, _, err := f.c.Resolve(t.Context(), key, fetch)
		if err != nil {
			t.Error(err)
		}
		patient <- a
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("impatient caller: got %v", err)
	}
	close(release)
	if a := <-patient; a.UserID != "@a:x" {
		t.Errorf("patient caller got %+v", a)
	}
	f.expect(t, key, Hit)
}

func TestLookupTimeoutBoundsTheFetch(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.LookupTimeout = 20 * time.Millisecond })
	key := f.h.Key("tok", Masquerade{})
	_, _, err := f.c.Resolve(t.Context(), key, func(ctx context.Context) (Answer, error) {
		<-ctx.Done()
		return Answer{}, ctx.Err()
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want deadline exceeded", err)
	}
}

// TestInvalidationDuringLookupWins is the stale-fill race: a whoami lookup
// is in flight when a logout (or device deletion, or deactivation) completes.
// The lookup may have been answered before the revocation, so its answer must
// be handed to its callers but never stored.
func TestInvalidationDuringLookupWins(t *testing.T) {
	tests := []struct {
		name       string
		invalidate func(f *fixture)
		stored     bool
	}{
		{"token", func(f *fixture) { f.c.InvalidateToken(f.h.Token("tok"), "logout") }, false},
		{"device", func(f *fixture) { f.c.InvalidateDevice("@alice:x", "PHONE", "device") }, false},
		{"user", func(f *fixture) { f.c.InvalidateUser("@alice:x", TokenID{}, "deactivate") }, false},
		{"flush", func(f *fixture) { f.c.Flush("logout_all") }, false},
		{"user sparing this token", func(f *fixture) { f.c.InvalidateUser("@alice:x", f.h.Token("tok"), "password") }, true},
		{"another token", func(f *fixture) { f.c.InvalidateToken(f.h.Token("other"), "logout") }, true},
		{"another device", func(f *fixture) { f.c.InvalidateDevice("@alice:x", "LAPTOP", "device") }, true},
		{"another user", func(f *fixture) { f.c.InvalidateUser("@bob:x", TokenID{}, "deactivate") }, true},
		{"too many to check", func(f *fixture) {
			for i := range invalidationLog + 1 {
				f.c.InvalidateToken(f.h.Token(fmt.Sprint("other", i)), "logout")
			}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			key := f.h.Key("tok", Masquerade{})
			inFlight, release := make(chan struct{}), make(chan struct{})
			done := make(chan Answer)
			go func() {
				a, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
					close(inFlight)
					<-release
					return positive("@alice:x", "PHONE"), nil
				})
				if err != nil {
					t.Error(err)
				}
				done <- a
			}()
			<-inFlight
			tt.invalidate(f)
			close(release)
			if a := <-done; a.UserID != "@alice:x" {
				t.Errorf("the lookup's own caller got %+v", a)
			}
			want := Miss
			if tt.stored {
				want = Hit
			}
			f.expect(t, key, want)
		})
	}
}

// A caller arriving after an invalidation must not join a lookup that began
// before it: that lookup's answer may predate the revocation.
func TestCallerAfterInvalidationStartsItsOwnLookup(t *testing.T) {
	f := newFixture(t, nil)
	key := f.h.Key("tok", Masquerade{})
	inFlight, release := make(chan struct{}), make(chan struct{})
	first := make(chan Answer)
	go func() {
		a, _, _ := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
			close(inFlight)
			<-release
			return positive("@alice:x", "PHONE"), nil
		})
		first <- a
	}()
	<-inFlight
	f.c.InvalidateToken(key.Token, "logout")
	a, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
		return negative, nil
	})
	if err != nil || a.Kind != Negative {
		t.Errorf("late caller: got %+v, %v; want the homeserver's new answer", a, err)
	}
	close(release)
	<-first
	f.expect(t, key, NegativeHit)
}

// TestConcurrentUse runs every operation at once so -race can see them.
func TestConcurrentUse(t *testing.T) {
	f := newFixture(t, func(c *Config) { c.Size = 64; c.Now = nil })
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				tok := fmt.Sprintf("tok-%d", (g*31+i)%100)
				user := fmt.Sprintf("@u%d:x", i%10)
				key := f.h.Key(tok, Masquerade{})
				switch i % 7 {
				case 0:
					f.c.InvalidateToken(key.Token, "logout")
				case 1:
					f.c.InvalidateDevice(user, "D", "device")
				case 2:
					f.c.InvalidateUser(user, TokenID{}, "deactivate")
				case 3:
					f.c.LimitLifetime(key.Token, time.Now().Add(time.Minute))
				default:
					_, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
						return positive(user, "D"), nil
					})
					if err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	checkIndexes(t, f.c)
	f.c.Flush("test")
	if n := f.c.census(); n != (census{}) {
		t.Errorf("not empty after flush: %+v", n)
	}
	checkIndexes(t, f.c)
}

func TestOnInvalidateAndApply(t *testing.T) {
	var seen []Invalidation
	f := newFixture(t, func(c *Config) { c.OnInvalidate = func(inv Invalidation) { seen = append(seen, inv) } })
	alice := f.h.Key("alice", Masquerade{})
	bob := f.h.Key("bob", Masquerade{})
	f.fill(t, alice, positive("@alice:x", "PHONE"))
	f.fill(t, bob, positive("@bob:x", "PHONE"))

	f.c.InvalidateToken(alice.Token, "logout")
	f.c.InvalidateDevice("@a:x", "D", "device")
	f.c.InvalidateUser("@a:x", bob.Token, "password")
	f.c.Flush("test")
	want := []Invalidation{
		{Scope: ScopeToken, Token: alice.Token, Reason: "logout"},
		{Scope: ScopeDevice, UserID: "@a:x", DeviceID: "D", Reason: "device"},
		{Scope: ScopeUser, UserID: "@a:x", Token: bob.Token, Reason: "password"},
		{Scope: ScopeAll, Reason: "test"},
	}
	if fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("told\n %v\nwant\n %v", seen, want)
	}

	// Apply drops like the methods do, without telling anyone.
	seen = nil
	f.fill(t, bob, positive("@bob:x", "PHONE"))
	if n := f.c.Apply(Invalidation{Scope: ScopeDevice, UserID: "@bob:x", DeviceID: "PHONE", Reason: "remote"}); n != 1 {
		t.Errorf("Apply dropped %d", n)
	}
	f.expect(t, bob, Miss)
	if seen != nil || f.drops.get("remote") != 1 {
		t.Errorf("Apply told %v, drops %d", seen, f.drops.get("remote"))
	}
}

func TestSetMaxTTL(t *testing.T) {
	f := newFixture(t, nil)
	f.c.SetMaxTTL(5 * time.Second)
	capped := f.h.Key("capped", Masquerade{})
	f.fill(t, capped, positive("@a:x", "D"))
	f.c.SetMaxTTL(0)
	normal := f.h.Key("normal", Masquerade{})
	f.fill(t, normal, positive("@b:x", "D"))
	f.clock.Advance(5 * time.Second)
	f.expect(t, capped, Miss)
	f.expect(t, normal, Hit)
}

// TestInvalidateDevicesExcept: a user's devices but the kept ones go (MAS's
// sync_devices); device-less answers (an appservice masquerading as the
// user) and other users stay, and a lookup in flight for a dropped device
// does not store its answer.
func TestInvalidateDevicesExcept(t *testing.T) {
	f := newFixture(t, nil)
	keys := map[string]Key{}
	for _, d := range []string{"A", "B", "C", ""} {
		keys[d] = f.h.Key("tok-"+d, Masquerade{})
		f.fill(t, keys[d], positive("@u:hs", d))
	}
	bob := f.h.Key("tok-bob", Masquerade{})
	f.fill(t, bob, positive("@bob:hs", "A"))

	// A lookup for device C starts before the invalidation and ends after.
	started, finish := make(chan struct{}), make(chan struct{})
	late := f.h.Key("tok-late", Masquerade{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _, _ = f.c.Resolve(context.Background(), late, func(context.Context) (Answer, error) {
			close(started)
			<-finish
			return positive("@u:hs", "C"), nil
		})
	}()
	<-started
	if n := f.c.InvalidateDevicesExcept("@u:hs", []string{"A"}, "device"); n != 2 {
		t.Errorf("dropped %d, want 2 (B and C)", n)
	}
	close(finish)
	<-done
	f.expect(t, keys["A"], Hit)
	f.expect(t, keys["B"], Miss)
	f.expect(t, keys["C"], Miss)
	f.expect(t, keys[""], Hit)
	f.expect(t, bob, Hit)
	f.expect(t, late, Miss)
}

// TestEscapedIDsAreCached: Synapse escapes non-ASCII in its JSON
// ("device_id":"\u00e9"), so the IDs are not in the body verbatim. Such an
// answer must still be cached (a client picks its device ID: otherwise any
// client could keep its token out of the cache), replayed byte for byte, and
// dropped by user and device like any other.
func TestEscapedIDsAreCached(t *testing.T) {
	for _, tt := range []struct{ name, user, device, body string }{
		{"device", "@u:x", "é", `{"user_id":"@u:x","device_id":"\u00e9"}`},
		{"user and device", `@"q":x`, `a\b`, `{"user_id":"@\"q\":x","device_id":"a\\b"}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			key := f.h.Key("tok", Masquerade{})
			f.fill(t, key, Answer{Kind: Positive, UserID: tt.user, DeviceID: tt.device, Body: tt.body})
			got, res := f.c.Get(key)
			if res != Hit || got.Body != tt.body || got.UserID != tt.user || got.DeviceID != tt.device {
				t.Fatalf("Get = %+v, %v; want a hit replaying %s for %q/%q", got, res, tt.body, tt.user, tt.device)
			}
			if n := f.c.InvalidateDevice(tt.user, tt.device, "device"); n != 1 {
				t.Fatalf("InvalidateDevice dropped %d, want 1", n)
			}
			if _, res := f.c.Get(key); res != Miss {
				t.Fatalf("after InvalidateDevice: %v", res)
			}
		})
	}
}
