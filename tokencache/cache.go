// Package tokencache remembers what the homeserver said about access tokens,
// and forgets it as soon as anything may have made that answer wrong.
//
// It holds answers (positive: the token is user U's on device D; negative:
// the token is unknown), each under a Key derived from a keyed hash of the
// token, never the token itself. Answers expire per entry, can be dropped by
// token, by user+device or by user, and concurrent misses for one key share
// one lookup. A lookup that was in flight while an invalidation that concerns
// its answer happened never stores that answer. An answer that holds only for
// the client that got it (the caller says so, Answer.Bound) is stored under
// a key bound to that client (Hasher.Bind) and served to no other.
// Invalidation costs time linear in what it drops, and a large one yields
// the lock between batches.
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
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
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
	// Body is the homeserver's response body. For a positive answer it
	// must contain UserID and DeviceID verbatim (as a whoami body does):
	// the stored answer keeps only the body and where in it they are, so a
	// cached token costs little more than its body. Answers whose body does
	// not, or is over 64 KiB, are not stored.
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
	// Size is the most positive answers held. Negative answers are held in a
	// separate LRU of Size/8 (at least 1), so that a spray of made-up tokens
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
	// called with the cache's lock held: keep it quick and do not call back.
	OnDrop func(reason Reason, n int)
	// OnInvalidate, if set, is told of every invalidation made through the
	// Invalidate methods and Flush (not Apply), after it took effect: the
	// hook for sharing them with other replicas.
	OnInvalidate func(Invalidation)
}

// Fetch asks the homeserver about a token. ctx is bounded by LookupTimeout.
// An error is never cached.
type Fetch func(ctx context.Context) (Answer, error)

// entry is a stored answer, packed into 32 bytes: at a million tokens every
// byte counts, and the LRU's own node carries it by value. UserID and
// DeviceID are spans of the body, which holds them anyway (a Matrix user ID
// is at most 255 bytes; longer IDs are not stored); Meta is an index into
// the cache's few distinct metas.
type entry struct {
	body               string
	expires            int64 // unix nanoseconds
	userOff, deviceOff uint16
	userLen, deviceLen uint8
	meta               uint8
}

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

func (e *entry) userID() string {
	return e.body[e.userOff : int(e.userOff)+int(e.userLen)]
}

func (e *entry) deviceID() string {
	return e.body[e.deviceOff : int(e.deviceOff)+int(e.deviceLen)]
}

// maxMetas bounds the distinct Answer.Meta values the cache holds (the
// proxy interns its replayed headers, so it has a handful).
const maxMetas = 256

// pack makes an entry of a, expiring at expires (unix ns); ok is false when
// a cannot be stored (see Answer.Body, Answer.Meta). Called with mu held.
func (c *Cache) pack(a Answer, expires int64) (entry, bool) {
	e := entry{body: a.Body, expires: expires}
	if len(a.Body) > math.MaxUint16 {
		return e, false
	}
	var okU, okD, okM bool
	e.userOff, e.userLen, okU = locate(a.Body, a.UserID)
	e.deviceOff, e.deviceLen, okD = locate(a.Body, a.DeviceID)
	e.meta, okM = c.metaIndex(a.Meta)
	return e, okU && okD && okM
}

func (c *Cache) unpack(e entry, k Kind) Answer {
	return Answer{Kind: k, UserID: e.userID(), DeviceID: e.deviceID(), Body: e.body, Meta: c.metas[e.meta]}
}

// metaIndex returns the index of m in c.metas, adding it if there is room.
// Called with mu held.
func (c *Cache) metaIndex(m any) (uint8, bool) {
	for i, x := range c.metas {
		if x == m {
			return uint8(i), true
		}
	}
	if len(c.metas) == maxMetas {
		return 0, false
	}
	c.metas = append(c.metas, m)
	return uint8(len(c.metas) - 1), true
}

// alive reports whether e is still good at now (unix ns).
func alive(e entry, now int64) bool { return now < e.expires }

