// Package tokencache remembers what the homeserver said about access tokens,
// and forgets it as soon as anything may have made that answer wrong.
//
// It holds answers (positive: the token is user U's on device D; negative:
// the token is unknown), each under a Key derived from a keyed hash of the
// token, never the token itself. Answers expire per entry; positive ones can
// be dropped by token, by user+device or by user, negative ones only by a
// flush (see Scope); and concurrent misses for one key share
// one lookup. A lookup that was in flight while an invalidation that concerns
// its answer happened never stores that answer. An answer that holds only for
// the client that got it (the caller says so, Answer.Bound) is stored under
// a key bound to that client (Hasher.Bind) and served to no other.
// Invalidation costs time linear in what it drops, and a large one yields
// the lock between batches.
//
// Answers are spread over up to 16 shards by key, each with its own lock,
// so cached lookups on different cores scale (see Cache). Each shard keeps
// its answers in its own compact store (shard.go) rather than in
// golang-lru: a golang-lru node is 112 bytes (with an expiry field the
// cache does not use) plus ~50 in its map, and cannot carry the links of a
// per-user index, which as a map of user → keys cost ~90 bytes a user. At
// 1,000,000 tokens that made 400 bytes a token with one user each, 330
// with 300,000 users; the slab of 72-byte nodes, a table of 4-byte node
// indexes and user rings threaded through the nodes make it ~200 and
// ~190. Eviction is CLOCK, an approximate LRU whose hits write no list.
//
// It deliberately knows nothing about HTTP or Matrix endpoints: what an answer
// means, which responses may be cached and which calls revoke what is the
// caller's business (package proxy). It does not talk to the homeserver
// either; callers hand Resolve a Fetch function for that.
package tokencache

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/maphash"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// Kind says what an answer means for caching.
type Kind uint8

const (
	// Uncacheable answers are handed back to the caller and never stored:
	// errors of the homeserver, rate limits, forbidden masquerades.
	Uncacheable Kind = iota
	// Positive answers say the token is valid for UserID (and DeviceID).
	Positive
	// Negative answers say the token is unknown to the homeserver.
	Negative
)

// Answer is what the homeserver said about a token, kept verbatim so that the
// caller can replay it.
type Answer struct {
	Kind Kind
	// UserID and DeviceID: whose token it is, for a Positive answer and
	// for an Uncacheable one that names a user all the same (handed back,
	// never stored). DeviceID is empty for device-less appservice users.
	UserID   string
	DeviceID string
	// Body is the homeserver's response body. When it contains UserID and
	// DeviceID verbatim (as a whoami body usually does), the stored answer
	// keeps only the body and where in it they are, so a cached token costs
	// little more than its body; when it does not (the homeserver escaped
	// them in its JSON: non-ASCII, quotes, backslashes), they are kept after
	// it. Answers over 64 KiB in all, or with an ID over 255 bytes, are not
	// stored.
	Body string
	// Meta is opaque to the cache (the proxy keeps the status and the replayed
	// response headers there, shared between answers). It must be
	// comparable, and a cache stores answers with at most 256 distinct ones:
	// pass shared pointers.
	Meta any
	// Bound says the answer holds only for the client it was learned for
	// (the homeserver's answer depended on who asked, e.g. on the client's
	// address): ResolveBound stores it under the bound key, never the shared
	// one. Set by Fetch; Get leaves it false.
	Bound bool
}

// Result is the outcome of a cache lookup.
type Result uint8

const (
	Miss Result = iota
	Hit
	NegativeHit
)

func (r Result) String() string {
	switch r {
	case Hit:
		return "hit"
	case NegativeHit:
		return "negative_hit"
	default:
		return "miss"
	}
}

// Reason says why entries were dropped; it becomes a metric label, so callers
// must use a small fixed set of values.
type Reason string

// Reasons the cache itself drops entries for. Callers name their own.
const (
	ReasonCapacity Reason = "capacity" // pushed out by newer entries
	ReasonExpired  Reason = "expired"  // found past its lifetime
)

