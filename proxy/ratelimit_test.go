package proxy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

func TestClientAddr(t *testing.T) {
	trusted, _, _ := ParsePrefixes([]string{"10.0.0.0/8", "fd00::/8"})
	tests := []struct {
		name   string
		peer   string
		xff    []string
		want   string
		trusts []netip.Prefix
	}{
		{"untrusted peer, spoofed header", "198.51.100.1:5000", []string{"203.0.113.9"}, "198.51.100.1", trusted},
		{"no trusted proxies at all", "10.0.0.1:5000", []string{"203.0.113.9"}, "10.0.0.1", nil},
		{"trusted peer", "10.0.0.1:5000", []string{"203.0.113.9"}, "203.0.113.9", trusted},
		{"chain through two trusted hops", "10.0.0.1:5000", []string{"203.0.113.9, 10.1.1.1"}, "203.0.113.9", trusted},
		{"client-written entries left of the real one", "10.0.0.1:5000", []string{"1.2.3.4, 5.6.7.8, 203.0.113.9"}, "203.0.113.9", trusted},
		{"several headers", "10.0.0.1:5000", []string{"1.2.3.4", "203.0.113.9, 10.1.1.1"}, "203.0.113.9", trusted},
		{"every entry trusted", "10.0.0.1:5000", []string{"10.9.9.9, 10.1.1.1"}, "10.9.9.9", trusted},
		{"trusted peer, no header", "10.0.0.1:5000", nil, "10.0.0.1", trusted},
		{"garbage stops the walk", "10.0.0.1:5000", []string{"203.0.113.9, nonsense, 10.1.1.1"}, "10.1.1.1", trusted},
		{"garbage right away", "10.0.0.1:5000", []string{"<script>"}, "10.0.0.1", trusted},
		{"entries with ports", "10.0.0.1:5000", []string{"203.0.113.9:1234"}, "203.0.113.9", trusted},
		{"IPv6 entries", "[fd00::1]:5000", []string{"[2001:db8::7]:443, fd00::2"}, "2001:db8::7", trusted},
		{"IPv4-mapped peer", "[::ffff:10.0.0.1]:5000", []string{"203.0.113.9"}, "203.0.113.9", trusted},
		{"IPv4-mapped entry", "10.0.0.1:5000", []string{"::ffff:203.0.113.9"}, "203.0.113.9", trusted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &http.Request{RemoteAddr: tt.peer, Header: http.Header{}}
			if tt.xff != nil {
				r.Header["X-Forwarded-For"] = tt.xff
			}
			if got := clientAddr(r, tt.trusts); got.String() != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestParsePrefixes(t *testing.T) {
	got, _, ok := ParsePrefixes([]string{" 10.1.2.3/8", "192.0.2.7", "2001:db8::1", "::ffff:172.16.0.0/108", ""})
	if !ok || fmt.Sprint(got) != "[10.0.0.0/8 192.0.2.7/32 2001:db8::1/128 172.16.0.0/12]" {
		t.Errorf("got %v %v", got, ok)
	}
	for _, bad := range []string{"10.0.0.0/33", "ingress", "10.0.0.0/8/8"} {
		if _, b, ok := ParsePrefixes([]string{"10.0.0.0/8", bad}); ok || b != bad {
			t.Errorf("%q: got ok=%v bad=%q", bad, ok, b)
		}
	}
}

func limited(rl RateLimitConfig) func(*Config) {
	return func(c *Config) { c.RateLimit = rl }
}

// serveFrom sends a request straight to the proxy's handler as if from peer.
func (h *harness) serveFrom(peer, method, target string, hdr http.Header) *httptest.ResponseRecorder {
	h.t.Helper()
	req := httptest.NewRequest(method, target, nil)
	req.RemoteAddr = peer
	for k, v := range hdr {
		req.Header[k] = v
	}
	rec := httptest.NewRecorder()
	h.p.ServeHTTP(rec, req)
	return rec
}

func TestRateLimitedAnswer(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.5, Burst: 3}))
	for i := range 3 {
		if rec := h.serveFrom("192.0.2.1:1000", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
			t.Fatalf("request %d within the burst: %d", i, rec.Code)
		}
	}
	seen := len(h.hs.requests())
	rec := h.serveFrom("192.0.2.1:1000", "GET", "/_matrix/client/versions", nil)
	if rec.Code != 429 {
		t.Fatalf("over the burst: %d", rec.Code)
	}
	var body struct {
		Errcode      string `json:"errcode"`
		Error        string `json:"error"`
		RetryAfterMS int64  `json:"retry_after_ms"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Errcode != "M_LIMIT_EXCEEDED" || body.Error == "" {
		t.Errorf("body %s (%v)", rec.Body, err)
	}
	// At 0.5 requests per second the next one is 2s away.
	if body.RetryAfterMS < 1900 || body.RetryAfterMS > 2000 {
		t.Errorf("retry_after_ms %d, want about 2000", body.RetryAfterMS)
	}
	if ra, _ := strconv.Atoi(rec.Header().Get("Retry-After")); int64(ra) != (body.RetryAfterMS+999)/1000 {
		t.Errorf("Retry-After %q for retry_after_ms %d", rec.Header().Get("Retry-After"), body.RetryAfterMS)
	}
	for k, v := range map[string]string{"Content-Type": "application/json", "Access-Control-Allow-Origin": "*"} {
		if got := rec.Header().Get(k); got != v {
			t.Errorf("%s: %q", k, got)
		}
	}
	if len(h.hs.requests()) != seen {
		t.Error("a limited request reached the homeserver")
	}
	if n := h.counter("matrix_auth_proxy_rate_limited_total", "key", "ip"); n != 1 {
		t.Errorf("rate_limited_total{ip}: %v", n)
	}
	if n := h.counter("matrix_auth_proxy_requests_total", "code", "429"); n != 1 {
		t.Errorf("requests_total{code=429}: %v", n)
	}
	// Another client is not affected.
	if rec := h.serveFrom("192.0.2.2:1000", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
		t.Errorf("another address: %d", rec.Code)
	}
	// The bucket refills at the sustained rate.
	h.now.Advance(2 * time.Second)
	if rec := h.serveFrom("192.0.2.1:1000", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
		t.Errorf("after waiting retry_after_ms: %d", rec.Code)
	}
	if rec := h.serveFrom("192.0.2.1:1000", "GET", "/_matrix/client/versions", nil); rec.Code != 429 {
		t.Errorf("right after: %d", rec.Code)
	}
}

func TestRateLimitKeys(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 2}))
	phone := h.hs.login("@alice:hs", "PHONE")
	laptop := h.hs.login("@alice:hs", "LAPTOP")
	const addr = "192.0.2.1:1000"
	// Not yet looked up: charged to the address (1 of 2).
	if rec := h.serveFrom(addr, "GET", "/_matrix/client/v3/sync", bearer(phone)); rec.Code != 200 {
		t.Fatalf("first sync: %d", rec.Code)
	}
	// Looking them up from another address makes them known-valid.
	h.serveFrom("192.0.2.99:1", "GET", whoamiV3, bearer(phone))
	h.serveFrom("192.0.2.99:1", "GET", whoamiV3, bearer(laptop))
	// Now each device has its own bucket of 2, whatever the address.
	for i := range 2 {
		for _, tok := range []string{phone, laptop} {
			if rec := h.serveFrom(addr, "GET", "/_matrix/client/v3/sync", bearer(tok)); rec.Code != 200 {
				t.Fatalf("round %d: %d", i, rec.Code)
			}
		}
	}
	if rec := h.serveFrom(addr, "GET", whoamiV3, bearer(phone)); rec.Code != 429 {
		t.Errorf("phone over its burst: %d", rec.Code)
	}
	if n := h.counter("matrix_auth_proxy_rate_limited_total", "key", "user"); n != 1 {
		t.Errorf("rate_limited_total{user}: %v", n)
	}
	// The address still has one request left for requests without a
	// known token: no token, an unknown token.
	if rec := h.serveFrom(addr, "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
		t.Errorf("no token, address bucket: %d", rec.Code)
	}
	if rec := h.serveFrom(addr, "GET", whoamiV3, bearer("syt_unknown")); rec.Code != 429 {
		t.Errorf("unknown token, address bucket empty: %d", rec.Code)
	}
}

func TestRateLimitIPv6ByPrefix(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}))
	if rec := h.serveFrom("[2001:db8:1:2::1]:1", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	if rec := h.serveFrom("[2001:db8:1:2:ffff::9]:1", "GET", "/_matrix/client/versions", nil); rec.Code != 429 {
		t.Errorf("same /64: %d", rec.Code)
	}
	if rec := h.serveFrom("[2001:db8:1:3::1]:1", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
		t.Errorf("another /64: %d", rec.Code)
	}
}

func TestRateLimitExemptions(t *testing.T) {
	bridgeNet := netip.MustParsePrefix("10.42.0.0/16")
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1, ExemptUsers: []string{"@bridge:hs"}, ExemptCIDRs: []netip.Prefix{bridgeNet}}))
	bot := h.hs.login("@bridge:hs", "BOT")
	for i := range 5 {
		if rec := h.serveFrom("192.0.2.1:1", "GET", whoamiV3, bearer(bot)); rec.Code != 200 && i > 0 {
			t.Errorf("exempt user, request %d: %d", i, rec.Code)
		}
		if rec := h.serveFrom("10.42.3.4:1", "GET", "/_matrix/client/versions", nil); rec.Code != 200 {
			t.Errorf("exempt address, request %d: %d", i, rec.Code)
		}
	}
}

// A spray of made-up tokens from one address is stopped after the burst:
// the homeserver sees no more whoami calls than the burst allows.
func TestRandomTokenSprayIsStopped(t *testing.T) {
	const burst = 10
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: burst}))
	limitedCount := 0
	for i := range 200 {
		rec := h.serveFrom("198.51.100.7:4000", "GET", whoamiV3, bearer(fmt.Sprintf("syt_spray_%d", i)))
		switch rec.Code {
		case 401:
		case 429:
			limitedCount++
		default:
			t.Fatalf("request %d: %d", i, rec.Code)
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != burst {
		t.Errorf("homeserver whoami calls: %d, want %d", n, burst)
	}
	if limitedCount != 200-burst {
		t.Errorf("limited: %d, want %d", limitedCount, 200-burst)
	}
}

func TestLimiterMemoryIsBounded(t *testing.T) {
	l, err := newLimiter(RateLimitConfig{RPS: 1, Burst: 1, MaxKeys: 1600}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200_000 {
		a := netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
		l.allow(ipKey(a))
	}
	if n := l.len(); n > 1600 {
		t.Errorf("%d buckets held, bound 1600", n)
	}
}

func TestTrustedProxyForwardsTheClient(t *testing.T) {
	trusted := netip.MustParsePrefix("127.0.0.0/8")
	h := newHarness(t, func(c *Config) { c.TrustedProxies = []netip.Prefix{trusted} })
	hdr := http.Header{"X-Forwarded-For": {"6.6.6.6, 203.0.113.9"}}
	h.call(200, "GET", "/_matrix/client/versions", hdr, "")
	r, _ := h.hs.lastRequest("versions")
	if got := r.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "203.0.113.9" {
		t.Errorf("homeserver got X-Forwarded-For %q, want the client behind the trusted proxy", got)
	}
}

func TestHomeserver429PassesThrough(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 100, Burst: 100}))
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Retry-After", "7")
		writeJSON(w, 429, `{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":6500}`)
		return true
	})
	resp, body := h.do("POST", "/_matrix/client/v3/rooms/!r:hs/join", nil, "")
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "7" || body != `{"errcode":"M_LIMIT_EXCEEDED","error":"Too Many Requests","retry_after_ms":6500}` {
		t.Errorf("got %d %v %s", resp.StatusCode, resp.Header, body)
	}
	if n := h.counter("matrix_auth_proxy_rate_limited_total"); n != 0 {
		t.Errorf("the homeserver's 429 counted as ours: %v", n)
	}
}

// An ingress left out of TRUSTED_PROXIES makes all its clients share one
// bucket; the first time that bites, the proxy says so, once.
func TestUntrustedForwarderWarnsOnce(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}))
	fwd := http.Header{"X-Forwarded-For": {"203.0.113.9"}}
	for range 5 {
		h.serveFrom("10.0.0.7:5000", "GET", "/_matrix/client/versions", fwd)
	}
	warnings := h.logs.FilterMessageSnippet("TRUSTED_PROXIES")
	if warnings.Len() != 1 {
		t.Fatalf("%d warnings, want 1: %v", warnings.Len(), h.logs.All())
	}
	if got := warnings.All()[0].ContextMap()["peer"]; got != "10.0.0.7" {
		t.Errorf("warning names peer %v", got)
	}
	// A client limited without any X-Forwarded-For is no sign of it.
	h2 := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}))
	for range 3 {
		h2.serveFrom("10.0.0.8:5000", "GET", "/_matrix/client/versions", nil)
	}
	if n := h2.logs.FilterMessageSnippet("TRUSTED_PROXIES").Len(); n != 0 {
		t.Errorf("%d warnings without X-Forwarded-For", n)
	}
}