// Cache is safe for concurrent use.
type Cache struct {
	size          int
	ttl, negTTL   time.Duration
	lookupTimeout time.Duration
	now           func() time.Time
	onDrop        func(Reason, int)
	onInvalidate  func(Invalidation)

	flights singleflight.Group
	maxTTL  atomic.Int64 // ns; 0: none (see SetMaxTTL)

	mu  sync.Mutex
	pos *simplelru.LRU[Key, entry]
	neg *simplelru.LRU[Key, entry] // nil when NegativeTTL is 0
	// users indexes positive entries by user ID (for per-device and per-user
	// invalidation); variants indexes the masqueraded and bound keys of a
	// token (plain keys need no index: Key{Token: id} finds them). Both only
	// ever hold keys that are in pos or neg, so Size bounds them too.
	users    keySets[string]
	variants keySets[TokenID]
	// pending are the invalidations being carried out in batches (see
	// Apply): until they end, Get serves and fill stores no answer they
	// cover.
	pending []*Invalidation
	// betweenBatches, if set (tests), runs between two batches of a large
	// invalidation, without the lock.
	betweenBatches func()
	// deadlines remembers the end of life the homeserver announced for a
	// token (expires_in_ms) before that token is ever looked up.
	deadlines *simplelru.LRU[TokenID, int64]
	// metas are the distinct Answer.Meta values, indexed by entry.meta.
	metas []any
	// dropping is the reason given to the LRU eviction callback: capacity
	// unless an invalidation is under way.
	dropping Reason
	dropped  int
	// replacing tells the eviction callback that clearKey is at work.
	replacing bool
	// log remembers recent invalidations, so a lookup that started before
	// one of them can tell whether its answer is stale (see fill).
	seq uint64
	log [invalidationLog]invalidation
}

// invalidationLog is how many recent invalidations a finishing lookup can
// check itself against. A lookup that saw more than this many go by while it
// was in flight is not stored at all.
const invalidationLog = 1024

// Scope says what an Invalidation drops.
type Scope uint8

const (
	ScopeToken  Scope = iota + 1 // every answer for one token
	ScopeDevice                  // every positive answer for a user's device
	ScopeUser                    // every positive answer for a user, but those of a spared token
	ScopeAll                     // everything
	// ScopeDevicesExcept: every positive answer for one of a user's
	// devices that Keep does not name (device-less answers stay).
	ScopeDevicesExcept
)

// Invalidation is one decision to drop answers. It holds Matrix IDs and a
// token's ID, never a token, so it can be shared with other replicas.
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
func New(cfg Config) (*Cache, error) {
	switch {
	case cfg.Size < 1:
		return nil, errors.New("tokencache: Size must be at least 1")
	case cfg.TTL <= 0:
		return nil, errors.New("tokencache: TTL must be positive")
	case cfg.NegativeTTL < 0:
		return nil, errors.New("tokencache: NegativeTTL must not be negative")
	case cfg.LookupTimeout <= 0:
		return nil, errors.New("tokencache: LookupTimeout must be positive")
	}
	c := &Cache{
		size:          cfg.Size,
		ttl:           cfg.TTL,
		negTTL:        cfg.NegativeTTL,
		lookupTimeout: cfg.LookupTimeout,
		now:           cfg.Now,
		onDrop:        cfg.OnDrop,
		onInvalidate:  cfg.OnInvalidate,
		users:         newKeySets[string](),
		variants:      newKeySets[TokenID](),
		dropping:      ReasonCapacity,
	}
	if c.now == nil {
		c.now = time.Now
	}
	var err error
	if c.pos, err = simplelru.NewLRU(cfg.Size, c.evicted); err != nil {
		return nil, err
	}
	if cfg.NegativeTTL > 0 {
		if c.neg, err = simplelru.NewLRU(max(cfg.Size/8, 1), c.evicted); err != nil {
			return nil, err
		}
	}
	if c.deadlines, err = simplelru.NewLRU[TokenID, int64](cfg.Size, nil); err != nil {
		return nil, err
	}
	return c, nil
}

// SetMaxTTL caps the lifetime of positive answers stored from now on (0
// lifts the cap): while invalidations from other replicas may be missed, a
// short lifetime bounds the harm.
func (c *Cache) SetMaxTTL(d time.Duration) { c.maxTTL.Store(int64(d)) }

// Len returns the number of answers held, positive and negative.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.pos.Len()
	if c.neg != nil {
		n += c.neg.Len()
	}
	return n
}

