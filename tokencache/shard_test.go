package tokencache

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"
	"unsafe"
)

// shardFixture is a fixture whose cache has at most shards shards and
// hashes user IDs with userHash (nil: the default).
func shardFixture(t *testing.T, shards int, userHash func(string) uint64, mod func(*Config)) *fixture {
	t.Helper()
	f := newFixture(t, mod)
	cfg := Config{Size: f.c.size, TTL: f.c.ttl, NegativeTTL: f.c.negTTL, LookupTimeout: f.c.lookupTimeout,
		Now: f.clock.Now, OnDrop: f.drops.add, OnInvalidate: f.c.onInvalidate}
	var err error
	if f.c, err = newCache(cfg, shards, userHash); err != nil {
		t.Fatal(err)
	}
	if len(f.c.shards) != shards {
		t.Fatalf("%d shards, want %d", len(f.c.shards), shards)
	}
	return f
}

// keysIn returns n plain keys of tokens prefix0, prefix1… that fall in
// shard i.
func keysIn(f *fixture, i int, prefix string, n int) ([]Key, []string) {
	var keys []Key
	var tokens []string
	for j := 0; len(keys) < n; j++ {
		tok := fmt.Sprint(prefix, j)
		if k := f.h.Key(tok, Masquerade{}); f.c.shardOf(k) == &f.c.shards[i] {
			keys, tokens = append(keys, k), append(tokens, tok)
		}
	}
	return keys, tokens
}

