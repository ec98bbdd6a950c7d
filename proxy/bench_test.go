package proxy

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/zap"
)

// discardWriter is the cheapest possible ResponseWriter, so a benchmark
// measures the proxy, not the recorder.
type discardWriter struct {
	h    http.Header
	code int
}

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }

// WriteString, like net/http's own ResponseWriter, lets a string body be
// written without a copy.
func (d *discardWriter) WriteString(s string) (int, error) { return len(s), nil }
func (d *discardWriter) WriteHeader(code int)              { d.code = code }

// BenchmarkWhoamiHit is a cached whoami answered by ServeHTTP: token
// extraction, key hash, cache lookup, metrics and the response write. The
// "limited" variant adds the rate limiter (key choice and bucket update), so
// the difference between the two is what rate limiting costs per request:
//
//	go test -run XXX -bench WhoamiHit -benchmem ./proxy/
func BenchmarkWhoamiHit(b *testing.B) {
	for _, bc := range []struct {
		name string
		rl   RateLimitConfig
	}{
		{"unlimited", RateLimitConfig{}},
		// The harness's clock stands still: Burst bounds the
		// iterations (1e6 ran out on a fast machine).
		{"limited", RateLimitConfig{RPS: 1e9, Burst: 1e12}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			h := newHarness(b, limited(bc.rl), func(c *Config) { c.Logger = zap.NewNop() })
			tok := h.hs.login("@alice:hs", "PHONE")
			req := httptest.NewRequest("GET", whoamiV3, nil)
			req.RemoteAddr = "192.0.2.1:5000"
			req.Header.Set("Authorization", "Bearer "+tok)
			w := &discardWriter{h: http.Header{}}
			h.p.ServeHTTP(w, req) // fill the cache
			if w.code != 200 {
				b.Fatalf("warm-up: %d", w.code)
			}
			b.ReportAllocs()
			for b.Loop() {
				clear(w.h)
				h.p.ServeHTTP(w, req)
			}
			if w.code != 200 {
				b.Fatalf("got %d", w.code)
			}
		})
	}
}

// BenchmarkForwardAuthAllowed is an allowed forward-auth request answered
// from the cache: the original request's token read from the headers an
// ingress sends, key hash, cache lookup, policy (parsed once, then looked
// up), is_guest, identity headers and the metric. Compare with
// BenchmarkWhoamiHit; "admin" adds the cached admin answer:
//
//	go test -run XXX -bench 'WhoamiHit|ForwardAuthAllowed' -benchmem ./proxy/
func BenchmarkForwardAuthAllowed(b *testing.B) {
	for _, bc := range []struct {
		name, target string
		rl           RateLimitConfig
	}{
		{"unlimited", "/auth", RateLimitConfig{}},
		{"limited", "/auth", RateLimitConfig{RPS: 1e9, Burst: 1e12}},
		{"admin", "/auth?admin=true", RateLimitConfig{}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			h := newHarness(b, limited(bc.rl), func(c *Config) { c.Logger = zap.NewNop() })
			tok := h.hs.login("@alice:hs", "PHONE")
			h.hs.admins["@alice:hs"] = true
			req := httptest.NewRequest("GET", bc.target, nil)
			req.RemoteAddr = "192.0.2.1:5000"
			req.Header.Set("Authorization", "Bearer "+tok)
			req.Header.Set("X-Original-URI", "/widget/index.html?room=!r:hs")
			req.Header.Set("X-Original-Method", "GET")
			w := &discardWriter{h: http.Header{}}
			fa := h.p.ForwardAuth()
			fa.ServeHTTP(w, req) // fill the cache
			if w.code != 200 {
				b.Fatalf("warm-up: %d", w.code)
			}
			b.ReportAllocs()
			for b.Loop() {
				clear(w.h)
				fa.ServeHTTP(w, req)
			}
			if w.code != 200 || w.h.Get("X-Matrix-User-ID") != "@alice:hs" {
				b.Fatalf("got %d %v", w.code, w.h)
			}
		})
	}
}