// Config is the behaviour of a Cache.
type Config struct {
	// Size is the most positive answers held. Negative answers are held
	// apart, at most Size/8 (at least 1), so that a spray of made-up tokens
	// cannot push valid ones out.
	Size int
	// TTL is the lifetime of a positive answer, counted from the moment the
	// lookup returned.
	TTL time.Duration
	// NegativeTTL is the lifetime of a negative answer; 0 stores none.
	NegativeTTL time.Duration
	// LookupTimeout bounds a shared lookup. It runs detached from the
	// context of the caller that started it, so one impatient client cannot
	// fail the others waiting on the same key.
	LookupTimeout time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// OnDrop, if set, is told every time entries are dropped and why. It is
	// called with a shard's lock held, possibly from several goroutines at
	// once (for different shards): keep it quick, safe for concurrent use,
	// and do not call back.
	OnDrop func(reason Reason, n int)
	// OnInvalidate, if set, is told of every invalidation made through the
	// Invalidate methods and Flush (not Apply), after it took effect: the
	// hook for sharing them with other replicas.
	OnInvalidate func(Invalidation)
}

// Fetch asks the homeserver about a token. ctx is bounded by LookupTimeout.
// An error is never cached.
type Fetch func(ctx context.Context) (Answer, error)

// locate finds v in body; ok is false when it is not there or too long.
func locate(body, v string) (off uint16, n uint8, ok bool) {
	if v == "" {
		return 0, 0, true
	}
	i := strings.Index(body, v)
	if i < 0 || len(v) > math.MaxUint8 {
		return 0, 0, false
	}
	return uint16(i), uint8(len(v)), true
}

// maxMetas bounds the distinct Answer.Meta values the cache holds (the
// proxy interns its replayed headers, so it has a handful).
const maxMetas = 256

// pack makes a node of a, expiring at expires (unix ns); ok is false when
// a cannot be stored (see Answer.Body, Answer.Meta).
func (c *Cache) pack(a Answer, expires int64) (node, bool) {
	n := node{body: a.Body, expires: expires}
	if len(a.Body) > math.MaxUint16 {
		return n, false
	}
	var okU, okD, okM bool
	n.userOff, n.userLen, okU = locate(a.Body, a.UserID)
	n.deviceOff, n.deviceLen, okD = locate(a.Body, a.DeviceID)
	if !okU || !okD {
		// Not in the body as such (escaped JSON): keep both after it, in
		// the same string. A client picks its device ID, so without this
		// any client could keep its token out of the cache.
		if len(a.UserID) > math.MaxUint8 || len(a.DeviceID) > math.MaxUint8 ||
			len(a.Body)+len(a.UserID)+len(a.DeviceID) > math.MaxUint16 {
			return n, false
		}
		n.body = a.Body + a.UserID + a.DeviceID
		n.userOff, n.userLen = uint16(len(a.Body)), uint8(len(a.UserID))
		n.deviceOff, n.deviceLen = n.userOff+uint16(len(a.UserID)), uint8(len(a.DeviceID))
		n.flags = flagIDsApart
		okU, okD = true, true
	}
	n.meta, okM = c.metaIndex(a.Meta)
	return n, okU && okD && okM
}

func (c *Cache) unpack(n *node, k Kind) Answer {
	return Answer{Kind: k, UserID: n.userID(), DeviceID: n.deviceID(), Body: n.answerBody(), Meta: c.metas[n.meta]}
}

// metaIndex returns the index of m in c.metas, adding it if there is room.
// The metas seen so far are read without a lock: an index is published
// (nmetas) only after its meta is written, and never changes.
func (c *Cache) metaIndex(m any) (uint8, bool) {
	n := int(c.nmetas.Load())
	for i := range n {
		if c.metas[i] == m {
			return uint8(i), true
		}
	}
	c.metaMu.Lock()
	defer c.metaMu.Unlock()
	for i := n; i < int(c.nmetas.Load()); i++ {
		if c.metas[i] == m {
			return uint8(i), true
		}
	}
	n = int(c.nmetas.Load())
	if n == maxMetas {
		return 0, false
	}
	c.metas[n] = m
	c.nmetas.Store(int32(n + 1))
	return uint8(n), true
}

