package proxy

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestWhoamiMissThenHit(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	want := `{"user_id":"@alice:hs","is_guest":false,"device_id":"PHONE"}`

	// r0 and v3, header and query parameter: one entry, one homeserver call.
	for i, req := range []struct {
		path string
		hdr  http.Header
	}{
		{whoamiV3, bearer(tok)},
		{whoamiR0, bearer(tok)},
		{whoamiV3 + "?access_token=" + tok, nil},
		{whoamiR0 + "?access_token=" + tok, nil},
	} {
		resp, body := h.do("GET", req.path, req.hdr, "")
		if resp.StatusCode != 200 || body != want {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		if got := resp.Header.Get("Content-Type"); got != "application/json" {
			t.Errorf("request %d: Content-Type %q", i, got)
		}
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
			t.Errorf("request %d: Access-Control-Allow-Origin %q", i, got)
		}
		if i > 0 && resp.Header.Get("Synapse-Trace-Id") != "" {
			t.Errorf("request %d: a cached answer replayed the per-request trace ID", i)
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != 1 {
		t.Errorf("homeserver whoami calls: %d, want 1", n)
	}
	if hit, miss := h.counter("matrix_auth_proxy_token_cache_lookups_total", "result", "hit"),
		h.counter("matrix_auth_proxy_token_cache_lookups_total", "result", "miss"); hit != 3 || miss != 1 {
		t.Errorf("lookups: hit %v miss %v", hit, miss)
	}
	if n := h.counter("matrix_auth_proxy_upstream_whoami_requests_total", "code", "200"); n != 1 {
		t.Errorf("upstream whoami 200s: %v", n)
	}
	if n := h.counter("matrix_auth_proxy_requests_total", "route", "whoami", "code", "200"); n != 4 {
		t.Errorf("requests_total{whoami,200}: %v", n)
	}
	if n := h.counter("matrix_auth_proxy_token_cache_entries"); n != 1 {
		t.Errorf("entries gauge: %v", n)
	}
	// The lookup reached the homeserver on v3, with the token as a header,
	// and with the client's address.
	r, ok := h.hs.lastRequest("whoami")
	if !ok || r.RequestURI != whoamiV3 || r.Header.Get("Authorization") != "Bearer "+tok || r.Header.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("homeserver received %+v", r)
	}
}

// Requests the cache must not judge reach the homeserver exactly as sent,
// and the proxy never redirects.
// TestWhoamiReadsQueriesAsSynapse: queries Go's parser rejects or finds
// ambiguous are read the way Synapse reads them (the first value; '&' and
// ';' both separate; a bad escape is kept), so they are answered from the
// cache under the token and masquerade Synapse would use.
func TestWhoamiReadsQueriesAsSynapse(t *testing.T) {
	tests := []struct {
		name, query string
		header      bool
		wantQuery   string // the lookup's query at the homeserver
	}{
		{"two query tokens", "access_token=TOKEN&access_token=OTHER", false, ""},
		{"semicolon", "access_token=TOKEN;access_token=OTHER", false, ""},
		{"bad query escape", "access_token=TOKEN&x=%zz", false, ""},
		{"two masquerades", "user_id=@a:hs&user_id=@b:hs", true, "user_id=%40a%3Ahs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@as_bot:hs", "")
			uri := whoamiV3 + "?" + strings.ReplaceAll(tt.query, "TOKEN", tok)
			var hdr http.Header
			if tt.header {
				hdr = bearer(tok)
			}
			for range 3 {
				if resp, body := h.do("GET", uri, hdr, ""); resp.StatusCode != 200 {
					t.Fatalf("status %d: %s", resp.StatusCode, body)
				}
			}
			if n := h.hs.whoamiCalls.Load(); n != 1 {
				t.Errorf("homeserver saw %d whoami calls, want 1 (then the cache)", n)
			}
			r, _ := h.hs.lastRequest("/account/whoami")
			if got := r.Header.Get("Authorization"); got != "Bearer "+tok {
				t.Errorf("lookup sent with %q, want the first token", got)
			}
			if _, q, _ := strings.Cut(r.RequestURI, "?"); q != tt.wantQuery {
				t.Errorf("lookup query %q, want %q", q, tt.wantQuery)
			}
		})
	}
}

