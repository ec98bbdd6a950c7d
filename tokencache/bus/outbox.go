package bus

import (
	"sync"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// The outbox holds what waits to be published, in order of importance:
//
//  1. a flush owed to the peers, because invalidations of ours were lost (a
//     failed publish, an explicit one that found its lane full) or because
//     the cache was flushed. Peers that apply it lose nothing they should
//     have kept, so everything decided before it is sent is subsumed: while
//     one is owed, the lanes are empty and stay so.
//  2. explicit revocations (logouts, devices, passwords, deactivations,
//     logins, the admin API), in order, in a bounded lane. One that does not
//     fit is owed as a flush: never lost silently.
//  3. passive invalidations (tokencache.ReasonUnknownToken: the homeserver
//     answered 401 for a token), a bounded set coalesced by token. One that
//     does not fit is dropped and only counted: a spray of made-up tokens
//     makes them by the thousand, and none is worth a flush. A peer that
//     still holds an answer for such a token learns that it is dead from its
//     own 401 on the token's next non-whoami request through it, or at the
//     latest when the answer expires (CACHE_TTL): the bound the README gives
//     for revocations made behind the proxies' back, which is what a passive
//     invalidation reports. Negative answers need no sharing.
//
// Passives are taken in batches (one message for many), explicit ones one
// at a time (one message each, in the format every version reads).
type outbox struct {
	mu          sync.Mutex
	flush       bool
	flushReason tokencache.Reason
	explicit    ring[tokencache.Invalidation]
	passive     ring[tokencache.TokenID]
	queued      map[tokencache.TokenID]struct{} // what passive holds
	// wake is signalled (without blocking) when there is something new.
	wake chan struct{}
}

func newOutbox(explicitSize, passiveSize int) *outbox {
	return &outbox{
		explicit: newRing[tokencache.Invalidation](explicitSize),
		passive:  newRing[tokencache.TokenID](passiveSize),
		queued:   make(map[tokencache.TokenID]struct{}, passiveSize),
		wake:     make(chan struct{}, 1),
	}
}

// outcome is what became of an invalidation handed to the outbox.
type outcome uint8

const (
	queued outcome = iota
	// coalesced: the same passive invalidation was already waiting.
	coalesced
	// subsumed: a flush is owed; it will be published after this.
	subsumed
	// explicitOverflow: the explicit lane was full; a flush is now owed.
	explicitOverflow
	// passiveOverflow: the passive lane was full; dropped.
	passiveOverflow
)

// isPassive tells passive invalidations from explicit revocations. Only a
// single token's, by the reason callers give them: anything else is treated
// as explicit, which never loses it.
func isPassive(inv tokencache.Invalidation) bool {
	return inv.Scope == tokencache.ScopeToken && inv.Reason == tokencache.ReasonUnknownToken
}

// add queues inv. It never blocks (beyond the lock, held for a few
// operations on bounded structures).
func (o *outbox) add(inv tokencache.Invalidation) outcome {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case o.flush:
		return subsumed
	case inv.Scope == tokencache.ScopeAll:
		o.oweLocked(inv.Reason)
		return queued
	case isPassive(inv):
		if _, ok := o.queued[inv.Token]; ok {
			return coalesced
		}
		if !o.passive.push(inv.Token) {
			return passiveOverflow
		}
		o.queued[inv.Token] = struct{}{}
	default:
		if !o.explicit.push(inv) {
			o.oweLocked(tokencache.ReasonBusResync)
			return explicitOverflow
		}
	}
	o.signal()
	return queued
}

// owe records that the peers must flush; everything waiting is subsumed.
func (o *outbox) owe(reason tokencache.Reason) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.oweLocked(reason)
}

func (o *outbox) oweLocked(reason tokencache.Reason) {
	if !o.flush {
		o.flush, o.flushReason = true, reason
	}
	o.explicit.clear()
	o.passive.clear()
	clear(o.queued)
	o.signal()
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// batch is one message's worth: one invalidation (a flush or an explicit
// one), or passive invalidations of several tokens.
type batch struct {
	inv     tokencache.Invalidation
	passive []tokencache.TokenID
}

// take removes the next message's worth, most important first, and reports
// whether there was one. Passives are only taken when passiveReady (their
// messages are spaced out), at most limit of them; waiting reports passives
// left waiting for that.
func (o *outbox) take(passiveReady bool, limit int) (b batch, ok, waiting bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case o.flush:
		o.flush = false
		return batch{inv: tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: o.flushReason}}, true, false
	case o.explicit.len() > 0:
		return batch{inv: o.explicit.pop()}, true, false
	case o.passive.len() == 0:
		return batch{}, false, false
	case !passiveReady:
		return batch{}, false, true
	}
	ids := make([]tokencache.TokenID, 0, min(limit, o.passive.len()))
	for o.passive.len() > 0 && len(ids) < limit {
		id := o.passive.pop()
		delete(o.queued, id)
		ids = append(ids, id)
	}
	return batch{passive: ids}, true, false
}

// len returns how many invalidations wait, an owed flush counting as one.
func (o *outbox) len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := o.explicit.len() + o.passive.len()
	if o.flush {
		n++
	}
	return n
}

// ring is a FIFO of fixed capacity.
type ring[T any] struct {
	buf     []T
	head, n int
}

func newRing[T any](size int) ring[T] { return ring[T]{buf: make([]T, size)} }

func (r *ring[T]) len() int { return r.n }

// push appends v, unless the ring is full.
func (r *ring[T]) push(v T) bool {
	if r.n == len(r.buf) {
		return false
	}
	r.buf[(r.head+r.n)%len(r.buf)] = v
	r.n++
	return true
}

// pop removes the oldest value; the ring must not be empty.
func (r *ring[T]) pop() T {
	var zero T
	v := r.buf[r.head]
	r.buf[r.head] = zero
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	return v
}

func (r *ring[T]) clear() {
	clear(r.buf)
	r.head, r.n = 0, 0
}