// Cache is safe for concurrent use.
//
// Its answers are spread over shards by key (see shard): a lookup locks
// only its key's shard, and reads the state all shards share (pending
// invalidations, the invalidation sequence) through atomics that only
// invalidations write, so lookups on different cores write no memory in
// common. The bounds (Size positive answers, Size/8 negative ones) hold
// for the whole cache, counted with atomics by fills and removals; a full
// cache evicts from the shard it stores in (keys are keyed hashes: shards
// fill evenly, so their CLOCKs together approximate one LRU).
type Cache struct {
	// Read by every lookup, written rarely.
	shards   []shard
	shift    uint // a key's shard: keyHash(key) >> shift
	now      func() time.Time
	userHash func(string) uint64
	// npending is len(pending): lookups and fills look at pending only
	// while it is not zero.
	npending atomic.Int32
	// metas are the distinct Answer.Meta values, indexed by node.meta;
	// nmetas of them are set.
	metas  [maxMetas]any
	nmetas atomic.Int32

	size, negSize int // bounds of positive and negative answers
	ttl, negTTL   time.Duration
	lookupTimeout time.Duration
	onDrop        func(Reason, int)
	onInvalidate  func(Invalidation)
	// betweenBatches, if set (tests), runs between two batches of a large
	// invalidation, without any lock.
	betweenBatches func()

	// Written by fills and invalidations, kept off the lines above.
	_ [128]byte
	// seq counts invalidations (see log); written under invMu. Misses
	// and fills read it, hits do not.
	seq    atomic.Uint64
	maxTTL atomic.Int64 // ns; 0: none (see SetMaxTTL)
	// variantKeys counts the keys with a Variant held in all shards: while
	// there are none, a token's invalidation concerns one shard only.
	variantKeys atomic.Int64
	// npos and nneg count the answers held in all shards, and those being
	// stored (see shard.add).
	npos, nneg atomic.Int64
	flights    singleflight.Group
	metaMu     sync.Mutex
	// invMu guards pending and log. It is taken after a shard's lock,
	// never before.
	invMu sync.Mutex
	// pending are the invalidations being carried out (see Apply): until
	// they end, Get serves and fill stores no answer they cover.
	pending []*Invalidation
	// log remembers recent invalidations, so a lookup that started before
	// one of them can tell whether its answer is stale (see fill).
	log [invalidationLog]invalidation
}

// maxShards is the most shards a cache has: enough that two or four cores
// seldom want the same shard's lock at once.
const maxShards = 16

// invalidationLog is how many recent invalidations a finishing lookup can
// check itself against. A lookup that saw more than this many go by while it
// was in flight is not stored at all.
const invalidationLog = 1024

// Scope says what an Invalidation drops.
//
// Only ScopeAll drops negative answers. "Unknown" cannot be made wrong by a
// revocation: homeservers do not bring a revoked token back, nor issue one
// a client already sent. A token's invalidation comes from a revocation or
// from a 401 (passive, here or at another replica): in both the token is
// dead, which its negative answers already say. Dropping them would only
// send the next request for the dead token to the homeserver again, and
// replicas sharing a bus would keep emptying each other's negative entries
// with the passive invalidation each lookup publishes.
type Scope uint8

const (
	ScopeToken  Scope = iota + 1 // every positive answer for one token (every variant)
	ScopeDevice                  // every positive answer for a user's device
	ScopeUser                    // every positive answer for a user, but those of a spared token
	ScopeAll                     // everything, negative answers too
	// ScopeDevicesExcept: every positive answer for one of a user's
	// devices that Keep does not name (device-less answers stay).
	ScopeDevicesExcept
)

// Invalidation is one decision to drop answers (see Scope for which). It
// holds Matrix IDs and a token's ID, never a token, so it can be shared with
// other replicas.
type Invalidation struct {
	Scope Scope
	// Token is the token of ScopeToken, or the token ScopeUser spares
	// (zero: none).
	Token    TokenID
	UserID   string
	DeviceID string
	// Keep are the devices ScopeDevicesExcept spares.
	Keep   []string
	Reason Reason
}

type invalidation struct {
	Invalidation
	seq uint64
}

// New returns an empty cache.
func New(cfg Config) (*Cache, error) { return newCache(cfg, maxShards, nil) }