func TestWhoamiOddRequestsPassThrough(t *testing.T) {
	tests := []struct {
		name, method, uri string
		hdr               http.Header
	}{
		{"trailing slash", "GET", whoamiV3 + "/", nil},
		{"double slash", "GET", "/_matrix/client/v3//account/whoami", nil},
		{"dot segment", "GET", "/_matrix/client/v3/account/./whoami", nil},
		{"dot-dot segment", "GET", "/_matrix/client/v3/x/../account/whoami", nil},
		{"percent-encoded", "GET", "/_matrix/client/v3/account/%77hoami", nil},
		{"unknown version", "GET", "/_matrix/client/v4/account/whoami", nil},
		{"HEAD", "HEAD", whoamiV3, nil},
		{"POST", "POST", whoamiV3, nil},
		{"no token", "GET", whoamiV3, http.Header{}},
		{"both forms", "GET", whoamiV3 + "?access_token=TOKEN", http.Header{"Authorization": {"Bearer TOKEN"}}},
		{"lower-case scheme", "GET", whoamiV3, http.Header{"Authorization": {"bearer TOKEN"}}},
		{"double space", "GET", whoamiV3, http.Header{"Authorization": {"Bearer  TOKEN"}}},
		{"empty token", "GET", whoamiV3, http.Header{"Authorization": {"Bearer "}}},
		{"basic auth", "GET", whoamiV3, http.Header{"Authorization": {"Basic dXNlcjpwYXNz"}}},
		{"two headers", "GET", whoamiV3, http.Header{"Authorization": {"Bearer TOKEN", "Bearer TOKEN"}}},
		{"empty query token", "GET", whoamiV3 + "?access_token=", http.Header{}},
		{"empty masquerade", "GET", whoamiV3 + "?user_id=", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			uri := strings.ReplaceAll(tt.uri, "TOKEN", tok)
			hdr := tt.hdr
			if hdr == nil {
				hdr = bearer(tok)
			}
			for k, v := range hdr {
				for i := range v {
					v[i] = strings.ReplaceAll(v[i], "TOKEN", tok)
				}
				hdr[k] = v
			}
			for range 2 {
				resp, _ := h.do(tt.method, uri, hdr, "")
				if resp.StatusCode >= 300 && resp.StatusCode < 400 {
					t.Fatalf("proxy redirected: %d %s", resp.StatusCode, resp.Header.Get("Location"))
				}
			}
			reqs := h.hs.requests()
			if len(reqs) != 2 {
				t.Fatalf("homeserver saw %d requests, want both", len(reqs))
			}
			for _, r := range reqs {
				if r.RequestURI != uri || r.Method != tt.method {
					t.Errorf("homeserver received %s %s, want %s %s", r.Method, r.RequestURI, tt.method, uri)
				}
			}
			if n := h.counter("matrix_auth_proxy_token_cache_entries"); n != 0 {
				t.Errorf("an odd request filled the cache: %v entries", n)
			}
		})
	}
}

