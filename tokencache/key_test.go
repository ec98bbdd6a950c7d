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
