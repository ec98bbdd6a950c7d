package tokencache

// keySets indexes cache keys by K (a token's ID: the cache indexes the
// variants of a token with it; users are indexed by rings threaded through
// the nodes, see shard). Most sets are small (a token has a few variants),
// and a slice is the most compact set: those stay slices. A set that grows
// past indexSmall keys (a bridge's token masquerading as tens of thousands
// of users) becomes a map, so that removing one key is O(1) however large
// the set, and removing a whole set is linear in its size. A map that
// shrinks to indexSmall/2 becomes a slice again, so a set's memory follows
// its size.
//
// Not safe for concurrent use: its shard's lock guards it.
type keySets[K comparable] struct {
	small map[K][]Key
	big   map[K]map[Key]struct{}
	// steps counts the keys looked at by add and remove: tests assert that
	// index work is linear in what is added and removed.
	steps uint64
}

// indexSmall is the largest set kept as a slice: removing from one scans at
// most this many keys.
const indexSmall = 32

func newKeySets[K comparable]() keySets[K] {
	return keySets[K]{small: make(map[K][]Key), big: make(map[K]map[Key]struct{})}
}

// add puts key into k's set. key must not be in it already (the cache
// unindexes a key before storing it again).
func (s *keySets[K]) add(k K, key Key) {
	s.steps++
	if m, ok := s.big[k]; ok {
		m[key] = struct{}{}
		return
	}
	keys := s.small[k]
	if len(keys) < indexSmall {
		s.small[k] = append(keys, key)
		return
	}
	m := make(map[Key]struct{}, 2*indexSmall)
	for _, x := range keys {
		m[x] = struct{}{}
	}
	m[key] = struct{}{}
	s.steps += uint64(len(keys))
	delete(s.small, k)
	s.big[k] = m
}

// remove takes key out of k's set, if it is there.
func (s *keySets[K]) remove(k K, key Key) {
	if m, ok := s.big[k]; ok {
		s.steps++
		delete(m, key)
		if len(m) <= indexSmall/2 {
			keys := make([]Key, 0, len(m))
			for x := range m {
				keys = append(keys, x)
			}
			s.steps += uint64(len(m))
			delete(s.big, k)
			if len(keys) > 0 {
				s.small[k] = keys
			}
		}
		return
	}
	keys := s.small[k]
	for i, x := range keys {
		s.steps++
		if x == key {
			last := len(keys) - 1
			keys[i] = keys[last]
			keys = keys[:last]
			if len(keys) == 0 {
				delete(s.small, k)
			} else {
				s.small[k] = keys
			}
			return
		}
	}
}

// get returns k's set: a copy of it when it is small, else the map itself,
// which the caller may range over but must not change.
func (s *keySets[K]) get(k K) ([]Key, map[Key]struct{}) {
	if m, ok := s.big[k]; ok {
		return nil, m
	}
	keys := s.small[k]
	if len(keys) == 0 {
		return nil, nil
	}
	return append(make([]Key, 0, len(keys)+1), keys...), nil
}

// count returns how many sets there are.
func (s *keySets[K]) count() int { return len(s.small) + len(s.big) }

// total returns how many keys all sets hold.
func (s *keySets[K]) total() int {
	n := 0
	for _, keys := range s.small {
		n += len(keys)
	}
	for _, m := range s.big {
		n += len(m)
	}
	return n
}