// newCache is New with at most shards shards (a power of two; fewer when
// Size/8 is smaller, so that every shard holds at least one answer of
// each kind) and userHash, if not nil, as the hash of user IDs (tests
// make them collide).
func newCache(cfg Config, shards int, userHash func(string) uint64) (*Cache, error) {
	switch {
	case cfg.Size < 1:
		return nil, errors.New("tokencache: Size must be at least 1")
	case cfg.TTL <= 0:
		return nil, errors.New("tokencache: TTL must be positive")
	case cfg.NegativeTTL < 0:
		return nil, errors.New("tokencache: NegativeTTL must not be negative")
	case cfg.LookupTimeout <= 0:
		return nil, errors.New("tokencache: LookupTimeout must be positive")
	case shards < 1 || shards&(shards-1) != 0:
		return nil, errors.New("tokencache: shards must be a power of two")
	}
	c := &Cache{
		size:          cfg.Size,
		ttl:           cfg.TTL,
		negTTL:        cfg.NegativeTTL,
		lookupTimeout: cfg.LookupTimeout,
		now:           cfg.Now,
		onDrop:        cfg.OnDrop,
		onInvalidate:  cfg.OnInvalidate,
		userHash:      userHash,
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.userHash == nil {
		seed := maphash.MakeSeed()
		c.userHash = func(u string) uint64 { return maphash.String(seed, u) }
	}
	c.negSize = max(cfg.Size/8, 1)
	// Fewer shards in a small cache: a full shard evicts its own answers,
	// and one that holds none of the kind must find another to evict from.
	for shards > 1 && shards > c.negSize {
		shards /= 2
	}
	c.shift = 64
	for n := shards; n > 1; n /= 2 {
		c.shift--
	}
	c.shards = make([]shard, shards)
	for i := range c.shards {
		c.shards[i].init(c, (cfg.Size+shards-1)/shards)
	}
	return c, nil
}

func (c *Cache) shardOf(key Key) *shard {
	return &c.shards[keyHash(key)>>c.shift]
}

// SetMaxTTL caps the lifetime of positive answers stored from now on (0
// lifts the cap): while invalidations from other replicas may be missed, a
// short lifetime bounds the harm.
func (c *Cache) SetMaxTTL(d time.Duration) { c.maxTTL.Store(int64(d)) }

// Len returns the number of answers held, positive and negative.
func (c *Cache) Len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += s.len()
		s.mu.Unlock()
	}
	return n
}

// Get returns the stored answer for key, if there is a live one.
//
// It locks only key's shard and writes nothing else but, the first time an
// answer is read after the eviction hand passed it, one byte of it.
func (c *Cache) Get(key Key) (Answer, Result) {
	now := c.now().UnixNano()
	s := c.shardOf(key)
	s.mu.Lock()
	i := s.get(key)
	if i == 0 {
		s.mu.Unlock()
		return Answer{}, Miss
	}
	n := s.at(i)
	if !n.alive(now) {
		s.dropping = ReasonExpired
		s.drop(i)
		s.flushDrops()
		s.mu.Unlock()
		return Answer{}, Miss
	}
	kind, res := Negative, NegativeHit
	if n.flags&flagPositive != 0 {
		kind, res = Positive, Hit
	}
	if c.npending.Load() != 0 && c.coveredByPending(key, kind == Positive, n.userID(), n.deviceID()) {
		s.mu.Unlock()
		return Answer{}, Miss
	}
	if n.flags&flagRef == 0 {
		n.flags |= flagRef
	}
	a := c.unpack(n, kind)
	s.mu.Unlock()
	return a, res
}

// Resolve returns the answer for key: from the cache, or from fetch, sharing
// one fetch between concurrent callers of the same key. A cacheable answer
// from fetch is stored unless an invalidation that concerns it happened while
// it was in flight. The caller's ctx only bounds its own wait.
func (c *Cache) Resolve(ctx context.Context, key Key, fetch Fetch) (Answer, Result, error) {
	return c.ResolveBound(ctx, key, key, fetch)
}