func TestShardCount(t *testing.T) {
	for _, tc := range []struct{ size, want int }{
		{1, 1}, {16, 2}, {100, 8}, {128, 16}, {1_000_000, 16},
	} {
		c, err := New(Config{Size: tc.size, TTL: time.Minute, LookupTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if len(c.shards) != tc.want {
			t.Errorf("Size %d: %d shards, want %d", tc.size, len(c.shards), tc.want)
		}
	}
	if _, err := newCache(Config{Size: 1, TTL: time.Minute, LookupTimeout: time.Second}, 3, nil); err == nil {
		t.Error("newCache accepted 3 shards")
	}
}

// A lookup needs only its key's shard: while one shard's lock is held (a
// long invalidation batch, a slow OnDrop), lookups, fills and evictions in
// the others go on.
func TestShardsAreIndependent(t *testing.T) {
	f := shardFixture(t, 4, nil, func(c *Config) { c.Size = 64 })
	busy, _ := keysIn(f, 0, "busy", 1)
	free, _ := keysIn(f, 1, "free", 70)
	fillDirect(f.c, busy[0], positive("@busy:x", "D"))
	s0 := &f.c.shards[0]

	s0.mu.Lock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		// More fills than Size: shard 1 evicts its own answers.
		for i, k := range free {
			fillDirect(f.c, k, positive(fmt.Sprintf("@free%d:x", i), "D"))
		}
		for _, k := range free[len(free)-8:] {
			if _, r := f.c.Get(k); r != Hit {
				t.Errorf("recent key in shard 1: %v", r)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("shard 1 waited for shard 0's lock")
	}
	if s0.pos.n != 1 || s0.keys != 1 {
		t.Errorf("shard 0 changed while its lock was held: %d answers", s0.pos.n)
	}
	s0.mu.Unlock()
	f.expect(t, busy[0], Hit)
	if n := f.c.census(); n.pos != 64 {
		t.Errorf("held %d, want Size (64)", n.pos)
	}
	checkIndexes(t, f.c)
}

// A user's answers fall in any shard; their rings together are the user's
// index: device and user invalidations find them all, and only them.
func TestUserRingsAcrossShards(t *testing.T) {
	f := shardFixture(t, 16, nil, func(c *Config) { c.Size = 1000 })
	var alice, bob []Key
	for i := range 200 {
		k := f.h.Key(fmt.Sprint("alice", i), Masquerade{})
		fillDirect(f.c, k, positive("@alice:x", fmt.Sprint("D", i%4)))
		alice = append(alice, k)
		k = f.h.Key(fmt.Sprint("bob", i), Masquerade{})
		fillDirect(f.c, k, positive("@bob:x", fmt.Sprint("D", i%4)))
		bob = append(bob, k)
	}
	shards := map[*shard]bool{}
	for _, k := range alice {
		shards[f.c.shardOf(k)] = true
	}
	if len(shards) != 16 {
		t.Fatalf("alice's 200 answers fell in %d shards", len(shards))
	}
	if got := len(f.c.userKeys("@alice:x")); got != 200 {
		t.Errorf("alice's rings hold %d, want 200", got)
	}
	if n := f.c.InvalidateDevice("@alice:x", "D1", "device"); n != 50 {
		t.Errorf("InvalidateDevice dropped %d, want 50", n)
	}
	if n := f.c.InvalidateDevicesExcept("@alice:x", []string{"D0"}, "sync"); n != 100 {
		t.Errorf("InvalidateDevicesExcept dropped %d, want 100", n)
	}
	for i, k := range alice {
		want := Miss
		if i%4 == 0 {
			want = Hit
		}
		f.expect(t, k, want)
	}
	if n := f.c.InvalidateUser("@alice:x", alice[4].Token, "password"); n != 49 {
		t.Errorf("InvalidateUser dropped %d, want 49", n)
	}
	f.expect(t, alice[4], Hit)
	for _, k := range bob {
		f.expect(t, k, Hit)
	}
	checkIndexes(t, f.c)
}

// Users whose IDs hash alike share rings; every walk compares the user ID,
// so an invalidation drops its own user's answers and no other's.
func TestUserHashCollisions(t *testing.T) {
	for _, shards := range []int{1, 4} {
		t.Run(fmt.Sprint(shards, " shards"), func(t *testing.T) {
			f := shardFixture(t, shards, func(string) uint64 { return 42 }, func(c *Config) { c.Size = 200 })
			keys := map[string][]Key{}
			for i := range 120 {
				user := fmt.Sprintf("@u%d:x", i%6)
				k := f.h.Key(fmt.Sprint("tok", i), Masquerade{})
				fillDirect(f.c, k, positive(user, fmt.Sprint("D", (i/6)%2)))
				keys[user] = append(keys[user], k)
			}
			if n := f.c.census(); n.rings != shards || n.users != 6 {
				t.Fatalf("%+v: want one ring per shard, 6 users", n)
			}
			if got := len(f.c.userKeys("@u1:x")); got != 20 {
				t.Errorf("@u1:x: %d keys through the rings, want 20", got)
			}
			if n := f.c.InvalidateUser("@u1:x", TokenID{}, "deactivate"); n != 20 {
				t.Errorf("InvalidateUser dropped %d, want 20", n)
			}
			if n := f.c.InvalidateDevice("@u2:x", "D1", "device"); n != 10 {
				t.Errorf("InvalidateDevice dropped %d, want 10", n)
			}
			for user, ks := range keys {
				for i, k := range ks {
					want := Hit
					if user == "@u1:x" || user == "@u2:x" && i%2 == 1 {
						want = Miss
					}
					f.expect(t, k, want)
				}
			}
			checkIndexes(t, f.c)
		})
	}
}

// Eviction is CLOCK: an answer read since the hand last passed gets a
// second chance, one not read goes first.
func TestEvictionSparesWhatWasRead(t *testing.T) {
	f := shardFixture(t, 1, nil, func(c *Config) { c.Size = 8 })
	keys := make([]Key, 10)
	for i := range keys {
		keys[i] = f.h.Key(fmt.Sprint("tok", i), Masquerade{})
	}
	for _, k := range keys[:8] {
		fillDirect(f.c, k, positive("@u:x", "D"))
	}
	f.expect(t, keys[0], Hit) // read: the oldest, but spared
	fillDirect(f.c, keys[8], positive("@u:x", "D"))
	f.expect(t, keys[1], Miss) // the oldest not read
	f.expect(t, keys[0], Hit)
	fillDirect(f.c, keys[9], positive("@u:x", "D"))
	f.expect(t, keys[2], Miss)
	if got := f.drops.get(ReasonCapacity); got != 2 {
		t.Errorf("capacity drops: %d, want 2", got)
	}
	if got := len(f.c.userKeys("@u:x")); got != 8 {
		t.Errorf("ring holds %d, want the 8 held", got)
	}
	checkIndexes(t, f.c)
}

// The bounds are the whole cache's: a full cache storing into a shard
// that holds no answer of the kind evicts from another shard.
func TestFullCacheEvictsFromAnotherShard(t *testing.T) {
	f := shardFixture(t, 2, nil, func(c *Config) { c.Size = 16 }) // 2 negative answers
	in0, _ := keysIn(f, 0, "zero", 2)
	in1, _ := keysIn(f, 1, "one", 1)
	for _, k := range in0 {
		fillDirect(f.c, k, negative)
	}
	fillDirect(f.c, in1[0], negative)
	f.expect(t, in1[0], NegativeHit)
	if n := f.c.census(); n.neg != 2 {
		t.Errorf("held %d negative answers, want 2", n.neg)
	}
	if got := f.drops.get(ReasonCapacity); got != 1 {
		t.Errorf("capacity drops: %d, want 1", got)
	}
	checkIndexes(t, f.c)

	// Shard 0 holds both negative answers again, shard 1 none; store
	// into shard 1 while shard 0 is locked. There is no room to make:
	// nothing is stored, and nothing counted.
	s1 := f.c.shardOf(in1[0]) // (an invalidation of its token would keep it: see Scope)
	s1.mu.Lock()
	s1.remove(s1.get(in1[0]))
	s1.mu.Unlock()
	fillDirect(f.c, in0[0], negative)
	fillDirect(f.c, in0[1], negative)
	var masq Key
	for i := 0; ; i++ {
		masq = f.h.Key("one0", Masquerade{UserID: fmt.Sprintf("@m%d:x", i)})
		if f.c.shardOf(masq) == &f.c.shards[1] {
			break
		}
	}
	f.c.shards[0].mu.Lock()
	fillDirect(f.c, masq, negative)
	f.c.shards[0].mu.Unlock()
	f.expect(t, masq, Miss)
	f.expect(t, in0[0], NegativeHit)
	f.expect(t, in0[1], NegativeHit)
	checkIndexes(t, f.c)
}

// Random fills, reads, expiries, evictions and invalidations on a small
// sharded cache keep every shard's table, lists, rings and indexes exact.
func TestEvictionKeepsRingsExact(t *testing.T) {
	f := shardFixture(t, 4, func(u string) uint64 { return uint64(len(u) % 3) }, func(c *Config) { c.Size = 40 })
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 20_000 {
		user := fmt.Sprintf("@u%d:x", rng.IntN(12))
		key := f.h.Key(fmt.Sprint("tok", rng.IntN(120)), Masquerade{})
		if rng.IntN(4) == 0 {
			key = f.h.Key(fmt.Sprint("tok", rng.IntN(120)), Masquerade{UserID: user})
		}
		switch op := rng.IntN(20); {
		case op < 10:
			fillDirect(f.c, key, positive(user, fmt.Sprint("D", rng.IntN(3))))
		case op < 12:
			fillDirect(f.c, key, negative)
		case op < 16:
			f.c.Get(key)
		case op < 17:
			f.c.InvalidateToken(key.Token, "logout")
		case op < 18:
			f.c.InvalidateDevice(user, fmt.Sprint("D", rng.IntN(3)), "device")
		case op < 19:
			f.c.InvalidateUser(user, TokenID{}, "deactivate")
		default:
			f.clock.Advance(time.Duration(rng.IntN(20)) * time.Second)
		}
		if i%500 == 0 {
			checkIndexes(t, f.c)
		}
	}
	checkIndexes(t, f.c)
}

// A user's walk paused between batches resumes correctly when the node it
// was about to visit is removed meanwhile (by another invalidation or an
// eviction) and new answers for the user arrive.
func TestPausedUserWalkSurvivesRemovals(t *testing.T) {
	const n = 3 * invalidationBatch
	f := shardFixture(t, 1, nil, func(c *Config) { c.Size = 2 * n })
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = f.h.Key(fmt.Sprint("tok", i), Masquerade{})
		fillDirect(f.c, keys[i], positive("@bot:x", fmt.Sprint("D", i%2)))
	}
	index := map[Key]int{}
	for i, k := range keys {
		index[k] = i
	}
	s := &f.c.shards[0]
	pauses := 0
	removed := map[Key]bool{}
	f.c.betweenBatches = func() {
		pauses++
		// The node the walk resumes at goes (whatever its device), and
		// so does the one after it, if they are of the first fill.
		for range 2 {
			s.mu.Lock()
			if len(s.cursors) != 1 {
				s.mu.Unlock()
				t.Fatalf("pause %d: %d walks paused, want 1", pauses, len(s.cursors))
			}
			var next Key
			if at := *s.cursors[0]; at != 0 {
				next = s.at(at).key
			}
			s.mu.Unlock()
			if _, ok := index[next]; !ok {
				break
			}
			f.c.InvalidateToken(next.Token, "logout")
			removed[next] = true
		}
		fillDirect(f.c, f.h.Key(fmt.Sprint("new", pauses), Masquerade{}), positive("@bot:x", "D2"))
	}
	dropped := f.c.InvalidateDevice("@bot:x", "D1", "device")
	if pauses == 0 || len(removed) == 0 {
		t.Fatalf("%d pauses, %d nodes removed under the walk", pauses, len(removed))
	}
	left := 0
	for i, k := range keys {
		_, r := f.c.Get(k)
		switch {
		case r == Hit && i%2 == 1:
			t.Errorf("tok%d (D1) survived", i)
		case r == Hit:
			left++
		case i%2 == 0 && !removed[k]:
			t.Errorf("tok%d (D0) was dropped", i)
		}
	}
	if dropped+len(removed)+left != n {
		t.Errorf("dropped %d, removed %d, left %d: want %d in all", dropped, len(removed), left, n)
	}
	for i := 1; i <= pauses; i++ {
		f.expect(t, f.h.Key(fmt.Sprint("new", i), Masquerade{}), Hit)
	}
	checkIndexes(t, f.c)
}

// Hits, fills, bound and masqueraded keys, expiries, evictions and every
// kind of invalidation from many goroutines at once (for -race), then a
// check that every shard's structures agree and the bounds held.
func TestConcurrentStress(t *testing.T) {
	f := shardFixture(t, 16, nil, func(c *Config) { c.Size = 400 })
	addr := netip.MustParseAddr("192.0.2.1")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 99))
			for range 3000 {
				user := fmt.Sprintf("@u%d:x", rng.IntN(30))
				tok := fmt.Sprint("tok", rng.IntN(600))
				key := f.h.Key(tok, Masquerade{})
				switch rng.IntN(10) {
				case 0:
					key = f.h.Key(tok, Masquerade{UserID: user})
				case 1:
					key = f.h.Bind(key, addr)
				}
				switch op := rng.IntN(100); {
				case op < 70:
					a := positive(user, fmt.Sprint("D", rng.IntN(3)))
					if rng.IntN(10) == 0 {
						a = negative
					}
					_, _, err := f.c.Resolve(t.Context(), key, func(context.Context) (Answer, error) {
						return a, nil
					})
					if err != nil {
						t.Error(err)
						return
					}
				case op < 85:
					f.c.InvalidateToken(key.Token, "logout")
				case op < 90:
					f.c.InvalidateDevice(user, fmt.Sprint("D", rng.IntN(3)), "device")
				case op < 94:
					f.c.InvalidateUser(user, TokenID{}, "deactivate")
				case op < 96:
					f.c.InvalidateDevicesExcept(user, []string{"D0"}, "sync")
				case op < 98:
					f.c.LimitLifetime(key.Token, f.clock.Now().Add(time.Duration(rng.IntN(120))*time.Second))
				case op < 99:
					f.clock.Advance(time.Second)
				default:
					if rng.IntN(10) == 0 {
						f.c.Flush("test")
					}
				}
			}
		})
	}
	wg.Wait()
	checkIndexes(t, f.c)
	n := f.c.census()
	if n.pos > 400 || n.neg > 50 || f.c.Len() != n.pos+n.neg {
		t.Errorf("after the stress: %+v, Len %d", n, f.c.Len())
	}
	// Whatever the interleaving, an invalidation done drops all it covers.
	for u := range 30 {
		f.c.InvalidateUser(fmt.Sprintf("@u%d:x", u), TokenID{}, "deactivate")
	}
	if n := f.c.census(); n.ringNodes != 0 || n.rings != 0 {
		t.Errorf("users invalidated, rings left: %+v", n)
	}
	checkIndexes(t, f.c)
}