// Get returns the stored answer for key, if there is a live one.
func (c *Cache) Get(key Key) (Answer, Result) {
	now := c.now().UnixNano()
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.pos.Get(key); ok {
		if !alive(e, now) {
			c.remove(c.pos, key, ReasonExpired)
		} else if len(c.pending) == 0 || !c.coveredByPending(key, true, e.userID(), e.deviceID()) {
			return c.unpack(e, Positive), Hit
		}
	}
	if c.neg != nil {
		if e, ok := c.neg.Get(key); ok {
			if !alive(e, now) {
				c.remove(c.neg, key, ReasonExpired)
			} else if len(c.pending) == 0 || !c.coveredByPending(key, false, "", "") {
				return c.unpack(e, Negative), NegativeHit
			}
		}
	}
	return Answer{}, Miss
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
	c.mu.Lock()
	seq := c.seq
	c.mu.Unlock()
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
func (c *Cache) fill(key Key, seq uint64, a Answer) {
	if a.Kind == Uncacheable || (a.Kind == Negative && c.neg == nil) {
		return
	}
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stale(key, seq, a) || (len(c.pending) > 0 && c.coveredByPending(key, a.Kind == Positive, a.UserID, a.DeviceID)) {
		return
	}
	if a.Kind == Negative {
		e, ok := c.pack(Answer{Body: a.Body, Meta: a.Meta}, now.Add(c.negTTL).UnixNano())
		if !ok {
			return
		}
		c.clearKey(key)
		c.neg.Add(key, e)
		c.indexVariant(key)
		c.flushDrops()
		return
	}
	ttl := c.ttl
	if m := time.Duration(c.maxTTL.Load()); m > 0 && m < ttl {
		ttl = m
	}
	expires := now.Add(ttl).UnixNano()
	if d, ok := c.deadlines.Peek(key.Token); ok && d < expires {
		expires = d
	}
	e, ok := c.pack(a, expires)
	if !ok || !alive(e, now.UnixNano()) {
		return
	}
	c.clearKey(key)
	c.pos.Add(key, e)
	if user := e.userID(); user != "" {
		c.users.add(user, key)
	}
	c.indexVariant(key)
	c.flushDrops()
}

// stale reports whether an invalidation after seq concerns an answer a
// stored under key. Called with mu held.
func (c *Cache) stale(key Key, seq uint64, a Answer) bool {
	if a.Kind == Negative {
		// "Unknown" cannot be made wrong by a revocation: homeservers do not
		// bring a revoked token back, nor issue one a client already sent.
		return false
	}
	if c.seq-seq > invalidationLog {
		return true // too much happened to tell: do not store
	}
	for s := seq + 1; s <= c.seq; s++ {
		if covers(&c.log[s%invalidationLog].Invalidation, key, true, a.UserID, a.DeviceID) {
			return true
		}
	}
	return false
}

func (c *Cache) indexVariant(key Key) {
	if key.Variant != 0 {
		c.variants.add(key.Token, key)
	}
}

// evicted is the LRUs' eviction callback: it keeps the indexes in step and
// counts the drop. Called with mu held.
func (c *Cache) evicted(key Key, e entry) {
	if c.replacing {
		return
	}
	c.unindex(key, e)
	c.dropped++
	if c.dropping == ReasonCapacity {
		// Capacity evictions happen inside Add; report them one by one.
		c.flushDrops()
	}
}

// clearKey takes out what is held under key before a new answer is stored
// there, without counting it as dropped: a refill of a live key (two lookups
// on either side of an unrelated invalidation), or an answer of the other
// kind. A key holds one answer, in one LRU, so the indexes (sets) hold it
// once. Called with mu held.
func (c *Cache) clearKey(key Key) {
	for _, lru := range [...]*simplelru.LRU[Key, entry]{c.pos, c.neg} {
		if lru == nil {
			continue
		}
		if old, ok := lru.Peek(key); ok {
			c.unindex(key, old)
			c.replacing = true
			lru.Remove(key)
			c.replacing = false
		}
	}
}

// unindex removes key, holding e, from the indexes. Called with mu held.
func (c *Cache) unindex(key Key, e entry) {
	if user := e.userID(); user != "" {
		c.users.remove(user, key)
	}
	if key.Variant != 0 {
		c.variants.remove(key.Token, key)
	}
}

// remove drops key from lru for reason. Called with mu held.
func (c *Cache) remove(lru *simplelru.LRU[Key, entry], key Key, reason Reason) {
	c.dropping = reason
	lru.Remove(key)
	c.flushDrops()
}

// flushDrops reports the drops counted so far. Called with mu held.
func (c *Cache) flushDrops() {
	if c.dropped > 0 && c.onDrop != nil {
		c.onDrop(c.dropping, c.dropped)
	}
	c.dropped = 0
	c.dropping = ReasonCapacity
}

// InvalidateToken drops every answer for a token (all masquerade variants)
// and returns how many there were.
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
// concerns, and it never holds the cache's lock for more than
// invalidationBatch of them: a bridge's token with 100,000 masquerades is
// dropped in batches while other requests go on. Until the last batch is
// done the invalidation is pending: Get serves no answer it covers and no
// lookup stores one, so dropping in batches is never seen from outside.
func (c *Cache) Apply(inv Invalidation) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	c.log[c.seq%invalidationLog] = invalidation{inv, c.seq}
	if inv.Scope == ScopeAll {
		return c.purge(inv.Reason)
	}
	var small []Key
	var big map[Key]struct{}
	switch inv.Scope {
	case ScopeToken:
		small, big = c.variants.get(inv.Token)
		small = append(small, Key{Token: inv.Token})
	case ScopeDevice, ScopeUser, ScopeDevicesExcept:
		small, big = c.users.get(inv.UserID)
	}
	c.dropping = inv.Reason
	n := 0
	for _, k := range small {
		n += c.dropIfCovered(&inv, k)
	}
	batched := len(big) > invalidationBatch
	if batched {
		c.pending = append(c.pending, &inv)
		defer c.endPending(&inv)
	}
	visited := 0
	// big is walked across lock releases: every access to it, the range's
	// steps included, happens with c.mu held, and Go defines ranging over a
	// map that changes between steps (a key removed before it is reached is
	// not produced; every key present throughout is). Keys added meanwhile
	// are not covered (pending keeps covered ones out) and are checked
	// anyway.
	for k := range big {
		n += c.dropIfCovered(&inv, k)
		if visited++; batched && visited%invalidationBatch == 0 {
			c.flushDrops()
			c.mu.Unlock()
			if c.betweenBatches != nil {
				c.betweenBatches()
			}
			c.mu.Lock()
			c.dropping = inv.Reason
		}
	}
	c.flushDrops()
	return n
}

