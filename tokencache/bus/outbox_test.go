package bus

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// describe renders a batch for comparison: "all:reason", "token:N:reason",
// "device:user", or "passive:N,N,…" (N: the made-up token's number).
func describe(b batch) string {
	if b.passive != nil {
		s := "passive:"
		for i, id := range b.passive {
			if i > 0 {
				s += ","
			}
			s += fmt.Sprint(tokenNumber(id))
		}
		return s
	}
	switch b.inv.Scope {
	case tokencache.ScopeAll:
		return "all:" + string(b.inv.Reason)
	case tokencache.ScopeToken:
		return fmt.Sprintf("token:%d:%s", tokenNumber(b.inv.Token), b.inv.Reason)
	default:
		return fmt.Sprintf("%d:%s", b.inv.Scope, b.inv.UserID)
	}
}

func tokenNumber(id tokencache.TokenID) int {
	for i := range 1 << 16 {
		if madeUpToken(i) == id {
			return i
		}
	}
	return -1
}

func TestOutbox(t *testing.T) {
	passive := func(i int) tokencache.Invalidation {
		return tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i), Reason: tokencache.ReasonUnknownToken}
	}
	logout := func(i int) tokencache.Invalidation {
		return tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i), Reason: "logout"}
	}
	flush := tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: "logout_all"}
	// A passive reason on a wider scope is not coalesced or dropped.
	passiveUser := tokencache.Invalidation{Scope: tokencache.ScopeUser, UserID: "@a:x", Reason: tokencache.ReasonUnknownToken}
	for _, tc := range []struct {
		name   string
		add    []tokencache.Invalidation
		want   []outcome
		owe    bool // then owe a flush
		taken  []string
		batchN int
	}{
		{"explicit before passive, in order",
			[]tokencache.Invalidation{passive(1), logout(2), passive(3), logout(4)},
			[]outcome{queued, queued, queued, queued}, false,
			[]string{"token:2:logout", "token:4:logout", "passive:1,3"}, 10},
		{"passives coalesced by token",
			[]tokencache.Invalidation{passive(1), passive(2), passive(1), passive(1), passive(2)},
			[]outcome{queued, queued, coalesced, coalesced, coalesced}, false,
			[]string{"passive:1,2"}, 10},
		{"passive batches bounded",
			[]tokencache.Invalidation{passive(1), passive(2), passive(3)},
			[]outcome{queued, queued, queued}, false,
			[]string{"passive:1,2", "passive:3"}, 2},
		{"a flush subsumes what waits, and what comes while it waits",
			[]tokencache.Invalidation{logout(1), passive(2), flush, logout(3), passive(4), flush},
			[]outcome{queued, queued, queued, subsumed, subsumed, subsumed}, false,
			[]string{"all:logout_all"}, 10},
		{"explicit lane overflow owes a flush",
			[]tokencache.Invalidation{logout(1), logout(2), logout(3), logout(4), logout(5), passive(6)},
			[]outcome{queued, queued, queued, explicitOverflow, subsumed, subsumed}, false,
			[]string{"all:bus_resync"}, 10},
		{"passive lane overflow drops only passives",
			[]tokencache.Invalidation{passive(1), passive(2), passive(3), passive(4), passive(1), logout(5)},
			[]outcome{queued, queued, queued, passiveOverflow, coalesced, queued}, false,
			[]string{"token:5:logout", "passive:1,2,3"}, 10},
		{"passive reason on a wider scope is explicit",
			[]tokencache.Invalidation{passiveUser, passiveUser},
			[]outcome{queued, queued}, false,
			[]string{"3:@a:x", "3:@a:x"}, 10},
		{"a loss owes a flush ahead of everything",
			[]tokencache.Invalidation{logout(1), passive(2)},
			[]outcome{queued, queued}, true,
			[]string{"all:bus_resync"}, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := newOutbox(3, 3)
			var got []outcome
			for _, inv := range tc.add {
				got = append(got, o.add(inv))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("outcomes %v, want %v", got, tc.want)
			}
			if tc.owe {
				o.owe(tokencache.ReasonBusResync)
			}
			var taken []string
			for {
				b, ok, waiting := o.take(true, tc.batchN)
				if waiting {
					t.Fatal("waiting although passives are ready")
				}
				if !ok {
					break
				}
				taken = append(taken, describe(b))
			}
			if !slices.Equal(taken, tc.taken) {
				t.Errorf("taken %q, want %q", taken, tc.taken)
			}
			if n := o.len(); n != 0 {
				t.Errorf("%d left", n)
			}
		})
	}

	t.Run("passives wait until ready; explicit ones do not", func(t *testing.T) {
		o := newOutbox(3, 3)
		o.add(passive(1))
		if _, ok, waiting := o.take(false, 10); ok || !waiting {
			t.Fatalf("took a passive when not ready (ok %v, waiting %v)", ok, waiting)
		}
		o.add(logout(2))
		if b, ok, _ := o.take(false, 10); !ok || describe(b) != "token:2:logout" {
			t.Fatalf("took %q, %v; want the logout", describe(b), ok)
		}
		if b, ok, _ := o.take(true, 10); !ok || describe(b) != "passive:1" {
			t.Fatalf("took %q, %v; want the passive", describe(b), ok)
		}
		// Once sent, a token's passive invalidation can be queued again.
		if got := o.add(passive(1)); got != queued {
			t.Errorf("passive after it was taken: %v, want queued", got)
		}
	})

	t.Run("wake is signalled without blocking", func(t *testing.T) {
		o := newOutbox(3, 3)
		for i := range 5 {
			o.add(logout(i)) // never blocks on the full wake channel
		}
		select {
		case <-o.wake:
		default:
			t.Fatal("not woken")
		}
	})
}