// memory returns a copy of every byte the cache owns outside the answers'
// bodies, by region: the Cache struct, and each shard's struct, table and
// chunks of nodes.
func memory(c *Cache) map[string][]byte {
	grab := func(p unsafe.Pointer, n uintptr) []byte {
		return bytes.Clone(unsafe.Slice((*byte)(p), n))
	}
	m := map[string][]byte{"Cache": grab(unsafe.Pointer(c), unsafe.Sizeof(*c))}
	for i := range c.shards {
		s := &c.shards[i]
		m[fmt.Sprint("shard ", i)] = grab(unsafe.Pointer(s), unsafe.Sizeof(*s))
		m[fmt.Sprint("shard ", i, " table")] = grab(unsafe.Pointer(unsafe.SliceData(s.table)), uintptr(len(s.table))*unsafe.Sizeof(s.table[0]))
		for j, ch := range s.chunks {
			m[fmt.Sprint("shard ", i, " chunk ", j)] = grab(unsafe.Pointer(unsafe.SliceData(ch)), uintptr(len(ch))*unsafe.Sizeof(ch[0]))
		}
	}
	return m
}

// changed lists the regions whose bytes differ.
func changed(before, after map[string][]byte) []string {
	var diff []string
	for k, b := range before {
		if !bytes.Equal(b, after[k]) {
			diff = append(diff, k)
		}
	}
	slices.Sort(diff)
	return diff
}