func TestMasqueradeGetsItsOwnEntry(t *testing.T) {
	h := newHarness(t)
	as := h.hs.login("@as_bot:hs", "")
	plain := whoamiV3 + "?access_token=" + as
	asBob := plain + "&user_id=@bob:hs"
	asBobDev := asBob + "&device_id=BOBDEV"
	want := map[string]string{
		plain:    `{"user_id":"@as_bot:hs","is_guest":false}`,
		asBob:    `{"user_id":"@bob:hs","is_guest":false}`,
		asBobDev: `{"user_id":"@bob:hs","is_guest":false,"device_id":"BOBDEV"}`,
	}
	for range 2 {
		for _, uri := range []string{plain, asBob, asBobDev} {
			resp, body := h.do("GET", uri, nil, "")
			if resp.StatusCode != 200 || body != want[uri] {
				t.Errorf("%s: %d %s, want %s", uri, resp.StatusCode, body, want[uri])
			}
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != 3 {
		t.Errorf("homeserver whoami calls: %d, want one per variant", n)
	}
	if r, _ := h.hs.lastRequest("device_id=BOBDEV"); !strings.Contains(r.RequestURI, "user_id=%40bob%3Ahs") {
		t.Errorf("masquerade not forwarded: %s", r.RequestURI)
	}
	// A masquerade the homeserver forbids is passed on, not cached.
	eve := h.hs.login("@eve:hs", "EVE")
	for range 2 {
		resp, body := h.do("GET", whoamiV3+"?user_id=@bob:hs", bearer(eve), "")
		if resp.StatusCode != 403 || !strings.Contains(body, "M_FORBIDDEN") {
			t.Errorf("forbidden masquerade: %d %s", resp.StatusCode, body)
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != 5 {
		t.Errorf("a 403 was cached: %d homeserver calls, want 5", n)
	}
}

// Only a 200 and a hard 401 M_UNKNOWN_TOKEN are cached; everything else the
// homeserver says is passed on, status, headers and body, and asked again.
func TestWhatIsCached(t *testing.T) {
	tests := []struct {
		name     string
		status   int
		body     string
		header   map[string]string
		cached   bool
		negative bool
	}{
		{"valid", 200, `{"user_id":"@a:hs","device_id":"D"}`, nil, true, false},
		{"unknown token", 401, unknownToken, nil, true, true},
		{"soft logout", 401, `{"errcode":"M_UNKNOWN_TOKEN","error":"expired","soft_logout":true}`, nil, false, false},
		{"missing token", 401, `{"errcode":"M_MISSING_TOKEN","error":"x"}`, nil, false, false},
		{"forbidden", 403, `{"errcode":"M_FORBIDDEN","error":"x"}`, nil, false, false},
		{"rate limited", 429, `{"errcode":"M_LIMIT_EXCEEDED","error":"x","retry_after_ms":2000}`, map[string]string{"Retry-After": "2"}, false, false},
		{"server error", 500, `{"errcode":"M_UNKNOWN","error":"x"}`, nil, false, false},
		{"bad gateway", 502, `<html>nginx</html>`, map[string]string{"Content-Type": "text/html"}, false, false},
		{"200 without user_id", 200, `{"device_id":"D"}`, nil, false, false},
		{"200 not JSON", 200, `hello`, nil, false, false},
		{"200 user_id not a string", 200, `{"user_id":7}`, nil, false, false},
		{"401 not JSON", 401, `nope`, nil, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
				if !strings.HasSuffix(r.URL.Path, "/whoami") {
					return false
				}
				h.hs.whoamiCalls.Add(1)
				for k, v := range tt.header {
					w.Header().Set(k, v)
				}
				if w.Header().Get("Content-Type") == "" {
					w.Header().Set("Content-Type", "application/json")
				}
				w.WriteHeader(tt.status)
				_, _ = w.Write([]byte(tt.body))
				return true
			})
			for i := range 2 {
				resp, body := h.do("GET", whoamiV3, bearer("syt_some_token"), "")
				if resp.StatusCode != tt.status || body != tt.body {
					t.Errorf("request %d: got %d %q, want %d %q", i, resp.StatusCode, body, tt.status, tt.body)
				}
				for k, v := range tt.header {
					if got := resp.Header.Get(k); got != v {
						t.Errorf("request %d: %s %q, want %q", i, k, got, v)
					}
				}
				if resp.Header.Get("Access-Control-Allow-Origin") != "*" {
					t.Errorf("request %d: no CORS header", i)
				}
			}
			wantCalls := int64(2)
			if tt.cached {
				wantCalls = 1
			}
			if n := h.hs.whoamiCalls.Load(); n != wantCalls {
				t.Errorf("homeserver calls: %d, want %d", n, wantCalls)
			}
			if tt.negative {
				if n := h.counter("matrix_auth_proxy_token_cache_lookups_total", "result", "negative_hit"); n != 1 {
					t.Errorf("negative hits: %v", n)
				}
			}
		})
	}
}

func TestNegativeCachingCanBeDisabled(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Cache.NegativeTTL = 0 })
	for range 3 {
		if code, _ := h.whoami("syt_bogus"); code != 401 {
			t.Fatalf("got %d", code)
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != 3 {
		t.Errorf("homeserver calls: %d, want 3", n)
	}
}

func TestCacheExpiry(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	h.whoami(tok)
	h.whoami("syt_bogus")
	h.now.Advance(10 * time.Second)
	h.whoami("syt_bogus") // the negative answer expired
	h.whoami(tok)
	if n := h.hs.whoamiCalls.Load(); n != 3 {
		t.Errorf("after 10s: %d homeserver calls, want 3", n)
	}
	h.now.Advance(2 * time.Minute)
	h.whoami(tok) // the positive one too
	if n := h.hs.whoamiCalls.Load(); n != 4 {
		t.Errorf("after 2m10s: %d homeserver calls, want 4", n)
	}
}

func TestConcurrentMissesMakeOneHomeserverCall(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	h.hs.whoamiGate = make(chan struct{})
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if code, _ := h.whoami(tok); code != 200 {
				t.Errorf("got %d", code)
			}
		})
	}
	// Give every request time to reach the proxy, then answer.
	for h.counter("matrix_auth_proxy_upstream_whoami_requests_total", "code", "200") == 0 && h.hs.whoamiCalls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	close(h.hs.whoamiGate)
	wg.Wait()
	if n := h.hs.whoamiCalls.Load(); n != 1 {
		t.Errorf("homeserver whoami calls: %d, want 1", n)
	}
}

