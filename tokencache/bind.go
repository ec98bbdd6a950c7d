package tokencache

import (
	"encoding/binary"
	"net/netip"
)

// tagBound separates a bound key's hash from tokens' and masquerades'.
const tagBound = 'b'

// Bind returns the key that binds key to one client address: where answers
// the homeserver gives only to that client are stored (Answer.Bound). Its
// Token is key's, so invalidating the token drops it too; its Variant is a
// keyed hash of key's Variant and client (never zero, and apart from
// key's), so a client cannot pick an address whose bound key is another
// client's. It does not allocate.
func (h *Hasher) Bind(key Key, client netip.Addr) Key {
	s := h.pool.Get().(*hashState)
	s.mac.Reset()
	s.buf[0] = tagBound
	binary.BigEndian.PutUint64(s.buf[1:9], key.Variant)
	s.buf[9] = byte(client.BitLen()) // 0 (invalid), 32 or 128
	a := client.As16()
	copy(s.buf[10:26], a[:])
	s.mac.Write(s.buf[:26])
	v := binary.BigEndian.Uint64(s.mac.Sum(s.sum[:0]))
	h.pool.Put(s)
	if v == 0 || v == key.Variant {
		v = ^key.Variant // impossible rather than improbable, as in Key
		if v == 0 {
			v = 1
		}
	}
	return Key{Token: key.Token, Variant: v}
}
