package tokencache

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Run with: go test -run XXX -bench . -benchmem ./tokencache/

func benchCache(b testing.TB, size int) (*Cache, *Hasher) {
	b.Helper()
	c, err := New(Config{Size: size, TTL: time.Hour, NegativeTTL: time.Minute, LookupTimeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	h, err := NewHasher(nil)
	if err != nil {
		b.Fatal(err)
	}
	return c, h
}

// benchToken is token i of a fill, shaped like Synapse's; prefix keeps the
// tokens of different fills apart.
func benchToken(prefix string, i int) string {
	return fmt.Sprintf("syt_%s_%020d_0A1B2C", prefix, i)
}

// sharedMeta stands for the proxy's interned replay (status and headers):
// one pointer shared by every answer.
var sharedMeta any = new(struct{ status int })

// productionAnswer builds an answer the way the proxy does from a whoami
// reply (proxy.answerFor over upstream.Reply): the body copied once into a
// string of its exact size, user and device IDs decoded from it by
// encoding/json (so each answer comes with its own strings), and a shared
// Meta.
func productionAnswer(tb testing.TB, user, device string) Answer {
	raw := fmt.Appendf(nil, `{"user_id":%q,"is_guest":false,"device_id":%q}`, user, device)
	var m struct {
		UserID   string `json:"user_id"`
		DeviceID string `json:"device_id"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		tb.Fatal(err)
	}
	return Answer{Kind: Positive, UserID: m.UserID, DeviceID: m.DeviceID, Body: string(raw), Meta: sharedMeta}
}

// fillN stores n positive answers for tokens benchToken(prefix, 0…n-1), token
// i belonging to user(i), and returns their keys.
func fillN(tb testing.TB, c *Cache, h *Hasher, prefix string, n int, user func(i int) string) []Key {
	tb.Helper()
	keys := make([]Key, n)
	for i := range n {
		keys[i] = h.Key(benchToken(prefix, i), Masquerade{})
		c.fill(keys[i], c.seqNow(), productionAnswer(tb, user(i), fmt.Sprintf("DEV%07d", i)))
	}
	return keys
}

// BenchmarkHit is the cache lookup alone: key hash plus Get. It must not
// allocate.
func BenchmarkHit(b *testing.B) {
	c, h := benchCache(b, 1000)
	fillN(b, c, h, "hit", 1000, func(i int) string { return fmt.Sprintf("@u%d:example.org", i) })
	tok := benchToken("hit", 500)
	b.ReportAllocs()
	cpu, ok := processCPU()
	for b.Loop() {
		if _, r := c.Get(h.Key(tok, Masquerade{})); r != Hit {
			b.Fatal("miss")
		}
	}
	// CPU time per lookup: on a shared machine, steadier than wall time.
	if end, ok2 := processCPU(); ok && ok2 {
		b.ReportMetric(float64(end-cpu)/float64(b.N), "cpu-ns/op")
	}
}

// BenchmarkHitContended is the same lookup (hash plus Get, over 10,000
// keys) from exactly 1, 2 and 8 goroutines at once: RunParallel starts
// parallelism × GOMAXPROCS goroutines, so GOMAXPROCS is lowered to the
// goroutine count where it is larger (goroutines=1 is then the uncontended
// reference). ns/op is wall time per lookup over all goroutines.
func BenchmarkHitContended(b *testing.B) {
	procs := runtime.GOMAXPROCS(0)
	for _, g := range []int{1, 2, 8} {
		b.Run(fmt.Sprintf("goroutines=%d", g), func(b *testing.B) {
			c, h := benchCache(b, 10000)
			tokens := make([]string, 10000)
			for i := range tokens {
				tokens[i] = benchToken("contended", i)
			}
			fillN(b, c, h, "contended", len(tokens), func(i int) string { return fmt.Sprintf("@u%d:example.org", i) })
			p := min(g, procs)
			if g%p != 0 {
				b.Skipf("%d goroutines cannot be spread evenly over GOMAXPROCS=%d", g, p)
			}
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(p))
			b.SetParallelism(g / p)
			var started, next atomic.Int64
			b.ReportAllocs()
			b.ResetTimer() // RunParallel, unlike b.Loop, does not leave the set-up out
			b.RunParallel(func(pb *testing.PB) {
				started.Add(1)
				i := int(next.Add(7919))
				for pb.Next() {
					i++
					if _, r := c.Get(h.Key(tokens[i%len(tokens)], Masquerade{})); r != Hit {
						b.Error("miss")
						return
					}
				}
			})
			if got := started.Load(); got != int64(g) {
				b.Fatalf("ran %d goroutines, want %d", got, g)
			}
		})
	}
}

// BenchmarkMissSingleflight: 64 goroutines miss the same key at once; one
// fetch serves them all (fetches/op must be 1).
func BenchmarkMissSingleflight(b *testing.B) {
	c, h := benchCache(b, 1000)
	var fetches atomic.Int64
	a := productionAnswer(b, "@a:example.org", "DEV")
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		key := h.Key(benchToken("miss", i), Masquerade{})
		var wg sync.WaitGroup
		for range 64 {
			wg.Go(func() {
				_, _, _ = c.Resolve(context.Background(), key, func(context.Context) (Answer, error) {
					fetches.Add(1)
					time.Sleep(50 * time.Microsecond) // a fast homeserver
					return a, nil
				})
			})
		}
		wg.Wait()
	}
	b.ReportMetric(float64(fetches.Load())/float64(i), "fetches/op")
}

// BenchmarkInvalidateUser drops a user holding 1,000 entries from a cache of
// 100,000 (99,000 belonging to other users). Refilling the user between
// iterations is not timed.
func BenchmarkInvalidateUser(b *testing.B) {
	c, h := benchCache(b, 100_000)
	fillN(b, c, h, "other", 99_000, func(i int) string { return fmt.Sprintf("@user%07d:example.org", i) })
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		fillN(b, c, h, "bot", 1000, func(int) string { return "@bot:example.org" })
		b.StartTimer()
		if n := c.InvalidateUser("@bot:example.org", TokenID{}, "deactivate"); n != 1000 {
			b.Fatalf("dropped %d", n)
		}
	}
	if c.Len() != 99_000 {
		b.Fatalf("held %d, want the 99,000 others", c.Len())
	}
}

// TestHeapPerToken reports the heap one cached token costs, everything
// included (key, stored answer, user index, LRU bookkeeping), with answers
// built as the proxy builds them (see productionAnswer). By default 100,000
// tokens of 30,000 users; HEAP_TOKENS and HEAP_USERS change that (make bench
// runs 1,000,000 over 300,000, and measures the proxy's whole fill path with
// proxy.TestHeapPerTokenProduction):
//
//	HEAP_TOKENS=1000000 HEAP_USERS=300000 go test -run HeapPerToken -v ./tokencache/
func TestHeapPerToken(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("a measurement, not a check; skipped with -short and -race")
	}
	n, users := 100_000, 30_000
	for _, v := range []struct {
		name string
		to   *int
	}{{"HEAP_TOKENS", &n}, {"HEAP_USERS", &users}} {
		if s := os.Getenv(v.name); s != "" {
			x, err := strconv.Atoi(s)
			if err != nil || x < 1 {
				t.Fatalf("%s=%q: want a positive integer", v.name, s)
			}
			*v.to = x
		}
	}
	c, h := benchCache(t, n)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		key := h.Key(benchToken("heap", i), Masquerade{})
		c.fill(key, c.seqNow(), productionAnswer(t, fmt.Sprintf("@user%07d:example.org", i%users), fmt.Sprintf("%010d", i)))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if c.Len() != n {
		t.Fatalf("held %d", c.Len())
	}
	t.Logf("%d tokens over %d users: heap per token: %.0f bytes", n, users, float64(after.HeapAlloc-before.HeapAlloc)/float64(n))
	runtime.KeepAlive(c)
}

// benchInvalidate times drop, which must drop want answers, after refill
// (not timed) each round. Besides ns/op it reports how long the invalidation
// held the cache's lock at once (every other request waits that long at
// worst), measured between the pauses of a batched invalidation: the mean
// (hold-ns-mean) and the longest (hold-ns-max; wall time, so it also counts
// a GC pause or the goroutine being descheduled on a busy machine).
func benchInvalidate(b *testing.B, c *Cache, refill func(), drop func() int, want int) {
	var last time.Time
	var maxHold, total time.Duration
	holds := 0
	hold := func() {
		d := time.Since(last)
		maxHold, total, holds = max(maxHold, d), total+d, holds+1
	}
	c.betweenBatches = func() {
		hold()
		last = time.Now()
	}
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		refill()
		b.StartTimer()
		last = time.Now()
		if n := drop(); n != want {
			b.Fatalf("dropped %d, want %d", n, want)
		}
		hold()
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(holds), "hold-ns-mean")
	b.ReportMetric(float64(maxHold.Nanoseconds()), "hold-ns-max")
}

// BenchmarkInvalidateTokenVariants drops a bridge's token that masquerades
// as 100,000 users (a cache of 110,000, 10,000 of them other tokens'):
// linear in the variants, in batches of invalidationBatch.
func BenchmarkInvalidateTokenVariants(b *testing.B) {
	const n = 100_000
	c, h := benchCache(b, n+10_000)
	fillN(b, c, h, "other", 10_000, func(i int) string { return fmt.Sprintf("@user%07d:example.org", i) })
	keys, answers := make([]Key, n), make([]Answer, n)
	for i := range n {
		u := fmt.Sprintf("@bridge_%07d:example.org", i)
		keys[i] = h.Key("as_bridge_token", Masquerade{UserID: u})
		answers[i] = Answer{Kind: Positive, UserID: u, Body: `{"user_id":"` + u + `","is_guest":false}`, Meta: sharedMeta}
	}
	refill := func() {
		for i := range keys {
			c.fill(keys[i], c.seqNow(), answers[i])
		}
	}
	benchInvalidate(b, c, refill, func() int { return c.InvalidateToken(keys[0].Token, "logout") }, n)
	if c.Len() != 10_000 {
		b.Fatalf("held %d, want the 10,000 others", c.Len())
	}
}

// BenchmarkInvalidateUserDevices drops a user holding 10,000 tokens (one
// per device) from a cache of 20,000.
func BenchmarkInvalidateUserDevices(b *testing.B) {
	const n = 10_000
	c, h := benchCache(b, 2*n)
	fillN(b, c, h, "other", n, func(i int) string { return fmt.Sprintf("@user%07d:example.org", i) })
	keys, answers := make([]Key, n), make([]Answer, n)
	for i := range n {
		keys[i] = h.Key(benchToken("bot", i), Masquerade{})
		answers[i] = productionAnswer(b, "@bot:example.org", fmt.Sprintf("DEV%07d", i))
	}
	refill := func() {
		for i := range keys {
			c.fill(keys[i], c.seqNow(), answers[i])
		}
	}
	benchInvalidate(b, c, refill, func() int { return c.InvalidateUser("@bot:example.org", TokenID{}, "deactivate") }, n)
	if c.Len() != n {
		b.Fatalf("held %d, want the %d others", c.Len(), n)
	}
}

// parallelKeys fills a cache of n tokens (n users) and returns their keys
// and tokens, for the parallel benchmarks below.
func parallelKeys(b *testing.B, n int) (*Cache, *Hasher, []Key, []string) {
	c, h := benchCache(b, 2*n)
	tokens := make([]string, n)
	for i := range tokens {
		tokens[i] = benchToken("par", i)
	}
	keys := fillN(b, c, h, "par", n, func(i int) string { return fmt.Sprintf("@u%d:example.org", i) })
	return c, h, keys, tokens
}

// runParallel is b.RunParallel(body), reporting besides wall time per
// operation the CPU time per operation (cpu-ns/op) and the time
// goroutines waited for a sync.Mutex per operation (mutex-wait-ns/op).
// On a machine shared with other work, wall time at -cpu 2 says more about
// the neighbours than about the cache; cpu-ns/op staying flat from -cpu 1
// to -cpu 2 says the cores did not slow each other down (no lock waits,
// no cache lines bouncing between them), whatever the neighbours did.
func runParallel(b *testing.B, body func(*testing.PB)) {
	sample := []metrics.Sample{{Name: "/sync/mutex/wait/total:seconds"}}
	metrics.Read(sample)
	waited := sample[0].Value.Float64()
	cpu, ok := processCPU()
	b.RunParallel(body)
	if end, ok2 := processCPU(); ok && ok2 {
		b.ReportMetric(float64(end-cpu)/float64(b.N), "cpu-ns/op")
	}
	metrics.Read(sample)
	b.ReportMetric((sample[0].Value.Float64()-waited)*1e9/float64(b.N), "mutex-wait-ns/op")
}

// BenchmarkKeyParallel is the key hash alone from GOMAXPROCS goroutines: it
// shares no state, so its scaling from -cpu 1 to -cpu 2 is what the machine
// gives at the moment, the reference for the other parallel benchmarks'.
func BenchmarkKeyParallel(b *testing.B) {
	_, h, _, tokens := parallelKeys(b, 10_000)
	var next atomic.Int64
	var sink atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	runParallel(b, func(pb *testing.PB) {
		i := int(next.Add(7919))
		var x uint64
		for pb.Next() {
			i++
			x += uint64(h.Key(tokens[i%len(tokens)], Masquerade{}).Token[0])
		}
		sink.Add(x)
	})
}

// BenchmarkGetParallel is Get alone (keys hashed in advance) from
// GOMAXPROCS goroutines: run with -cpu 1,2,4 to see how the cache's lock
// scales. ns/op is wall time per lookup over all goroutines, so perfect
// scaling halves it from -cpu 1 to -cpu 2.
func BenchmarkGetParallel(b *testing.B) {
	c, _, keys, _ := parallelKeys(b, 10_000)
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	runParallel(b, func(pb *testing.PB) {
		i := int(next.Add(7919))
		for pb.Next() {
			i++
			if _, r := c.Get(keys[i%len(keys)]); r != Hit {
				b.Error("miss")
				return
			}
		}
	})
}

// BenchmarkHitParallel is a cached whoami's cache work (key hash plus Get)
// from GOMAXPROCS goroutines; run with -cpu 1,2,4.
func BenchmarkHitParallel(b *testing.B) {
	c, h, _, tokens := parallelKeys(b, 10_000)
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	runParallel(b, func(pb *testing.PB) {
		i := int(next.Add(7919))
		for pb.Next() {
			i++
			if _, r := c.Get(h.Key(tokens[i%len(tokens)], Masquerade{})); r != Hit {
				b.Error("miss")
				return
			}
		}
	})
}

// BenchmarkMixedParallel is a mixed workload through Resolve from
// GOMAXPROCS goroutines (run with -cpu 1,2,4): of every 100 operations, 90
// look up one of 10,000 cached tokens, 8 a token never seen before (the
// fetch answers at once, so the miss path's own cost shows: singleflight,
// fill, eviction), and 2 invalidate a cached token (which the next lookup of
// it fetches again). Keys are hashed in advance. It reports the share of
// lookups that were hits (hits/lookup) and the fetches per miss
// (fetches/miss, 1 when no lookup is ever repeated).
func BenchmarkMixedParallel(b *testing.B) {
	const hot = 10_000
	c, h, keys, _ := parallelKeys(b, hot)
	answers := make([]Answer, hot)
	for i := range answers {
		answers[i] = productionAnswer(b, fmt.Sprintf("@u%d:example.org", i), fmt.Sprintf("DEV%07d", i))
	}
	cold := make([]Key, 1<<16)
	for i := range cold {
		cold[i] = h.Key(benchToken("cold", i), Masquerade{})
	}
	coldAnswer := productionAnswer(b, "@cold:example.org", "DEVCOLD")
	var next, coldNext, lookups, hits, fetches, misses atomic.Int64
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	runParallel(b, func(pb *testing.PB) {
		i := int(next.Add(7919))
		var nLookups, nHits, nFetches, nMisses int64
		for op := 0; pb.Next(); op++ {
			i++
			k := i % hot
			switch op % 50 {
			case 0: // 2 in 100: invalidate a cached token
				c.InvalidateToken(keys[k].Token, "logout")
				continue
			case 1, 13, 25, 37: // 8 in 100: a token never seen before
				key := cold[int(coldNext.Add(1))%len(cold)]
				_, r, err := c.Resolve(ctx, key, func(context.Context) (Answer, error) {
					nFetches++
					return coldAnswer, nil
				})
				if err != nil || r == NegativeHit {
					b.Errorf("cold lookup: %v, %v", r, err)
					return
				}
				nLookups++
				nMisses++
				if r == Hit {
					nHits++
					nMisses--
				}
				continue
			}
			_, r, err := c.Resolve(ctx, keys[k], func(context.Context) (Answer, error) {
				nFetches++
				return answers[k], nil
			})
			if err != nil {
				b.Error(err)
				return
			}
			nLookups++
			if r == Hit {
				nHits++
			} else {
				nMisses++
			}
		}
		lookups.Add(nLookups)
		hits.Add(nHits)
		fetches.Add(nFetches)
		misses.Add(nMisses)
	})
	b.ReportMetric(float64(hits.Load())/float64(max(lookups.Load(), 1)), "hits/lookup")
	b.ReportMetric(float64(fetches.Load())/float64(max(misses.Load(), 1)), "fetches/miss")
}
