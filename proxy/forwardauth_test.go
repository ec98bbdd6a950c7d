package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
)

// authFrom sends an auth request straight to the forward-auth handler as if
// from peer (the ingress).
func (h *harness) authFrom(peer, method, target string, hdr http.Header) *httptest.ResponseRecorder {
	h.t.Helper()
	req := httptest.NewRequest(method, target, nil)
	req.RemoteAddr = peer
	for k, v := range hdr {
		req.Header[k] = v
	}
	rec := httptest.NewRecorder()
	h.p.ForwardAuth().ServeHTTP(rec, req)
	return rec
}

func (h *harness) auth(target string, hdr http.Header) *httptest.ResponseRecorder {
	h.t.Helper()
	return h.authFrom("192.0.2.10:4000", "GET", target, hdr)
}

func errcodeOf(t *testing.T, body string) string {
	t.Helper()
	var e struct {
		Errcode string `json:"errcode"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("not a Matrix error: %q", body)
	}
	return e.Errcode
}

func hdrs(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// TestForwardAuthProtocols: each ingress's request shape reaches the same
// answer: who the token in the original request belongs to.
func TestForwardAuthProtocols(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	for _, tc := range []struct {
		name, method, target string
		hdr                  http.Header
	}{
		{"nginx auth_request, header", "GET", "/auth", hdrs("Authorization", "Bearer "+tok, "X-Original-URI", "/widget?x=1", "X-Original-Method", "POST")},
		{"nginx auth_request, access_token in the URI", "GET", "/auth", hdrs("X-Original-URI", "/widget?access_token="+tok)},
		{"ingress-nginx auth-url", "GET", "/auth", hdrs("X-Original-URL", "https://svc.example.org/api?access_token="+tok, "X-Original-Method", "GET", "X-Sent-From", "nginx-ingress-controller")},
		{"Traefik ForwardAuth", "GET", "/auth", hdrs("Authorization", "Bearer "+tok, "X-Forwarded-Method", "PUT", "X-Forwarded-Uri", "/api/x", "X-Forwarded-Host", "svc.example.org")},
		{"Caddy forward_auth, access_token", "GET", "/auth", hdrs("X-Forwarded-Method", "GET", "X-Forwarded-Uri", "/media?access_token="+tok)},
		{"Envoy ext_authz, header", "DELETE", "/envoy/-/api/things/1", hdrs("Authorization", "Bearer "+tok)},
		{"Envoy ext_authz, access_token, policy", "GET", "/envoy/users=@alice:hs/api?access_token=" + tok, nil},
		{"Envoy ext_authz, encoded policy", "POST", "/envoy/users=%40alice%3Ahs&guests=deny/api", hdrs("Authorization", "Bearer "+tok)},
		{"no original URI: the header alone", "GET", "/auth", hdrs("Authorization", "Bearer "+tok)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := h.authFrom("192.0.2.10:4000", tc.method, tc.target, tc.hdr)
			if rec.Code != 200 {
				t.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			if got := rec.Header(); got.Get("X-Matrix-User-ID") != "@alice:hs" || got.Get("X-Matrix-Device-ID") != "PHONE" || got.Get("X-Matrix-Is-Guest") != "false" {
				t.Errorf("identity headers: %v", got)
			}
			if rec.Body.Len() != 0 {
				t.Errorf("body %q", rec.Body)
			}
		})
	}
	if n := h.hs.whoamiCalls.Load(); n != 1 {
		t.Errorf("homeserver asked %d times, want 1 (then the cache)", n)
	}
}

// TestForwardAuthDenies: every way a request is refused, with its status,
// Matrix error code and metric result.
func TestForwardAuthDenies(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MASSecret = "mas-shared-secret-0123456789" })
	alice := h.hs.login("@alice:hs", "PHONE")
	bob := h.hs.login("@bob:other", "LAPTOP")
	guest := h.hs.login("@guest1:hs", "G")
	root := h.hs.login("@root:hs", "ADM")
	h.hs.guests["@guest1:hs"] = true
	h.hs.admins["@root:hs"] = true
	for _, tc := range []struct {
		name, target string
		hdr          http.Header
		status       int
		errcode      string
		result       string
	}{
		{"no token", "/auth", hdrs("X-Original-URI", "/x"), 401, "M_MISSING_TOKEN", "unauthenticated"},
		{"made-up token", "/auth", bearer("syt_made_up"), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"made-up token, Envoy", "/envoy/-/x?access_token=syt_made_up", nil, 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"header and access_token both", "/auth", hdrs("Authorization", "Bearer "+alice, "X-Original-URI", "/x?access_token="+alice), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"not Bearer", "/auth", hdrs("Authorization", "Basic "+alice), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"origin headers disagree", "/auth", hdrs("X-Original-URI", "/x?access_token="+alice, "X-Forwarded-Uri", "/x?access_token="+bob), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"origin header twice", "/auth", hdrs("X-Forwarded-Uri", "/x?access_token="+alice, "X-Forwarded-Uri", "/y"), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"MAS's secret", "/auth", bearer("mas-shared-secret-0123456789"), 401, "M_UNKNOWN_TOKEN", "unauthenticated"},
		{"guest, default policy", "/auth", bearer(guest), 403, "M_FORBIDDEN", "forbidden"},
		{"guest, guests=deny", "/auth?guests=deny", bearer(guest), 403, "M_FORBIDDEN", "forbidden"},
		{"guest, Envoy, the original query naming a policy", "/envoy/-/x?guests=allow", bearer(guest), 403, "M_FORBIDDEN", "forbidden"},
		{"user not listed", "/auth?users=@carol:hs,@dave:hs", bearer(alice), 403, "M_FORBIDDEN", "forbidden"},
		{"server not listed", "/auth?users=@*:hs", bearer(bob), 403, "M_FORBIDDEN", "forbidden"},
		{"not an admin", "/auth?admin=true", bearer(alice), 403, "M_FORBIDDEN", "forbidden"},
		{"guest on an admin service", "/auth?admin=true&guests=allow", bearer(guest), 403, "M_FORBIDDEN", "forbidden"},
		{"unknown policy parameter", "/auth?admins=true", bearer(root), 500, "M_UNKNOWN", "error"},
		{"bad policy value", "/auth?guests=yes", bearer(alice), 500, "M_UNKNOWN", "error"},
		{"bad user in policy", "/auth?users=alice", bearer(alice), 500, "M_UNKNOWN", "error"},
		{"unknown path", "/oauth2/auth", bearer(alice), 404, "M_UNRECOGNIZED", ""},
		// Caddy's forward_auth with "uri /auth" passes the original query
		// on: the client would choose the policy.
		{"original query as the policy", "/auth?guests=allow", hdrs("Authorization", "Bearer "+guest, "X-Forwarded-Uri", "/svc?guests=allow"), 500, "M_UNKNOWN", "error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := h.counter("matrix_auth_proxy_auth_requests_total", "result", tc.result)
			rec := h.auth(tc.target, tc.hdr)
			if rec.Code != tc.status || errcodeOf(t, rec.Body.String()) != tc.errcode {
				t.Fatalf("got %d %s, want %d %s", rec.Code, rec.Body, tc.status, tc.errcode)
			}
			if rec.Header().Get("X-Matrix-User-ID") != "" {
				t.Error("a refusal names a user")
			}
			if tc.status == 401 && !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("401 without WWW-Authenticate: %v", rec.Header())
			}
			if tc.result != "" {
				if got := h.counter("matrix_auth_proxy_auth_requests_total", "result", tc.result); got != before+1 {
					t.Errorf("auth_requests_total{result=%q}: %v, want %v", tc.result, got, before+1)
				}
			}
		})
	}
	// MAS's secret is no user's token: the homeserver is never asked about it.
	for _, rq := range h.hs.requests() {
		if strings.Contains(rq.Header.Get("Authorization"), "mas-shared-secret") {
			t.Errorf("the homeserver was asked about MAS's secret: %s", rq.RequestURI)
		}
	}
}

// TestForwardAuthPolicies: what each policy admits.
func TestForwardAuthPolicies(t *testing.T) {
	h := newHarness(t)
	alice := h.hs.login("@alice:hs", "PHONE")
	bob := h.hs.login("@bob:other.org", "LAPTOP")
	guest := h.hs.login("@guest1:hs", "G")
	root := h.hs.login("@root:hs", "ADM")
	h.hs.guests["@guest1:hs"] = true
	h.hs.admins["@root:hs"] = true
	toks := map[string]string{"alice": alice, "bob": bob, "guest": guest, "root": root}
	for _, tc := range []struct {
		policy string
		admits []string // the others are refused with 403
	}{
		{"", []string{"alice", "bob", "root"}},
		{"guests=allow", []string{"alice", "bob", "guest", "root"}},
		{"users=@alice:hs", []string{"alice"}},
		{"users=@alice:hs&users=@*:other.org", []string{"alice", "bob"}},
		{"users=@*:hs", []string{"alice", "root"}},
		{"users=@*:hs&guests=allow", []string{"alice", "guest", "root"}},
		{"admin=true", []string{"root"}},
		{"admin=false", []string{"alice", "bob", "root"}},
		{"admin=true&users=@alice:hs", nil},
	} {
		for name, tok := range toks {
			rec := h.auth("/auth?"+tc.policy, bearer(tok))
			want := 403
			for _, a := range tc.admits {
				if a == name {
					want = 200
				}
			}
			if rec.Code != want {
				t.Errorf("policy %q, %s: %d %s, want %d", tc.policy, name, rec.Code, rec.Body, want)
			}
			if want == 200 && rec.Header().Get("X-Matrix-Is-Guest") != map[bool]string{true: "true", false: "false"}[name == "guest"] {
				t.Errorf("policy %q, %s: X-Matrix-Is-Guest %q", tc.policy, name, rec.Header().Get("X-Matrix-Is-Guest"))
			}
		}
	}
}

// TestForwardAuthCoherence: the answers come from the token cache, so a
// logout through the proxy is refused at once, and the admin answer is
// asked once and dropped with the token.
func TestForwardAuthCoherence(t *testing.T) {
	h := newHarness(t)
	root := h.hs.login("@root:hs", "ADM")
	h.hs.admins["@root:hs"] = true
	for range 3 {
		if rec := h.auth("/auth?admin=true", bearer(root)); rec.Code != 200 {
			t.Fatalf("admin: %d %s", rec.Code, rec.Body)
		}
	}
	if w, a := h.hs.whoamiCalls.Load(), h.hs.adminCalls.Load(); w != 1 || a != 1 {
		t.Errorf("homeserver asked whoami %d and admin %d times, want 1 and 1", w, a)
	}
	if resp, body := h.do("POST", "/_matrix/client/v3/logout", bearer(root), "{}"); resp.StatusCode != 200 {
		t.Fatalf("logout: %d %s", resp.StatusCode, body)
	}
	rec := h.auth("/auth?admin=true", bearer(root))
	if rec.Code != 401 {
		t.Fatalf("after logout: %d %s", rec.Code, rec.Body)
	}
	if a := h.hs.adminCalls.Load(); a != 1 {
		t.Errorf("admin asked %d times, want 1", a)
	}
	// The negative answer is cached too.
	calls := h.hs.whoamiCalls.Load()
	if rec := h.auth("/auth", bearer(root)); rec.Code != 401 || h.hs.whoamiCalls.Load() != calls {
		t.Errorf("unknown token again: %d, whoami calls %d → %d", rec.Code, calls, h.hs.whoamiCalls.Load())
	}
}

// TestForwardAuthAdminRevokedMidway: a token revoked between whoami and the
// admin check is refused with 401 and dropped.
func TestForwardAuthAdminRevokedMidway(t *testing.T) {
	h := newHarness(t)
	root := h.hs.login("@root:hs", "ADM")
	h.hs.admins["@root:hs"] = true
	if rec := h.auth("/auth", bearer(root)); rec.Code != 200 {
		t.Fatalf("%d", rec.Code)
	}
	h.hs.revoke(func(string, session) bool { return true }) // behind the proxy's back
	if rec := h.auth("/auth?admin=true", bearer(root)); rec.Code != 401 {
		t.Fatalf("admin check of a revoked token: %d %s", rec.Code, rec.Body)
	}
	calls := h.hs.whoamiCalls.Load()
	if rec := h.auth("/auth", bearer(root)); rec.Code != 401 || h.hs.whoamiCalls.Load() != calls+1 {
		t.Errorf("the positive answer was not dropped: %d", rec.Code)
	}
}

// TestForwardAuthHomeserverTrouble: an outage is a 502 or 504, never a 401,
// for whoami and for the admin check alike.
func TestForwardAuthHomeserverTrouble(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy string
		serve  func(w http.ResponseWriter, r *http.Request) bool
		status int
	}{
		{"whoami 500", "", func(w http.ResponseWriter, r *http.Request) bool {
			writeJSON(w, 500, `{"errcode":"M_UNKNOWN"}`)
			return true
		}, 502},
		{"whoami hangs", "", func(w http.ResponseWriter, r *http.Request) bool {
			<-r.Context().Done()
			return true
		}, 504},
		{"whoami connection cut", "", func(w http.ResponseWriter, r *http.Request) bool {
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return true
		}, 502},
		{"admin check 502", "admin=true", func(w http.ResponseWriter, r *http.Request) bool {
			if strings.HasSuffix(r.URL.Path, "/admin") {
				writeJSON(w, 502, `{}`)
				return true
			}
			return false
		}, 502},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) { c.Cache.LookupTimeout = 200 * time.Millisecond })
			root := h.hs.login("@root:hs", "ADM")
			h.hs.admins["@root:hs"] = true
			h.hs.setOverride(tc.serve)
			rec := h.auth("/auth?"+tc.policy, bearer(root))
			if rec.Code != tc.status {
				t.Fatalf("got %d %s, want %d", rec.Code, rec.Body, tc.status)
			}
			if got := h.counter("matrix_auth_proxy_auth_requests_total", "result", "error"); got != 1 {
				t.Errorf("error results: %v", got)
			}
		})
	}
}

// TestForwardAuthRateLimit: auth requests are charged to the original
// client as a trusted ingress reports it, and only a trusted one.
func TestForwardAuthRateLimit(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 1e-9, Burst: 2}), func(c *Config) {
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	})
	const ingress, untrusted = "10.1.1.1:5000", "198.51.100.1:5000"
	for _, tc := range []struct {
		name    string
		peer    string
		clients []string // X-Forwarded-For of successive requests
		want    []int
	}{
		// Through the trusted ingress each client has its own bucket.
		{"trusted ingress", ingress, []string{"203.0.113.1", "203.0.113.1", "203.0.113.2", "203.0.113.1"}, []int{401, 401, 401, 429}},
		// An untrusted peer's X-Forwarded-For is ignored: one bucket.
		{"untrusted peer", untrusted, []string{"203.0.113.3", "203.0.113.4", "203.0.113.5"}, []int{401, 401, 429}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for i, xff := range tc.clients {
				rec := h.authFrom(tc.peer, "GET", "/auth", hdrs("X-Forwarded-For", xff, "X-Original-URI", "/"))
				if rec.Code != tc.want[i] {
					t.Errorf("request %d from %s: %d, want %d", i, xff, rec.Code, tc.want[i])
				}
			}
		})
	}
	if got := h.counter("matrix_auth_proxy_auth_requests_total", "result", "rate_limited"); got != 2 {
		t.Errorf("rate_limited results: %v, want 2", got)
	}
}

// TestForwardAuthKeepsTokensOutOfLogs: at debug level, whatever the answer,
// no token reaches the log.
func TestForwardAuthKeepsTokensOutOfLogs(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	for _, tc := range []struct {
		target string
		hdr    http.Header
	}{
		{"/auth", bearer(tok)},
		{"/auth", hdrs("X-Original-URI", "/x?access_token="+tok)},
		{"/auth?access_token=" + tok, nil}, // a token pasted into the auth URL: an invalid policy
		{"/auth?" + tok, nil},
		{"/envoy/" + tok + "/x", nil},
		{"/envoy/-/x?access_token=" + tok, nil},
		{"/auth", bearer(tok + "x")},
		{"/auth?admin=true", bearer(tok)},
	} {
		h.auth(tc.target, tc.hdr)
	}
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool { writeJSON(w, 500, `{}`); return true })
	h.auth("/auth", bearer(tok+"y"))
	if h.logs.Len() == 0 {
		t.Fatal("nothing logged: the test proves nothing")
	}
	for _, e := range h.logs.All() {
		line := e.Message
		for k, v := range e.ContextMap() {
			line += " " + k + "=" + strings.ReplaceAll(strings.ReplaceAll(jsonString(v), "\\", ""), "\"", "")
		}
		if strings.Contains(line, tok) {
			t.Errorf("token in log: %s", line)
		}
	}
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestForwardAuthClientGone: a client that hangs up during the lookup gets
// nothing written and is no error of the homeserver.
func TestForwardAuthClientGone(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	gate := make(chan struct{})
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool { <-gate; return false })
	defer close(gate)
	ctx, cancel := context.WithCancel(t.Context())
	req := httptest.NewRequest("GET", "/auth", nil).WithContext(ctx)
	req.Header.Set("Authorization", "Bearer "+tok)
	rec := httptest.NewRecorder()
	cancel()
	h.p.ForwardAuth().ServeHTTP(rec, req)
	if rec.Code != 200 || rec.Body.Len() != 0 || rec.Header().Get("X-Matrix-User-ID") != "" {
		t.Errorf("wrote %d %q %v", rec.Code, rec.Body, rec.Header())
	}
	if got := h.counter("matrix_auth_proxy_upstream_errors_total"); got != 0 {
		t.Errorf("upstream errors: %v", got)
	}
}

func TestPolicyCacheIsBounded(t *testing.T) {
	var pc policyCache
	for i := range maxPolicies * 2 {
		if _, err := pc.get("users=@u" + strings.Repeat("x", i) + ":hs"); err != nil {
			t.Fatal(err)
		}
	}
	if n := pc.len(); n != maxPolicies {
		t.Errorf("holds %d policies, want %d", n, maxPolicies)
	}
	if _, err := pc.get("users=" + strings.Repeat("@a:hs,", maxPolicyLen/6+1)); err == nil {
		t.Error("a policy over the bound was accepted")
	}
}

func FuzzForwardAuthRequest(f *testing.F) {
	f.Add("/auth", "guests=allow", "/x?access_token=syt_a", "Bearer syt_b")
	f.Add("/envoy/users=@a:hs/x", "access_token=syt_a", "", "")
	f.Add("/auth", "users=@*:hs&admin=true", "https://h/x?access_token=%zz", "Bearer ")
	f.Fuzz(func(t *testing.T, path, query, originalURI, authz string) {
		req := &http.Request{Method: "GET", Header: http.Header{}, RemoteAddr: "192.0.2.1:1"}
		req.URL = &url.URL{Path: path, RawQuery: query}
		if originalURI != "" {
			req.Header.Set("X-Original-URI", originalURI)
		}
		if authz != "" {
			req.Header.Set("Authorization", authz)
		}
		o, ok := readOrigin(req)
		if !ok {
			return
		}
		if pl, err := parsePolicy(o.policy); err == nil && pl.refusal("@a:hs", false) != nil && len(pl.users) == 0 && len(pl.servers) == 0 {
			t.Errorf("policy %q refuses an ordinary user without a user list", o.policy)
		}
		var q []string
		if o.query != "" {
			q = synapseQuery(o.query)["access_token"]
		}
		a := authOf(req.Header["Authorization"], synapseQuery(o.query))
		if a.state == authToken && len(q) > 0 && authz != "" {
			t.Errorf("both forms accepted: %q %q", originalURI, authz)
		}
	})
}

// TestForwardAuthUnstoredAnswers: whoami answers the cache does not store
// are judged by their status: a soft logout is a 401, a refusal a 403, and
// anything else the homeserver's trouble (502), never a 401.
func TestForwardAuthUnstoredAnswers(t *testing.T) {
	for _, tc := range []struct {
		status      int
		body        string
		want        int
		wantErrcode string
	}{
		{401, `{"errcode":"M_UNKNOWN_TOKEN","error":"x","soft_logout":true}`, 401, "M_UNKNOWN_TOKEN"},
		{403, `{"errcode":"M_FORBIDDEN","error":"x"}`, 403, "M_FORBIDDEN"},
		{429, `{"errcode":"M_LIMIT_EXCEEDED","error":"x"}`, 502, "M_UNKNOWN"},
		{200, `{"no_user":true}`, 502, "M_UNKNOWN"},
	} {
		h := newHarness(t)
		tok := h.hs.login("@alice:hs", "PHONE")
		h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
			writeJSON(w, tc.status, tc.body)
			return true
		})
		rec := h.auth("/auth", bearer(tok))
		if rec.Code != tc.want || errcodeOf(t, rec.Body.String()) != tc.wantErrcode {
			t.Errorf("whoami %d %s: got %d %s, want %d", tc.status, tc.body, rec.Code, rec.Body, tc.want)
		}
	}
}

// TestForwardAuthLockedUser: a user MAS locked is refused although the
// homeserver's whoami still answers for the token.
func TestForwardAuthLockedUser(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ServerName = "hs" })
	tok := h.hs.login("@alice:hs", "PHONE")
	h.p.mas.locked.lock("alice")
	if rec := h.auth("/auth", bearer(tok)); rec.Code != 401 {
		t.Errorf("locked user: %d %s", rec.Code, rec.Body)
	}
	h.p.mas.locked.unlock("alice")
	if rec := h.auth("/auth", bearer(tok)); rec.Code != 200 {
		t.Errorf("unlocked user: %d %s", rec.Code, rec.Body)
	}
}

// TestForwardAuthDevicelessToken: an appservice's token passes as its
// sender, with an empty X-Matrix-Device-ID (always present, so no ingress
// lets a client's own through), and its answer is bound to the client.
func TestForwardAuthDevicelessToken(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@as_bot:hs", "")
	rec := h.authFrom("192.0.2.1:1", "GET", "/auth", hdrs("Authorization", "Bearer "+tok, "X-Original-URI", "/x?user_id=@alice:hs"))
	if rec.Code != 200 || rec.Header().Get("X-Matrix-User-ID") != "@as_bot:hs" {
		t.Fatalf("%d %v", rec.Code, rec.Header())
	}
	if v, ok := rec.Header()["X-Matrix-Device-Id"]; !ok || len(v) != 1 || v[0] != "" {
		t.Errorf("X-Matrix-Device-ID: %q, %v", v, ok)
	}
	// The masquerade parameter of the service's URI was not sent.
	if rq, _ := h.hs.lastRequest("whoami"); strings.Contains(rq.RequestURI, "user_id") {
		t.Errorf("whoami asked with %s", rq.RequestURI)
	}
	calls := h.hs.whoamiCalls.Load()
	h.authFrom("192.0.2.2:1", "GET", "/auth", bearer(tok))
	if h.hs.whoamiCalls.Load() != calls+1 {
		t.Error("a device-less answer was shared with another client address")
	}
}

// TestForwardAuthAdminChangeThroughTheProxy: setting a user's admin status
// through the proxy (the admin API's PUT …/users/{u}/admin, or PUT
// …/v2/users/{u} with "admin") drops the cached admin answer at once.
func TestForwardAuthAdminChangeThroughTheProxy(t *testing.T) {
	for _, tc := range []struct{ path, body string }{
		{"/_synapse/admin/v1/users/@root:hs/admin", `{"admin":false}`},
		{"/_synapse/admin/v2/users/@root:hs", `{"admin":false}`},
	} {
		h := newHarness(t)
		root := h.hs.login("@root:hs", "ADM")
		op := h.hs.login("@op:hs", "OPS")
		h.hs.admins["@root:hs"], h.hs.admins["@op:hs"] = true, true
		if rec := h.auth("/auth?admin=true", bearer(root)); rec.Code != 200 {
			t.Fatalf("admin: %d", rec.Code)
		}
		h.hs.mu.Lock()
		h.hs.admins["@root:hs"] = false // what the call below does on Synapse
		h.hs.mu.Unlock()
		if resp, _ := h.do("PUT", tc.path, bearer(op), tc.body); resp.StatusCode != 200 {
			t.Fatalf("%s: %d", tc.path, resp.StatusCode)
		}
		if rec := h.auth("/auth?admin=true", bearer(root)); rec.Code != 403 {
			t.Errorf("after %s %s: %d, want 403 at once", tc.path, tc.body, rec.Code)
		}
	}
}

// TestForwardAuthMisconfigurationLoggedOnce: every request to an invalid
// auth URL is refused, but only the first is an error line.
func TestForwardAuthMisconfigurationLoggedOnce(t *testing.T) {
	h := newHarness(t)
	for range 3 {
		if rec := h.auth("/auth?admins=true", nil); rec.Code != 500 {
			t.Fatalf("%d", rec.Code)
		}
	}
	if n := h.logs.FilterLevelExact(zapcore.ErrorLevel).Len(); n != 1 {
		t.Errorf("%d error lines, want 1", n)
	}
}