// invalidationBatch is the most keys an invalidation visits per hold of the
// cache's lock.
const invalidationBatch = 500

// dropIfCovered drops what is held under k if inv covers it, and returns how
// many answers that was (0, 1 or 2). Called with mu held and c.dropping set.
func (c *Cache) dropIfCovered(inv *Invalidation, k Key) int {
	n := 0
	if e, ok := c.pos.Peek(k); ok && covers(inv, k, true, e.userID(), e.deviceID()) {
		c.pos.Remove(k)
		n++
	}
	if inv.Scope == ScopeToken && c.neg != nil && c.neg.Remove(k) {
		n++
	}
	return n
}

// covers reports whether inv concerns an answer held under key (positive,
// for user and device, or negative): the one rule for what an invalidation
// drops, what a pending one hides and which lookups it makes stale.
func covers(inv *Invalidation, key Key, positive bool, user, device string) bool {
	switch inv.Scope {
	case ScopeAll:
		return true
	case ScopeToken:
		return key.Token == inv.Token
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
// under key. Called with mu held.
func (c *Cache) coveredByPending(key Key, positive bool, user, device string) bool {
	for _, inv := range c.pending {
		if covers(inv, key, positive, user, device) {
			return true
		}
	}
	return false
}

// endPending removes inv from the pending invalidations. Called with mu held.
func (c *Cache) endPending(inv *Invalidation) {
	for i, p := range c.pending {
		if p == inv {
			c.pending = append(c.pending[:i], c.pending[i+1:]...)
			return
		}
	}
}

// purge drops every answer in constant time: the LRUs and indexes are
// replaced, not emptied one entry at a time. Called with mu held.
func (c *Cache) purge(reason Reason) int {
	n := c.pos.Len()
	c.pos, _ = simplelru.NewLRU(c.size, c.evicted)
	if c.neg != nil {
		n += c.neg.Len()
		c.neg, _ = simplelru.NewLRU(max(c.size/8, 1), c.evicted)
	}
	c.users, c.variants = newKeySets[string](), newKeySets[TokenID]()
	c.dropping, c.dropped = reason, n
	c.flushDrops()
	return n
}

// LimitLifetime records that the homeserver will stop honouring a token at
// notAfter (a login, registration or refresh said expires_in_ms). No answer
// for that token, held now or stored later, outlives it.
func (c *Cache) LimitLifetime(id TokenID, notAfter time.Time) {
	d := notAfter.UnixNano()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadlines.Add(id, d)
	limit := func(k Key) {
		if e, ok := c.pos.Peek(k); ok && d < e.expires {
			e.expires = d
			c.pos.Add(k, e)
		}
	}
	limit(Key{Token: id})
	small, big := c.variants.get(id)
	for _, k := range small {
		limit(k)
	}
	for k := range big {
		limit(k)
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
