package tokencache

import (
	"strings"
	"testing"
)

func TestHasher(t *testing.T) {
	h1, err := NewHasher([]byte("0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	h2, err := NewHasher(nil)
	if err != nil {
		t.Fatal(err)
	}
	if h1.Token("tok") != h1.Token("tok") {
		t.Error("same token, different IDs")
	}
	if h1.Token("tok") == h1.Token("tok2") {
		t.Error("different tokens, same ID")
	}
	if h1.Token("tok") == h2.Token("tok") {
		t.Error("different hash keys, same ID")
	}
	long := strings.Repeat("x", 1000)
	if h1.Token(long) == h1.Token(long+"y") {
		t.Error("tokens longer than the copy buffer are not fully hashed")
	}
	if k := h1.Key("tok", Masquerade{}); k.Token != h1.Token("tok") || k.Variant != 0 {
		t.Errorf("plain key: %+v", k)
	}
	// Field boundaries are unambiguous.
	if h1.Key("t", Masquerade{UserID: "ab", DeviceID: "c"}) == h1.Key("t", Masquerade{UserID: "a", DeviceID: "bc"}) {
		t.Error("masquerade fields run into each other")
	}
	if h1.Key("t", Masquerade{DeviceID: "d"}) == h1.Key("t", Masquerade{MSC3202DeviceID: "d"}) {
		t.Error("device_id and org.matrix.msc3202.device_id share a key")
	}
	if _, err := NewHasher([]byte("short")); err == nil {
		t.Error("a 5-byte hash key was accepted")
	}
}

func TestHasherDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	h, err := NewHasher(nil)
	if err != nil {
		t.Fatal(err)
	}
	h.Key("warm", Masquerade{UserID: "@a:x"})
	if n := testing.AllocsPerRun(100, func() {
		h.Key("syt_YWxpY2U_abcdefghijklmnopqrst_123456", Masquerade{})
	}); n != 0 {
		t.Errorf("Key allocates %v times per call", n)
	}
}

// TestAspectKeys: an aspect key is apart from the token's plain key, its
// masquerades and its bound keys, and goes with the token, its user and its
// device when those are invalidated.
func TestAspectKeys(t *testing.T) {
	f := newFixture(t, nil)
	plain := f.h.Key("tok", Masquerade{})
	admin := f.h.Aspect(plain, AspectAdmin)
	if admin.Token != plain.Token || admin == plain || admin.Variant == 0 {
		t.Fatalf("aspect key %v of %v", admin, plain)
	}
	if admin == f.h.Aspect(f.h.Key("tok2", Masquerade{}), AspectAdmin) || admin != f.h.Aspect(plain, AspectAdmin) {
		t.Error("aspect keys are not per token, or not stable")
	}
	if admin == f.h.Key("tok", Masquerade{UserID: "\x00"}) {
		t.Error("a masquerade names the aspect key")
	}
	for _, tc := range []struct {
		name       string
		invalidate func() int
	}{
		{"token", func() int { return f.c.InvalidateToken(plain.Token, "test") }},
		{"user", func() int { return f.c.InvalidateUser("@a:hs", TokenID{}, "test") }},
		{"device", func() int { return f.c.InvalidateDevice("@a:hs", "D", "test") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.fill(t, plain, positive("@a:hs", "D"))
			f.fill(t, admin, positive("@a:hs", "D"))
			if n := tc.invalidate(); n != 2 {
				t.Errorf("dropped %d entries, want 2", n)
			}
			f.expect(t, admin, Miss)
		})
	}
}