// What lets hits scale with cores: a hit writes nothing that lookups of
// other shards read or write. The first read of an answer sets one byte of
// its node (CLOCK's reference flag); every later hit leaves the whole cache
// as it found it, its shard's lock word included once unlocked. (A hit
// that moved its answer to the front of a list, bumped a counter or took a
// lock shared by all shards would show here, whatever the machine's load.)
func TestHitWritesNothingShared(t *testing.T) {
	f := shardFixture(t, 16, nil, func(c *Config) { c.Size = 1000 })
	keys := make([]Key, 300)
	for i := range keys {
		keys[i] = f.h.Key(fmt.Sprint("tok", i), Masquerade{})
		fillDirect(f.c, keys[i], positive(fmt.Sprintf("@u%d:x", i), "D"))
	}
	fillDirect(f.c, f.h.Key("bogus", Masquerade{}), negative)
	k := keys[7]
	si := -1
	for i := range f.c.shards {
		if &f.c.shards[i] == f.c.shardOf(k) {
			si = i
		}
	}

	before := memory(f.c)
	f.expect(t, k, Hit)
	s := f.c.shardOf(k)
	s.mu.Lock()
	chunk := s.get(k) >> s.bits
	s.mu.Unlock()
	if got, want := changed(before, memory(f.c)), []string{fmt.Sprint("shard ", si, " chunk ", chunk)}; !slices.Equal(got, want) {
		t.Errorf("the first hit changed %q, want only %q (the flag of its node)", got, want)
	}

	f.expect(t, f.h.Key("bogus", Masquerade{}), NegativeHit) // its first read
	before = memory(f.c)
	for range 10 {
		f.expect(t, k, Hit)
		f.expect(t, f.h.Key("bogus", Masquerade{}), NegativeHit)
	}
	if got := changed(before, memory(f.c)); len(got) != 0 {
		t.Errorf("hits changed %q", got)
	}
	// A miss writes nothing either.
	before = memory(f.c)
	f.expect(t, f.h.Key("unknown", Masquerade{}), Miss)
	if got := changed(before, memory(f.c)); len(got) != 0 {
		t.Errorf("a miss changed %q", got)
	}
}