// An outage must never look like "your token is invalid": clients log out
// on 401 M_UNKNOWN_TOKEN.
func TestHomeserverTroubleIsNever401(t *testing.T) {
	t.Run("down", func(t *testing.T) {
		h := newHarness(t)
		h.hs.srv.Close()
		resp, body := h.do("GET", whoamiV3, bearer("syt_any"), "")
		if resp.StatusCode != 502 || !strings.Contains(body, `"errcode":"M_UNKNOWN"`) {
			t.Errorf("got %d %s", resp.StatusCode, body)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("headers: %v", resp.Header)
		}
		if n := h.counter("matrix_auth_proxy_upstream_errors_total", "kind", "refused"); n != 1 {
			t.Errorf("upstream_errors_total{refused}: %v", n)
		}
		// Passthrough requests fail the same way.
		resp, body = h.do("GET", "/_matrix/client/v3/sync", bearer("syt_any"), "")
		if resp.StatusCode != 502 || !strings.Contains(body, `"errcode":"M_UNKNOWN"`) {
			t.Errorf("passthrough: %d %s", resp.StatusCode, body)
		}
		// And the failure was not cached.
		if n := h.counter("matrix_auth_proxy_token_cache_entries"); n != 0 {
			t.Errorf("entries: %v", n)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.Cache.LookupTimeout = 50 * time.Millisecond })
		release := make(chan struct{})
		defer close(release)
		h.hs.whoamiGate = release
		resp, body := h.do("GET", whoamiV3, bearer("syt_any"), "")
		if resp.StatusCode != 504 || !strings.Contains(body, `"errcode":"M_UNKNOWN"`) {
			t.Errorf("got %d %s", resp.StatusCode, body)
		}
		if n := h.counter("matrix_auth_proxy_upstream_errors_total", "kind", "timeout"); n != 1 {
			t.Errorf("upstream_errors_total{timeout}: %v", n)
		}
	})
}

// whoamiFrom sends a whoami with token from client address addr straight to
// the proxy's handler, and returns the status and body.
func (h *harness) whoamiFrom(addr, uri, tok string) (int, string) {
	h.t.Helper()
	req := httptest.NewRequest("GET", uri, nil)
	req.RemoteAddr = addr + ":40000"
	req.Header.Set("Authorization", "Bearer "+tok)
	w := httptest.NewRecorder()
	h.p.ServeHTTP(w, req)
	return w.Code, w.Body.String()
}

// fencedAddr is the one client address the fake fenced appservice's token
// works from, as Synapse's ip_range_whitelist allows.
const fencedAddr = "192.0.2.3"

// serveFenced makes the fake homeserver answer whoami for the token
// "as_fenced" as Synapse answers an appservice whose ip_range_whitelist
// admits only fencedAddr: from there, the sender (or the user it
// masquerades as), device-less; from anywhere else, an unknown token. It
// calls arrived, if set, when a whoami arrives, before answering.
func (h *harness) serveFenced(arrived func()) {
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/whoami") || r.Header.Get("Authorization") != "Bearer as_fenced" {
			return false
		}
		h.hs.whoamiCalls.Add(1)
		if arrived != nil {
			arrived()
		}
		if r.Header.Get("X-Forwarded-For") != fencedAddr {
			writeJSON(w, 401, unknownToken)
			return true
		}
		user := "@fenced-bot:hs"
		if u := r.URL.Query().Get("user_id"); u != "" {
			user = u
		}
		writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":false}`, user))
		return true
	})
}

