package proxy

import (
	"errors"
	"hash/maphash"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// RateLimitConfig is the per-client rate limit at the edge. Every request
// through the client listener is charged to a bucket: the user+device of a
// token the cache knows to be valid, otherwise the client's address (IPv6
// by /64, since one host holds a whole /64). An empty bucket is answered by
// the proxy itself with Matrix's 429 M_LIMIT_EXCEEDED.
type RateLimitConfig struct {
	// RPS is the sustained rate per key; 0 disables rate limiting.
	RPS float64
	// Burst is how many requests a key may make at once (at least 1).
	Burst int
	// ExemptUsers are never limited (bridge bots, appservices).
	ExemptUsers []string
	// ExemptCIDRs are client addresses never limited.
	ExemptCIDRs []netip.Prefix
	// MaxKeys bounds the buckets held; the least recently used go first, so
	// memory stays flat under a spray of addresses or tokens. An evicted
	// key comes back with a full bucket. 0 means 100000.
	MaxKeys int
}

// limiter is a GCRA (generic cell rate algorithm) token bucket per key: per
// key it stores only the "theoretical arrival time" of the next request,
// 8 bytes, in sharded LRUs.
type limiter struct {
	interval    int64 // ns between requests at the sustained rate
	tolerance   int64 // burst × interval
	exemptUsers map[string]struct{}
	exemptCIDRs []netip.Prefix
	now         func() time.Time
	seed        maphash.Seed
	shards      [limiterShards]limiterShard
}

const limiterShards = 16

type limiterShard struct {
	mu  sync.Mutex
	lru *simplelru.LRU[bucketKey, int64]
}

// bucketKey is either a user+device or an address prefix. It is a
// comparable struct rather than a string so keying allocates nothing.
type bucketKey struct {
	user, device string
	ip           netip.Prefix
}

func newLimiter(cfg RateLimitConfig, now func() time.Time) (*limiter, error) {
	if cfg.RPS == 0 {
		return nil, nil
	}
	if cfg.RPS < 0 || math.IsNaN(cfg.RPS) || math.IsInf(cfg.RPS, 0) || cfg.Burst < 1 {
		return nil, errors.New("proxy: rate limit needs RPS > 0 and Burst >= 1")
	}
	if cfg.MaxKeys == 0 {
		cfg.MaxKeys = 100000
	}
	interval := int64(float64(time.Second) / cfg.RPS)
	l := &limiter{
		interval:    max(interval, 1),
		tolerance:   max(interval, 1) * int64(cfg.Burst),
		exemptUsers: map[string]struct{}{},
		exemptCIDRs: cfg.ExemptCIDRs,
		now:         now,
		seed:        maphash.MakeSeed(),
	}
	for _, u := range cfg.ExemptUsers {
		l.exemptUsers[u] = struct{}{}
	}
	for i := range l.shards {
		lru, err := simplelru.NewLRU[bucketKey, int64](max(cfg.MaxKeys/limiterShards, 1), nil)
		if err != nil {
			return nil, err
		}
		l.shards[i].lru = lru
	}
	return l, nil
}

// ipKey is the bucket of an address: IPv4 by address, IPv6 by /64.
func ipKey(a netip.Addr) bucketKey {
	bits := a.BitLen()
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return bucketKey{ip: p}
}

// allow charges one request to key and reports whether it may go on, or how
// long until it could.
func (l *limiter) allow(key bucketKey) (bool, time.Duration) {
	now := l.now().UnixNano()
	s := &l.shards[l.shard(key)]
	s.mu.Lock()
	defer s.mu.Unlock()
	tat, ok := s.lru.Get(key)
	if !ok || tat < now {
		tat = now
	}
	next := tat + l.interval
	if wait := next - now - l.tolerance; wait > 0 {
		return false, time.Duration(wait)
	}
	s.lru.Add(key, next)
	return true, 0
}

// shard picks a key's shard. (maphash.Comparable would box the key.)
func (l *limiter) shard(key bucketKey) uint64 {
	var h maphash.Hash
	h.SetSeed(l.seed)
	h.WriteString(key.user)
	h.WriteByte(0)
	h.WriteString(key.device)
	ip := key.ip.Addr().As16()
	h.Write(ip[:])
	return h.Sum64() % limiterShards
}

// len returns the number of buckets held.
func (l *limiter) len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += s.lru.Len()
		s.mu.Unlock()
	}
	return n
}

// writeRateLimited answers 429 M_LIMIT_EXCEEDED (Client-Server API, "Rate
// limiting"): retry_after_ms for older clients, Retry-After (whole seconds,
// rounded up) for clients of v1.10 and later.
func writeRateLimited(w http.ResponseWriter, wait time.Duration) {
	ms := max(int64((wait+time.Millisecond-1)/time.Millisecond), 1)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-cache, no-store, must-revalidate")
	h.Set("Retry-After", strconv.FormatInt((ms+999)/1000, 10))
	setCORS(h)
	w.WriteHeader(http.StatusTooManyRequests)
	_, _ = w.Write([]byte(`{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":` + strconv.FormatInt(ms, 10) + `}`))
}
