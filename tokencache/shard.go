package tokencache

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// node is one stored answer, in a shard's slab. At a million tokens every
// byte counts: 72 bytes hold the key, the answer, its place in the
// recency list and its place in its user's ring. Nodes are named by their
// index in the slab (0: none), so links cost 4 bytes, not 8, and the GC
// sees one object per chunk of nodes, not one per node.
//
// UserID and DeviceID are spans of the body, which holds them anyway (a
// Matrix user ID is at most 255 bytes; longer IDs are not stored); meta is
// an index into the cache's few distinct metas.
type node struct {
	key                Key
	body               string
	expires            int64  // unix nanoseconds
	prev, next         uint32 // recency list (or, free, the free list)
	uprev, unext       uint32 // user ring
	userOff, deviceOff uint16
	userLen, deviceLen uint8
	meta               uint8
	flags              uint8
}

const (
	flagPositive uint8 = 1 << iota // on the positive list (else negative)
	flagRef                        // read since the eviction hand last passed
	flagIDsApart                   // user and device IDs follow the answer's body in body
)

// answerBody returns the homeserver's body (see Cache.pack).
func (n *node) answerBody() string {
	if n.flags&flagIDsApart != 0 {
		return n.body[:int(n.userOff)]
	}
	return n.body
}

func (n *node) userID() string {
	return n.body[n.userOff : int(n.userOff)+int(n.userLen)]
}

func (n *node) deviceID() string {
	return n.body[n.deviceOff : int(n.deviceOff)+int(n.deviceLen)]
}

// alive reports whether n is still good at now (unix ns).
func (n *node) alive(now int64) bool { return now < n.expires }

// list is a recency list of nodes (most recent at head).
type list struct {
	head, tail uint32
	n          int
}

// ring is a user's ring of positive nodes in one shard: users are found by
// a hash of their ID, so a ring may hold the nodes of several users whose
// IDs collide; every walk compares the user ID itself.
type ring struct {
	head, n uint32
}

// shard holds the answers for the keys whose hash falls in it, under its own
// lock: lookups of keys in different shards share no memory they write.
//
// Storage: nodes live in chunks of a slab (no per-answer allocation, no
// append-doubling: a chunk is added when the slab is full, and the slab
// never holds more than the shard's bounds); the key → node table is open
// addressing with linear probing over node indexes (4 bytes a slot, where a
// Go map of Key to index costs ~40).
//
// Recency is CLOCK (second chance), an approximate LRU: a hit only sets the
// node's flagRef if it is not set yet, and eviction moves referenced nodes
// from the tail back to the head (clearing the flag) until it finds one
// that was not read since. Hits thus write nothing but the shard's lock
// and, once per pass of the hand, one byte of the node.
type shard struct {
	mu sync.Mutex

	table  []uint32 // node indexes; 0 empty; len a power of two
	keys   int      // nodes in table
	chunks [][]node
	bits   uint   // log2 of a chunk's nodes
	top    uint32 // next never-used index
	free   uint32 // free list, through node.next

	pos, neg list
	// users: hash of user ID → the ring of positive nodes of that user
	// (and of users colliding with it). variants indexes the masqueraded
	// and bound keys of a token (plain keys need no index). Both only hold
	// keys that are in the shard, so its bounds bound them too.
	users    map[uint64]ring
	variants keySets[TokenID]
	// deadlines remembers the end of life the homeserver announced for a
	// token (expires_in_ms) before that token is ever looked up. A token's
	// deadline lives in the shard of its plain key, under deadlinesMu: a
	// lock taken last, never held while taking another, so a fill in any
	// shard may read it.
	deadlinesMu sync.Mutex
	deadlines   *simplelru.LRU[TokenID, int64]

	// cursors are the positions of user walks paused between batches:
	// unlinking a node they point at moves them on (see dropUser).
	cursors []*uint32

	// dropping is the reason drops are counted under; dropped counts them
	// until flushDrops reports them.
	dropping Reason
	dropped  int
	// steps counts the index work (ring and variant links looked at): tests
	// assert it is linear in what is added and removed.
	steps uint64

	c *Cache
	// Pad to keep the next shard's lock and table off this one's cache
	// lines (two cores taking different shards' locks would otherwise
	// still bounce one line between them).
	_ [128]byte
}

// init readies a shard expected to hold about share of the cache's
// answers.
func (s *shard) init(c *Cache, share int) {
	s.c = c
	s.deadlines, _ = simplelru.NewLRU[TokenID, int64](max(share, 1), nil)
	// A chunk holds up to 1,024 nodes (72 KiB), fewer in a small shard:
	// a shard's slab wastes at most one chunk's spare nodes.
	for s.bits < 10 && 1<<s.bits < share+1 {
		s.bits++
	}
	s.reset()
}