// An answer that depends on the client's address (an appservice's, a
// negative one) is never served to another address.
func TestWhoamiAddressBoundAnswers(t *testing.T) {
	const outsider = "192.0.2.1"
	type step struct {
		addr, uri string
		want      int
	}
	masq := whoamiV3 + "?user_id=@fenced_x:hs"
	tests := []struct {
		name  string
		steps []step
		calls int64
	}{
		{"allowed first", []step{{fencedAddr, whoamiV3, 200}, {fencedAddr, whoamiV3, 200}, {outsider, whoamiV3, 401}}, 2},
		{"outsider first", []step{{outsider, whoamiV3, 401}, {outsider, whoamiV3, 401}, {fencedAddr, whoamiV3, 200}, {fencedAddr, whoamiV3, 200}}, 2},
		{"masquerade, allowed first", []step{{fencedAddr, masq, 200}, {fencedAddr, masq, 200}, {outsider, masq, 401}}, 2},
		{"masquerade, outsider first", []step{{outsider, masq, 401}, {fencedAddr, masq, 200}}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.serveFenced(nil)
			for i, s := range tt.steps {
				if code, body := h.whoamiFrom(s.addr, s.uri, "as_fenced"); code != s.want {
					t.Errorf("step %d from %s: %d %s, want %d", i, s.addr, code, body, s.want)
				}
			}
			if n := h.hs.whoamiCalls.Load(); n != tt.calls {
				t.Errorf("homeserver whoami calls: %d, want %d (the repeats from the cache)", n, tt.calls)
			}
		})
	}
}

// An ordinary user's answer still holds for every address: one lookup.
func TestWhoamiOrdinaryAnswerIsShared(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	for _, addr := range []string{"192.0.2.1", "192.0.2.2", "2001:db8::1"} {
		if code, body := h.whoamiFrom(addr, whoamiV3, tok); code != 200 {
			t.Errorf("from %s: %d %s", addr, code, body)
		}
	}
	if n := h.hs.whoamiCalls.Load(); n != 1 {
		t.Errorf("homeserver whoami calls: %d, want 1", n)
	}
}

// Concurrent misses of one appservice token from two addresses are two
// lookups: one's answer is not the other's.
func TestWhoamiConcurrentMissesFromTwoAddresses(t *testing.T) {
	h := newHarness(t)
	var arrived atomic.Int32
	both := make(chan struct{})
	h.serveFenced(func() {
		if arrived.Add(1) == 2 {
			close(both)
		}
		select { // both lookups must be in flight at once
		case <-both:
		case <-time.After(10 * time.Second):
			t.Error("the second address's lookup never reached the homeserver")
		}
	})
	want := map[string]int{fencedAddr: 200, "192.0.2.1": 401}
	var wg sync.WaitGroup
	for addr, code := range want {
		wg.Go(func() {
			if got, body := h.whoamiFrom(addr, whoamiV3, "as_fenced"); got != code {
				t.Errorf("from %s: %d %s, want %d", addr, got, body, code)
			}
		})
	}
	wg.Wait()
}

// Synapse ignores user_id on an ordinary user's token: 2,000 whoami calls
// with one token and distinct user_id values are answered right and make
// no more than one cache entry, so one client cannot push everyone else out.
// A masquerade the homeserver did not carry out as asked is not stored.
func TestWhoamiUnheldMasqueradeIsNotStored(t *testing.T) {
	h := newHarness(t)
	const alice = "syt_alice_token"
	const aliceBody = `{"user_id":"@alice:hs","is_guest":false,"device_id":"PHONE"}`
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/whoami") {
			return false
		}
		h.hs.whoamiCalls.Add(1)
		switch r.Header.Get("Authorization") {
		case "Bearer " + alice:
			writeJSON(w, 200, aliceBody)
		default: // an appservice that answers without the device asked for
			writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":false}`, r.URL.Query().Get("user_id")))
		}
		return true
	})
	const n = 2000
	for i := range n {
		code, body := h.whoamiFrom("192.0.2.1", fmt.Sprintf("%s?user_id=@x%d:hs", whoamiV3, i), alice)
		if code != 200 || body != aliceBody {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
	}
	if got := h.counter("matrix_auth_proxy_token_cache_entries"); got > 1 {
		t.Errorf("%d whoami calls with distinct user_id made %v cache entries, want at most 1", n, got)
	}
	for range 2 {
		if code, _ := h.whoamiFrom("192.0.2.1", whoamiV3+"?user_id=@bob:hs&device_id=BOBDEV", "as_token"); code != 200 {
			t.Errorf("masquerade: %d", code)
		}
	}
	if calls := h.hs.whoamiCalls.Load(); calls != n+2 {
		t.Errorf("homeserver whoami calls: %d, want %d (nothing stored)", calls, n+2)
	}
}