// ResolveBound is Resolve for a request whose answer may hold only for its
// client: bound is the request's key bound to that client (Hasher.Bind of
// key). Answers with Bound set are stored and found under bound, the others
// under key, where every client finds them. Concurrent callers share a fetch
// only when they share bound, so no client is handed an answer the
// homeserver gave another.
func (c *Cache) ResolveBound(ctx context.Context, key, bound Key, fetch Fetch) (Answer, Result, error) {
	if a, r := c.get2(key, bound); r != Miss {
		return a, r, nil
	}
	seq := c.seq.Load()
	// The flight is named after the bound key and the invalidation sequence:
	// a caller that arrives after an invalidation never joins a lookup that
	// started before it (and may have been answered before it), and callers
	// of different clients never share a lookup whose answer may be bound.
	ch := c.flights.DoChan(flightName(bound, seq), func() (any, error) {
		// A flight that just ended may have filled the key between this
		// caller's Get and DoChan: do not ask the homeserver twice.
		if a, r := c.get2(key, bound); r != Miss {
			return a, nil
		}
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.lookupTimeout)
		defer cancel()
		a, err := fetch(fctx)
		if err != nil {
			return Answer{}, err
		}
		if a.Bound {
			c.fill(bound, seq, a)
		} else {
			c.fill(key, seq, a)
		}
		return a, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return Answer{}, Miss, r.Err
		}
		return r.Val.(Answer), Miss, nil
	case <-ctx.Done():
		return Answer{}, Miss, ctx.Err()
	}
}

// get2 looks key up, then bound if it differs.
func (c *Cache) get2(key, bound Key) (Answer, Result) {
	a, r := c.Get(key)
	if r == Miss && bound != key {
		a, r = c.Get(bound)
	}
	return a, r
}

func flightName(key Key, seq uint64) string {
	var b [len(key.Token) + 16]byte
	n := copy(b[:], key.Token[:])
	binary.LittleEndian.PutUint64(b[n:], key.Variant)
	binary.LittleEndian.PutUint64(b[n+8:], seq)
	return string(b[:])
}

