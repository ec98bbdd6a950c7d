package tokencache

import (
	"testing"
)

// Helpers that look inside a cache, each shard under its lock.

// seqNow is the invalidation sequence a lookup starting now would see.
func (c *Cache) seqNow() uint64 { return c.seq.Load() }

// indexSteps is the work the indexes did so far.
func (c *Cache) indexSteps() uint64 {
	var n uint64
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += s.steps + s.variants.steps
		s.mu.Unlock()
	}
	return n
}

// holds reports whether an answer is stored under k, alive or not.
func (c *Cache) holds(k Key) bool {
	s := c.shardOf(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.get(k) != 0
}

// census counts what the cache holds.
type census struct {
	pos, neg    int // answers
	rings       int // user rings, over all shards
	users       int // distinct users with positive answers
	ringNodes   int // nodes in user rings
	variantSets int // tokens with variants indexed, over all shards
}

func (c *Cache) census() census {
	var n census
	users := map[string]bool{}
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n.pos += s.pos.n
		n.neg += s.neg.n
		n.rings += len(s.users)
		for _, r := range s.users {
			n.ringNodes += int(r.n)
			for i, j := r.head, uint32(0); j < r.n; i, j = s.at(i).unext, j+1 {
				users[s.at(i).userID()] = true
			}
		}
		n.variantSets += s.variants.count()
		s.mu.Unlock()
	}
	n.users = len(users)
	return n
}

// userKeys returns the keys of user's positive answers, found through the
// rings.
func (c *Cache) userKeys(user string) []Key {
	var keys []Key
	h := c.userHash(user)
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		if r, ok := s.users[h]; ok {
			for i, j := r.head, uint32(0); j < r.n; i, j = s.at(i).unext, j+1 {
				if n := s.at(i); n.userID() == user {
					keys = append(keys, n.key)
				}
			}
		}
		s.mu.Unlock()
	}
	return keys
}

// checkIndexes asserts that every shard's structures agree: the table
// holds exactly the nodes on the two recency lists, within their bounds,
// each in the shard its key hashes to; every positive node with a user is
// in exactly one ring, the ring of its user's hash, and the rings hold
// nothing else; the variant index holds exactly the keys with a variant;
// no invalidation is pending and no walk paused.
func checkIndexes(t *testing.T, c *Cache) {
	t.Helper()
	variants, pos, neg := 0, 0, 0
	for si := range c.shards {
		s := &c.shards[si]
		s.mu.Lock()
		checkShard(t, c, si, s)
		variants += s.variants.total()
		pos += s.pos.n
		neg += s.neg.n
		s.mu.Unlock()
	}
	if got := c.variantKeys.Load(); got != int64(variants) {
		t.Errorf("variantKeys is %d, but %d variant keys are indexed", got, variants)
	}
	if c.npos.Load() != int64(pos) || c.nneg.Load() != int64(neg) {
		t.Errorf("counted %d positive and %d negative answers, hold %d and %d", c.npos.Load(), c.nneg.Load(), pos, neg)
	}
	if pos > c.size || neg > c.negSize {
		t.Errorf("hold %d positive and %d negative answers, over the bounds %d and %d", pos, neg, c.size, c.negSize)
	}
	c.invMu.Lock()
	defer c.invMu.Unlock()
	if len(c.pending) != 0 || c.npending.Load() != 0 {
		t.Errorf("%d invalidations still pending (npending %d)", len(c.pending), c.npending.Load())
	}
}