// reset empties the shard's answers (not its deadlines). Called with mu
// held, or before the shard is shared.
func (s *shard) reset() {
	s.table = make([]uint32, 8)
	s.keys = 0
	s.chunks = nil
	s.top, s.free = 1, 0 // index 0 means none
	s.pos.head, s.pos.tail, s.pos.n = 0, 0, 0
	s.neg.head, s.neg.tail, s.neg.n = 0, 0, 0
	s.users = make(map[uint64]ring)
	s.variants = newKeySets[TokenID]()
	for _, p := range s.cursors {
		*p = 0
	}
}

func (s *shard) at(i uint32) *node {
	return &s.chunks[i>>s.bits][i&(1<<s.bits-1)]
}

func (s *shard) alloc() uint32 {
	if i := s.free; i != 0 {
		s.free = s.at(i).next
		return i
	}
	i := s.top
	s.top++
	if int(i>>s.bits) == len(s.chunks) {
		s.chunks = append(s.chunks, make([]node, 1<<s.bits))
	}
	return i
}

// keyHash spreads a key over shards (top bits) and table slots (bottom
// bits). Key.Token is already a keyed hash; the variant, a keyed hash too,
// is mixed in so that a token's many variants do not share a slot.
func keyHash(k Key) uint64 {
	return binary.LittleEndian.Uint64(k.Token[:8]) ^ k.Variant*0x9E3779B97F4A7C15
}

// find returns the table slot of k and the node there (0: k is absent and
// slot is where it would go).
func (s *shard) find(k Key) (slot int, i uint32) {
	mask := len(s.table) - 1
	for j := int(keyHash(k)) & mask; ; j = (j + 1) & mask {
		i := s.table[j]
		if i == 0 || s.at(i).key == k {
			return j, i
		}
	}
}

// get returns the node of k, or 0.
func (s *shard) get(k Key) uint32 {
	_, i := s.find(k)
	return i
}

// insert puts node i, whose key is absent, into the table.
func (s *shard) insert(i uint32) {
	if (s.keys+1)*4 > len(s.table)*3 {
		old := s.table
		s.table = make([]uint32, 2*len(old))
		for _, x := range old {
			if x != 0 {
				slot, _ := s.find(s.at(x).key)
				s.table[slot] = x
			}
		}
	}
	slot, _ := s.find(s.at(i).key)
	s.table[slot] = i
	s.keys++
}

// erase takes the node at slot out of the table, shifting back the nodes
// after it that probed past it (no tombstones: lookups stay short).
func (s *shard) erase(slot int) {
	mask := len(s.table) - 1
	for j := (slot + 1) & mask; s.table[j] != 0; j = (j + 1) & mask {
		home := int(keyHash(s.at(s.table[j]).key)) & mask
		// The node at j may move to slot unless its home lies cyclically
		// in (slot, j].
		if (j > slot && (home <= slot || home > j)) || (j < slot && home <= slot && home > j) {
			s.table[slot] = s.table[j]
			slot = j
		}
	}
	s.table[slot] = 0
	s.keys--
}

// listOf returns the list of n's kind, and the count of that kind over all
// shards.
func (s *shard) listOf(n *node) (*list, *atomic.Int64) {
	if n.flags&flagPositive != 0 {
		return &s.pos, &s.c.npos
	}
	return &s.neg, &s.c.nneg
}

func (s *shard) pushFront(l *list, i uint32) {
	n := s.at(i)
	n.prev, n.next = 0, l.head
	if l.head != 0 {
		s.at(l.head).prev = i
	} else {
		l.tail = i
	}
	l.head = i
	l.n++
}

func (s *shard) unlist(l *list, i uint32) {
	n := s.at(i)
	if n.prev != 0 {
		s.at(n.prev).next = n.next
	} else {
		l.head = n.next
	}
	if n.next != 0 {
		s.at(n.next).prev = n.prev
	} else {
		l.tail = n.prev
	}
	l.n--
}

// linkUser puts positive node i into the ring of its user (hash h), last.
func (s *shard) linkUser(i uint32, h uint64) {
	s.steps++
	n := s.at(i)
	r, ok := s.users[h]
	if !ok {
		n.uprev, n.unext = i, i
		s.users[h] = ring{head: i, n: 1}
		return
	}
	head := s.at(r.head)
	n.uprev, n.unext = head.uprev, r.head
	s.at(head.uprev).unext = i
	head.uprev = i
	r.n++
	s.users[h] = r
}