// fill stores a, the answer of a lookup that started when the invalidation
// sequence was at seq, unless an invalidation since then concerns it.
//
// It checks and stores under key's shard lock. An invalidation records
// itself (seq, pending) before it drops anything, and drops under the
// shard locks: so either fill sees it, or fill's store is done before the
// invalidation looks at the shard, and is dropped by it.
func (c *Cache) fill(key Key, seq uint64, a Answer) {
	if a.Kind == Uncacheable || (a.Kind == Negative && c.negTTL == 0) {
		return
	}
	now := c.now()
	var n node
	var ok bool
	if a.Kind == Negative {
		n, ok = c.pack(Answer{Body: a.Body, Meta: a.Meta}, now.Add(c.negTTL).UnixNano())
	} else {
		ttl := c.ttl
		if m := time.Duration(c.maxTTL.Load()); m > 0 && m < ttl {
			ttl = m
		}
		n, ok = c.pack(a, now.Add(ttl).UnixNano())
		n.flags |= flagPositive
	}
	if !ok {
		return
	}
	n.key = key
	s := c.shardOf(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if key.Variant != 0 {
		// Counted before the deadline and the staleness are checked, so
		// that an invalidation or LimitLifetime that finds no variant
		// keys held can skip the other shards (see dropToken).
		c.variantKeys.Add(1)
	}
	if a.Kind == Positive {
		if d, ok := c.deadline(key.Token); ok && d < n.expires {
			n.expires = d
		}
	}
	if !n.alive(now.UnixNano()) || ((c.seq.Load() != seq || c.npending.Load() != 0) && c.stale(key, seq, a)) {
		if key.Variant != 0 {
			c.variantKeys.Add(-1)
		}
		return
	}
	// A key holds one answer: a refill of a live key (two lookups on
	// either side of an unrelated invalidation), or an answer of the other
	// kind, replaces it without counting a drop.
	old := s.get(key)
	if old != 0 {
		s.remove(old)
	}
	if !s.add(n) {
		if key.Variant != 0 {
			c.variantKeys.Add(-1)
		}
		if old != 0 {
			// No room for the new answer (see shard.add): the old one is
			// gone all the same, pushed out.
			s.dropping = ReasonCapacity
			s.dropped++
			s.flushDrops()
		}
	}
}

// deadline returns the end of life announced for token, if any. Called
// with any shard's lock held (deadlinesMu is taken last).
func (c *Cache) deadline(token TokenID) (int64, bool) {
	ds := c.shardOf(Key{Token: token})
	ds.deadlinesMu.Lock()
	defer ds.deadlinesMu.Unlock()
	return ds.deadlines.Peek(token)
}

// stale reports whether an invalidation after seq, or a pending one,
// concerns an answer a stored under key.
func (c *Cache) stale(key Key, seq uint64, a Answer) bool {
	positive := a.Kind == Positive
	c.invMu.Lock()
	defer c.invMu.Unlock()
	// "Unknown" cannot be made wrong by a revocation: homeservers do not
	// bring a revoked token back, nor issue one a client already sent. So
	// only positive answers are checked against the log.
	if now := c.seq.Load(); positive {
		if now-seq > invalidationLog {
			return true // too much happened to tell: do not store
		}
		for s := seq + 1; s <= now; s++ {
			if covers(&c.log[s%invalidationLog].Invalidation, key, true, a.UserID, a.DeviceID) {
				return true
			}
		}
	}
	return c.coveredByPendingLocked(key, positive, a.UserID, a.DeviceID)
}

// InvalidateToken drops every positive answer for a token (all masquerade
// and client-bound variants) and returns how many there were. Negative
// answers stay: the token is still unknown (see Scope).
func (c *Cache) InvalidateToken(id TokenID, reason Reason) int {
	return c.invalidate(Invalidation{Scope: ScopeToken, Token: id, Reason: reason})
}

// InvalidateDevice drops every positive answer for a user's device.
func (c *Cache) InvalidateDevice(userID, deviceID string, reason Reason) int {
	return c.invalidate(Invalidation{Scope: ScopeDevice, UserID: userID, DeviceID: deviceID, Reason: reason})
}

// InvalidateUser drops every positive answer for a user, except those for
// the token spare (pass the zero TokenID to spare none).
func (c *Cache) InvalidateUser(userID string, spare TokenID, reason Reason) int {
	return c.invalidate(Invalidation{Scope: ScopeUser, UserID: userID, Token: spare, Reason: reason})
}

// InvalidateDevicesExcept drops every positive answer for a device of the
// user that keep does not name; answers without a device stay. A keep
// list longer than maxKeep drops the whole user instead: the log of recent
// invalidations holds what it is given, and must stay small.
func (c *Cache) InvalidateDevicesExcept(userID string, keep []string, reason Reason) int {
	if len(keep) > maxKeep {
		return c.InvalidateUser(userID, TokenID{}, reason)
	}
	return c.invalidate(Invalidation{Scope: ScopeDevicesExcept, UserID: userID, Keep: slices.Clone(keep), Reason: reason})
}

// maxKeep bounds the devices an invalidation spares.
const maxKeep = 32

// Flush drops every answer: the answer when the caller cannot tell whose
// entries a revocation concerned.
func (c *Cache) Flush(reason Reason) int {
	return c.invalidate(Invalidation{Scope: ScopeAll, Reason: reason})
}

func (c *Cache) invalidate(inv Invalidation) int {
	n := c.Apply(inv)
	if c.onInvalidate != nil {
		c.onInvalidate(inv)
	}
	return n
}

// Apply carries out an invalidation without telling OnInvalidate: for
// invalidations decided elsewhere (another replica). It returns how many
// answers it dropped. Like every invalidation, it also keeps lookups in
// flight from storing answers it concerns.
//
// Its work is linear in the keys indexed under the token or user it
// concerns (in each shard, a user's ring; a token's variants), and it
// never holds a lock for more than invalidationBatch of them: a bridge's
// token with 100,000 masquerades is dropped in batches while other
// requests go on. An invalidation that may concern more than one shard is
// pending until the last batch is done: Get serves no answer it covers
// and no lookup stores one, so dropping shard by shard, in batches, is
// never seen from outside.
func (c *Cache) Apply(inv Invalidation) int {
	c.invMu.Lock()
	seq := c.seq.Load() + 1
	c.log[seq%invalidationLog] = invalidation{inv, seq}
	c.seq.Store(seq)
	c.invMu.Unlock()
	switch inv.Scope {
	case ScopeAll:
		return c.purge(&inv)
	case ScopeToken:
		return c.dropToken(&inv)
	case ScopeDevice, ScopeUser, ScopeDevicesExcept:
		return c.dropUser(&inv)
	}
	return 0
}

// invalidationBatch is the most keys an invalidation visits per hold of a
// shard's lock.
const invalidationBatch = 500

// batches counts the keys an invalidation visited, across shards, and
// pauses it every invalidationBatch of them.
type batches struct {
	c       *Cache
	reason  Reason
	visited int
}

// step counts a visited key, and pauses between batches: s's drops are
// reported and its lock let go for a moment. Called with s.mu held.
func (b *batches) step(s *shard) {
	if b.visited++; b.visited%invalidationBatch != 0 {
		return
	}
	s.flushDrops()
	s.mu.Unlock()
	if b.c.betweenBatches != nil {
		b.c.betweenBatches()
	}
	s.mu.Lock()
	s.dropping = b.reason
}

// dropToken drops the answers of a token: its plain key in one shard, and
// its variants (masquerades, bound keys, aspects) wherever their keys fell.
func (c *Cache) dropToken(inv *Invalidation) int {
	plain := Key{Token: inv.Token}
	ps := c.shardOf(plain)
	// inv is in the log already: a fill that has not counted its variant
	// key by now will find it there (see fill).
	if c.variantKeys.Load() == 0 {
		ps.mu.Lock()
		ps.dropping = inv.Reason
		n := ps.dropIfCovered(inv, plain)
		ps.flushDrops()
		ps.mu.Unlock()
		return n
	}
	c.addPending(inv)
	defer c.endPending(inv)
	b := batches{c: c, reason: inv.Reason}
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		s.dropping = inv.Reason
		small, big := s.variants.get(inv.Token)
		if s == ps {
			small = append(small, plain)
		}
		for _, k := range small {
			n += s.dropIfCovered(inv, k)
		}
		// big is walked across lock releases: every access to it, the
		// range's steps included, happens with s.mu held, and Go defines
		// ranging over a map that changes between steps (a key removed
		// before it is reached is not produced; every key present
		// throughout is). Keys added meanwhile are not covered (pending
		// keeps covered ones out) and are checked anyway.
		for k := range big {
			n += s.dropIfCovered(inv, k)
			b.step(s)
		}
		s.flushDrops()
		s.mu.Unlock()
	}
	return n
}