func checkShard(t *testing.T, c *Cache, si int, s *shard) {
	t.Helper()
	inTable := map[uint32]bool{}
	for slot, i := range s.table {
		if i == 0 {
			continue
		}
		if inTable[i] {
			t.Errorf("shard %d: node %d in the table twice", si, i)
		}
		inTable[i] = true
		n := s.at(i)
		if got, _ := s.find(n.key); got != slot {
			t.Errorf("shard %d: node %d at slot %d, found at %d", si, i, slot, got)
		}
		if c.shardOf(n.key) != s {
			t.Errorf("shard %d: holds a key of another shard", si)
		}
	}
	if len(inTable) != s.keys {
		t.Errorf("shard %d: %d nodes in the table, keys says %d", si, len(inTable), s.keys)
	}
	onList := map[uint32]bool{}
	for _, l := range []struct {
		name     string
		l        *list
		positive bool
	}{{"positive", &s.pos, true}, {"negative", &s.neg, false}} {
		count, prev := 0, uint32(0)
		for i := l.l.head; i != 0; i = s.at(i).next {
			n := s.at(i)
			if n.prev != prev {
				t.Fatalf("shard %d: %s list: broken back link at %d", si, l.name, i)
			}
			if onList[i] || !inTable[i] {
				t.Fatalf("shard %d: %s list: node %d listed twice or not in the table", si, l.name, i)
			}
			if (n.flags&flagPositive != 0) != l.positive {
				t.Errorf("shard %d: node %d on the %s list", si, i, l.name)
			}
			onList[i] = true
			prev = i
			count++
		}
		if l.l.tail != prev || count != l.l.n {
			t.Errorf("shard %d: %s list: %d nodes, n %d, tail ok %v", si, l.name, count, l.l.n, l.l.tail == prev)
		}
	}
	if len(onList) != len(inTable) {
		t.Errorf("shard %d: %d nodes listed, %d in the table", si, len(onList), len(inTable))
	}
	free := 0
	for i := s.free; i != 0; i = s.at(i).next {
		if inTable[i] {
			t.Fatalf("shard %d: node %d both free and in use", si, i)
		}
		free++
	}
	if int(s.top)-1 != free+len(inTable) {
		t.Errorf("shard %d: %d nodes allocated, %d free + %d in use", si, s.top-1, free, len(inTable))
	}
	inRing := map[uint32]bool{}
	for h, r := range s.users {
		if r.n == 0 {
			t.Errorf("shard %d: empty ring", si)
		}
		i := r.head
		for range r.n {
			n := s.at(i)
			if inRing[i] || !inTable[i] || n.flags&flagPositive == 0 || n.userID() == "" {
				t.Fatalf("shard %d: ring holds node %d: twice, or not a positive answer with a user", si, i)
			}
			if c.userHash(n.userID()) != h {
				t.Errorf("shard %d: %s in the ring of another hash", si, n.userID())
			}
			if s.at(n.unext).uprev != i {
				t.Fatalf("shard %d: ring: broken back link at %d", si, i)
			}
			inRing[i] = true
			i = n.unext
		}
		if i != r.head {
			t.Errorf("shard %d: ring of %d nodes does not close", si, r.n)
		}
	}
	wantVariants := map[TokenID]map[Key]bool{}
	for i := range inTable {
		n := s.at(i)
		if n.flags&flagPositive != 0 && n.userID() != "" && !inRing[i] {
			t.Errorf("shard %d: %s's answer in no ring", si, n.userID())
		}
		if n.key.Variant != 0 {
			if wantVariants[n.key.Token] == nil {
				wantVariants[n.key.Token] = map[Key]bool{}
			}
			wantVariants[n.key.Token][n.key] = true
		}
	}
	checkSets(t, "variants", &s.variants, wantVariants)
	if len(s.cursors) != 0 {
		t.Errorf("shard %d: %d paused walks left", si, len(s.cursors))
	}
}

func checkSets[K comparable](t *testing.T, name string, s *keySets[K], want map[K]map[Key]bool) {
	t.Helper()
	if s.count() != len(want) {
		t.Errorf("%s: %d sets, want %d", name, s.count(), len(want))
	}
	for k, keys := range want {
		small, big := s.get(k)
		got := map[Key]bool{}
		for _, x := range small {
			if got[x] {
				t.Errorf("%s[%v]: %v indexed twice", name, k, x)
			}
			got[x] = true
		}
		for x := range big {
			got[x] = true
		}
		if len(got) != len(keys) {
			t.Errorf("%s[%v]: %d keys, want %d", name, k, len(got), len(keys))
			continue
		}
		for x := range keys {
			if !got[x] {
				t.Errorf("%s[%v]: %v missing", name, k, x)
			}
		}
		if big != nil && len(big) <= indexSmall/2 || big == nil && len(small) > indexSmall {
			t.Errorf("%s[%v]: %d keys held as %s", name, k, len(keys), map[bool]string{true: "a map", false: "a slice"}[big != nil])
		}
	}
}