// unlinkUser takes node i out of its user's ring (hash h). A paused walk
// pointing at i moves on to the next node (none if the ring is gone).
func (s *shard) unlinkUser(i uint32, h uint64) {
	s.steps++
	n := s.at(i)
	next := n.unext
	if next == i {
		next = 0
	}
	for _, p := range s.cursors {
		if *p == i {
			*p = next
		}
	}
	r := s.users[h]
	if r.n <= 1 {
		delete(s.users, h)
		return
	}
	s.at(n.uprev).unext = n.unext
	s.at(n.unext).uprev = n.uprev
	if r.head == i {
		r.head = n.unext
	}
	r.n--
	s.users[h] = r
}

// add stores n under its key, which must be absent, making room first if
// the cache is full: it evicts from this shard, or if it holds no answer of
// n's kind, from another whose lock is free. It stores nothing if it finds
// no room (and returns false). Called with mu held.
func (s *shard) add(n node) bool {
	l, count := s.listOf(&n)
	bound := s.c.size
	if l == &s.neg {
		bound = s.c.negSize
	}
	// The count goes up before the answer is stored and down after one
	// is removed, so the cache never holds more than bound.
	if count.Add(1) > int64(bound) && !s.makeRoom(l == &s.pos) {
		count.Add(-1)
		return false
	}
	i := s.alloc()
	*s.at(i) = n
	s.insert(i)
	s.pushFront(l, i)
	if n.flags&flagPositive != 0 {
		if user := n.userID(); user != "" {
			s.linkUser(i, s.c.userHash(user))
		}
	}
	if n.key.Variant != 0 {
		// c.variantKeys was counted up by fill, before it checked the
		// answer was not stale.
		s.variants.add(n.key.Token, n.key)
	}
	return true
}

// makeRoom evicts an answer of the kind given, from this shard if it has
// one, else from the first other shard whose lock is free (a shard's lock
// is never waited for while another is held). Called with mu held.
func (s *shard) makeRoom(positive bool) bool {
	pick := func(t *shard) *list {
		if positive {
			return &t.pos
		}
		return &t.neg
	}
	if l := pick(s); l.n > 0 {
		s.evict(l)
		return true
	}
	for i := range s.c.shards {
		t := &s.c.shards[i]
		if t == s || !t.mu.TryLock() {
			continue
		}
		ok := pick(t).n > 0
		if ok {
			t.evict(pick(t))
		}
		t.mu.Unlock()
		if ok {
			return true
		}
	}
	return false
}

// evict drops the least recently used node of l that was not read since
// the hand last passed it (CLOCK). Called with mu held.
func (s *shard) evict(l *list) {
	for {
		i := l.tail
		n := s.at(i)
		if n.flags&flagRef == 0 {
			s.dropping = ReasonCapacity
			s.remove(i)
			s.dropped++
			// Capacity evictions happen inside a fill; report them one by
			// one.
			s.flushDrops()
			return
		}
		n.flags &^= flagRef
		s.unlist(l, i)
		s.pushFront(l, i)
	}
}

// remove takes node i out of the table, its list and the indexes, and
// frees it. Called with mu held; the caller counts the drop if it is one.
func (s *shard) remove(i uint32) {
	n := s.at(i)
	slot, _ := s.find(n.key)
	s.erase(slot)
	l, count := s.listOf(n)
	s.unlist(l, i)
	count.Add(-1)
	if n.flags&flagPositive != 0 {
		if user := n.userID(); user != "" {
			s.unlinkUser(i, s.c.userHash(user))
		}
	}
	if n.key.Variant != 0 {
		s.variants.remove(n.key.Token, n.key)
		s.c.variantKeys.Add(-1)
	}
	*n = node{next: s.free}
	s.free = i
}

// drop removes node i, counting it under s.dropping.
func (s *shard) drop(i uint32) {
	s.remove(i)
	s.dropped++
}

// flushDrops reports the drops counted so far. Called with mu held.
func (s *shard) flushDrops() {
	if s.dropped > 0 && s.c.onDrop != nil {
		s.c.onDrop(s.dropping, s.dropped)
	}
	s.dropped = 0
	s.dropping = ReasonCapacity
}

// len returns the answers held. Called with mu held.
func (s *shard) len() int { return s.pos.n + s.neg.n }

// purge drops every answer at once, counting them under reason. Called
// with mu held.
func (s *shard) purge(reason Reason) int {
	n := s.len()
	s.c.npos.Add(-int64(s.pos.n))
	s.c.nneg.Add(-int64(s.neg.n))
	if vk := s.variants.total(); vk > 0 {
		s.c.variantKeys.Add(-int64(vk))
	}
	s.reset()
	s.dropping, s.dropped = reason, n
	s.flushDrops()
	return n
}
