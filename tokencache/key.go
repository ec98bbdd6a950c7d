package tokencache

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"sync"
)

// TokenID identifies an access token without being it: the first 128 bits of
// HMAC-SHA256(hash key, token). It is safe to keep, compare and log-correlate;
// it is not reversible without the hash key, which never leaves the process.
type TokenID [16]byte

// Masquerade holds the application-service masquerade parameters of a request
// (Client-Server API, "Identity assertion": user_id, device_id, and MSC3202's
// org.matrix.msc3202.device_id). The homeserver answers differently for each
// combination, so each gets its own cache entry. The zero value means "no
// masquerade".
type Masquerade struct {
	UserID          string
	DeviceID        string
	MSC3202DeviceID string
}

// IsZero reports whether m carries no masquerade parameter.
func (m Masquerade) IsZero() bool { return m == Masquerade{} }

// Key is what an answer is stored under: the token's ID plus a 64-bit keyed
// hash of the masquerade parameters (0 for a plain request). Two requests
// share an entry exactly when they carry the same token and the same
// masquerade. (64 bits suffice for the variant: it only tells apart the
// masquerades of one token, and is keyed, so it cannot be searched for
// collisions offline.)
type Key struct {
	Token   TokenID
	Variant uint64
}

// Hasher derives TokenIDs and Keys with a keyed hash. It is safe for
// concurrent use and does not allocate per call.
type Hasher struct {
	pool sync.Pool // of *hashState
}

type hashState struct {
	mac hash.Hash
	buf [256]byte
	sum [sha256.Size]byte
}

// MinHashKeyLen is the shortest hash key NewHasher accepts.
const MinHashKeyLen = 16

// NewHasher returns a Hasher keyed with key. A nil key asks for 32 random
// bytes, which is right for a single replica: nobody, not even a reader of a
// heap dump's keys, can test a guessed token against the cache.
func NewHasher(key []byte) (*Hasher, error) {
	if key == nil {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
	}
	if len(key) < MinHashKeyLen {
		return nil, errors.New("tokencache: hash key shorter than 16 bytes")
	}
	k := append([]byte(nil), key...)
	h := &Hasher{}
	h.pool.New = func() any { return &hashState{mac: hmac.New(sha256.New, k)} }
	return h, nil
}

// Domain-separation tags, so a token can never hash like a masquerade.
const (
	tagToken   = 't'
	tagVariant = 'm'
	tagAspect  = 'a'
)

// Token returns the ID of a token.
func (h *Hasher) Token(token string) TokenID {
	s := h.pool.Get().(*hashState)
	s.mac.Reset()
	s.writeField(tagToken, token)
	var id TokenID
	copy(id[:], s.mac.Sum(s.sum[:0]))
	h.pool.Put(s)
	return id
}

// Key returns the cache key of a token with masquerade parameters m.
func (h *Hasher) Key(token string, m Masquerade) Key {
	k := Key{Token: h.Token(token)}
	if m.IsZero() {
		return k
	}
	s := h.pool.Get().(*hashState)
	s.mac.Reset()
	s.writeField(tagVariant, m.UserID)
	s.writeField(tagVariant, m.DeviceID)
	s.writeField(tagVariant, m.MSC3202DeviceID)
	k.Variant = binary.BigEndian.Uint64(s.mac.Sum(s.sum[:0]))
	h.pool.Put(s)
	// A variant hash of zero would collide with "plain"; it has probability
	// 2^-64, but make it impossible rather than improbable.
	if k.Variant == 0 {
		k.Variant = 1
	}
	return k
}

// writeField writes tag, len(v) and v, so that field boundaries are
// unambiguous ("ab"+"c" never hashes like "a"+"bc"). It copies through the
// state's buffer instead of converting v to []byte, which would allocate.
func (s *hashState) writeField(tag byte, v string) {
	s.buf[0] = tag
	binary.BigEndian.PutUint32(s.buf[1:5], uint32(len(v)))
	n := copy(s.buf[5:], v)
	s.mac.Write(s.buf[:5+n])
	for v = v[n:]; len(v) > 0; v = v[n:] {
		n = copy(s.buf[:], v)
		s.mac.Write(s.buf[:n])
	}
}

// Aspect is a fact about a token other than who it belongs to, cached beside
// the whoami answer (the forward-auth endpoint's "is this user a homeserver
// admin", for one).
type Aspect byte

// AspectAdmin is whether the token's user is a homeserver admin.
const AspectAdmin Aspect = 1

// Aspect returns the key under which fact a about key's token is stored. Its
// Token is key's, so invalidating the token drops it too (it is indexed as
// a variant); its Variant is a keyed hash of key's Variant and a, never zero
// and never key's, so no masquerade of the token can name it.
func (h *Hasher) Aspect(key Key, a Aspect) Key {
	s := h.pool.Get().(*hashState)
	s.mac.Reset()
	s.buf[0] = tagAspect
	binary.BigEndian.PutUint64(s.buf[1:9], key.Variant)
	s.buf[9] = byte(a)
	s.mac.Write(s.buf[:10])
	v := binary.BigEndian.Uint64(s.mac.Sum(s.sum[:0]))
	h.pool.Put(s)
	if v == 0 || v == key.Variant {
		v = ^key.Variant
		if v == 0 {
			v = 1
		}
	}
	return Key{Token: key.Token, Variant: v}
}