// dropUser drops the answers inv covers from the user's ring in every
// shard.
func (c *Cache) dropUser(inv *Invalidation) int {
	c.addPending(inv)
	defer c.endPending(inv)
	h := c.userHash(inv.UserID)
	b := batches{c: c, reason: inv.Reason}
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		s.dropping = inv.Reason
		n += s.dropUser(inv, h, &b)
		s.flushDrops()
		s.mu.Unlock()
	}
	return n
}

// dropUser walks the ring of hash h once, dropping what inv covers. Called
// with mu held and s.dropping set; b may let go of mu between batches.
//
// The walk starts at the ring's head and visits as many nodes as the ring
// held then. It stays correct across pauses: new nodes go in before the
// head, which is always behind the walk (so they come after every node
// not visited yet, and are not covered: inv is pending); a node removed
// meanwhile moves the paused walk's cursor on (unlinkUser).
func (s *shard) dropUser(inv *Invalidation, h uint64, b *batches) int {
	r, ok := s.users[h]
	if !ok {
		return 0
	}
	n := 0
	cur := r.head
	for left := r.n; left > 0 && cur != 0; left-- {
		s.steps++
		nd := s.at(cur)
		next := nd.unext
		if next == cur {
			next = 0
		}
		if covers(inv, nd.key, true, nd.userID(), nd.deviceID()) {
			s.drop(cur)
			n++
		}
		cur = next
		if left > 1 && cur != 0 && (b.visited+1)%invalidationBatch == 0 {
			p := new(uint32)
			*p = cur
			s.cursors = append(s.cursors, p)
			b.step(s)
			cur = *p
			s.cursors = slices.DeleteFunc(s.cursors, func(q *uint32) bool { return q == p })
		} else {
			b.visited++
		}
	}
	return n
}

// dropIfCovered drops what is held under k if inv covers it, and returns how
// many answers that was (0 or 1). Called with mu held and s.dropping set.
func (s *shard) dropIfCovered(inv *Invalidation, k Key) int {
	i := s.get(k)
	if i == 0 {
		return 0
	}
	n := s.at(i)
	if !covers(inv, k, n.flags&flagPositive != 0, n.userID(), n.deviceID()) {
		return 0
	}
	s.drop(i)
	return 1
}