// TestOutboxBounds: whatever comes, the outbox holds at most its two
// bounds plus one owed flush, and its index of passives never outgrows
// what it holds.
func TestOutboxBounds(t *testing.T) {
	const explicitSize, passiveSize = 16, 32
	o := newOutbox(explicitSize, passiveSize)
	for i := range 10_000 {
		switch i % 7 {
		case 0:
			o.add(tokencache.Invalidation{Scope: tokencache.ScopeDevice, UserID: "@a:x", DeviceID: fmt.Sprint(i), Reason: "device"})
		default:
			o.add(tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i % 5000), Reason: tokencache.ReasonUnknownToken})
		}
		if i%97 == 0 {
			o.take(i%2 == 0, 5)
		}
		if n := o.len(); n > explicitSize+passiveSize+1 {
			t.Fatalf("after %d: %d held", i, n)
		}
		if len(o.queued) != o.passive.len() {
			t.Fatalf("after %d: index of %d for %d passives", i, len(o.queued), o.passive.len())
		}
	}
}

func TestRing(t *testing.T) {
	r := newRing[int](3)
	next, want := 0, 0
	// Round after round, fill it and take two: the FIFO order holds across
	// the wrap-around, and it never takes more than its size.
	for range 10 {
		for r.push(next) {
			next++
		}
		if r.len() != 3 {
			t.Fatalf("full at %d, want 3", r.len())
		}
		for range 2 {
			if got := r.pop(); got != want {
				t.Fatalf("popped %d, want %d", got, want)
			}
			want++
		}
	}
	r.clear()
	if r.len() != 0 || !r.push(7) || r.pop() != 7 || r.len() != 0 {
		t.Error("clear does not empty it")
	}
}

// BenchmarkPublish: what Publish costs the request path, for a flood of
// passive invalidations (coalesced, then dropped once the set is full) and
// for explicit ones (the queue drained as it fills, as the publisher does).
func BenchmarkPublish(b *testing.B) {
	f := newBenchBus(b)
	b.Run("passive", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			f.Publish(tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i % 4096), Reason: tokencache.ReasonUnknownToken})
			i++
		}
	})
	b.Run("explicit", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			f.Publish(tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i), Reason: "logout"})
			if i++; i%busQueueSize == 0 {
				for {
					if _, ok, _ := f.out.take(false, busPassiveBatch); !ok {
						break
					}
				}
			}
		}
	})
}

func newBenchBus(b *testing.B) *Bus {
	c, err := tokencache.New(tokencache.Config{Size: 10, TTL: time.Minute, LookupTimeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	bus, err := New(Config{URL: "redis://127.0.0.1:1", Registerer: prometheus.NewRegistry()}, c)
	if err != nil {
		b.Fatal(err)
	}
	return bus
}