// covers reports whether inv concerns an answer held under key (positive,
// for user and device, or negative): the one rule for what an invalidation
// drops, what a pending one hides and which lookups it makes stale.
func covers(inv *Invalidation, key Key, positive bool, user, device string) bool {
	switch inv.Scope {
	case ScopeAll:
		return true
	case ScopeToken:
		return positive && key.Token == inv.Token // negative answers stay: see Scope
	case ScopeDevice:
		return positive && user == inv.UserID && device == inv.DeviceID
	case ScopeUser:
		return positive && user == inv.UserID && (inv.Token == TokenID{} || key.Token != inv.Token)
	case ScopeDevicesExcept:
		return positive && user == inv.UserID && device != "" && !slices.Contains(inv.Keep, device)
	}
	return false
}

// coveredByPending reports whether a pending invalidation covers an answer
// under key.
func (c *Cache) coveredByPending(key Key, positive bool, user, device string) bool {
	c.invMu.Lock()
	defer c.invMu.Unlock()
	return c.coveredByPendingLocked(key, positive, user, device)
}

// coveredByPendingLocked is coveredByPending with invMu held.
func (c *Cache) coveredByPendingLocked(key Key, positive bool, user, device string) bool {
	for _, inv := range c.pending {
		if covers(inv, key, positive, user, device) {
			return true
		}
	}
	return false
}

// addPending makes inv pending (see Apply). Called with no lock held, or
// a shard's.
func (c *Cache) addPending(inv *Invalidation) {
	c.invMu.Lock()
	c.pending = append(c.pending, inv)
	c.npending.Add(1)
	c.invMu.Unlock()
}

// endPending removes inv from the pending invalidations.
func (c *Cache) endPending(inv *Invalidation) {
	c.invMu.Lock()
	defer c.invMu.Unlock()
	for i, p := range c.pending {
		if p == inv {
			c.pending = slices.Delete(c.pending, i, i+1)
			c.npending.Add(-1)
			return
		}
	}
}

// purge drops every answer, each shard at once: its storage and indexes
// are replaced, not emptied one entry at a time.
func (c *Cache) purge(inv *Invalidation) int {
	c.addPending(inv)
	defer c.endPending(inv)
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += s.purge(inv.Reason)
		s.mu.Unlock()
	}
	return n
}

// LimitLifetime records that the homeserver will stop honouring a token at
// notAfter (a login, registration or refresh said expires_in_ms). No answer
// for that token, held now or stored later, outlives it.
func (c *Cache) LimitLifetime(id TokenID, notAfter time.Time) {
	d := notAfter.UnixNano()
	plain := Key{Token: id}
	ps := c.shardOf(plain)
	ps.deadlinesMu.Lock()
	ps.deadlines.Add(id, d)
	ps.deadlinesMu.Unlock()
	// A fill that did not see the deadline stores before its shard is
	// looked at below (it holds the shard's lock from reading the deadline
	// to storing), and counted its variant key before that (see fill).
	limit := func(s *shard, k Key) {
		if i := s.get(k); i != 0 {
			if n := s.at(i); n.flags&flagPositive != 0 && d < n.expires {
				n.expires = d
			}
		}
	}
	ps.mu.Lock()
	limit(ps, plain)
	ps.mu.Unlock()
	if c.variantKeys.Load() == 0 {
		return
	}
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		small, big := s.variants.get(id)
		for _, k := range small {
			limit(s, k)
		}
		for k := range big {
			limit(s, k)
		}
		s.mu.Unlock()
	}
}

// Reasons of invalidations decided by another replica (package bus).
const (
	// ReasonBus labels invalidations decided by another replica. Their own
	// reason is not used as a label: it comes off the network, and labels
	// must stay a small fixed set.
	ReasonBus Reason = "bus"
	// ReasonBusResync labels flushes made because invalidations may have
	// been missed: the subscription came back after a gap, the bus stayed
	// down longer than its down TTL, or a peer lost some of its own.
	ReasonBusResync Reason = "bus_resync"
)

// ReasonUnknownToken labels passive invalidations: the homeserver answered
// 401 for a token, so whatever was held for it goes. Package bus tells them
// from explicit revocations by this reason (they may be coalesced, and
// dropped first under overload), so callers must use this value for them.
const ReasonUnknownToken Reason = "unknown_token"
