package proxy

// Adversarial review of the revoking-call code (routes.go, effects.go,
// revoke.go, token.go). Each test here demonstrates a way to break the
// promise and FAILS on the code under review; see the report of branch
// h-review. The fake homeserver's overrides reproduce, for the one request
// each test makes, what Synapse 1.163 / Twisted do (cited at each).

import (
	"bufio"
	"io"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// twistedArgs is request.args as Twisted builds it
// (twisted/web/http.py Request.requestReceived): the query parsed with
// parse_qs, then, for a POST with a non-empty body of Content-Type
// application/x-www-form-urlencoded, args.update(parse_qs(body)) — a body
// key replaces the query's values for that key. Synapse's Site keeps
// _parsePOSTFormSubmission at its default, True.
func twistedArgs(r *http.Request, body []byte) map[string][]string {
	args := synapseQuery(r.URL.RawQuery)
	ct := strings.ToLower(strings.TrimSpace(strings.SplitN(r.Header.Get("Content-Type"), ";", 2)[0]))
	if r.Method == http.MethodPost && ct == "application/x-www-form-urlencoded" && len(body) > 0 {
		for k, v := range synapseQuery(string(body)) {
			args[k] = v
		}
	}
	return args
}

// synapseToken is get_access_token_from_request (synapse/api/auth/base.py)
// over Twisted's args.
func synapseToken(r *http.Request, args map[string][]string) string {
	if h := r.Header.Values("Authorization"); len(h) > 0 {
		if _, q := args["access_token"]; q {
			return ""
		}
		tok, _ := strings.CutPrefix(h[0], "Bearer ")
		return tok
	}
	if q := args["access_token"]; len(q) > 0 {
		return q[0]
	}
	return ""
}

// synapseLogout makes the fake homeserver answer POST …/logout the way
// Synapse's LogoutRestServlet does, with the token Synapse reads (form
// bodies included): the caller's device goes with its tokens.
func synapseLogout(hs *fakeHS) func(w http.ResponseWriter, r *http.Request) bool {
	return func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/logout") {
			return false
		}
		body, _ := io.ReadAll(r.Body)
		tok := synapseToken(r, twistedArgs(r, body))
		hs.mu.Lock()
		s, ok := hs.sessions[tok]
		hs.mu.Unlock()
		if !ok {
			writeJSON(w, 401, unknownToken)
			return true
		}
		hs.revoke(func(_ string, o session) bool { return o == s })
		writeJSON(w, 200, `{}`)
		return true
	}
}

var formContent = http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}

// Finding 1 (high): POST /logout with the token in a form-encoded body.
// Twisted merges the body into request.args, so Synapse authenticates the
// call with it and logs that token out; the proxy sees no token at all
// (callerNone) and a success, and flushes the whole cache. Any user can do
// it as often as they can log in.
func TestReviewFormBodyTokenFlushesEveryone(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	bystander := h.hs.login("@bob:hs", "BOB")
	h.whoami(tok)
	h.whoami(bystander)
	h.hs.setOverride(synapseLogout(h.hs))

	h.call(200, "POST", "/_matrix/client/v3/logout", formContent, "access_token="+tok)

	if status, _ := h.whoami(tok); status != 401 {
		t.Errorf("the logged-out token: %d, want 401", status)
	}
	h.cachedWithoutLookup(bystander)
	if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
		t.Errorf("an ordinary user's logout flushed the cache %v times", n)
	}
}

// Finding 1b (medium): the query names token A, the form body token B.
// args.update makes Synapse log out B; the proxy resolves and drops A, and
// B, revoked, is still answered 200 from the cache.
func TestReviewFormBodyTokenReplacesQueryToken(t *testing.T) {
	h := newHarness(t)
	phone := h.hs.login("@alice:hs", "PHONE")
	tablet := h.hs.login("@alice:hs", "TABLET")
	h.whoami(phone)
	h.whoami(tablet)
	h.hs.setOverride(synapseLogout(h.hs))

	h.call(200, "POST", "/_matrix/client/v3/logout?access_token="+phone, formContent, "access_token="+tablet)

	h.hs.setOverride(nil)
	h.hs.mu.Lock()
	_, alive := h.hs.sessions[tablet]
	h.hs.mu.Unlock()
	if alive {
		t.Fatal("the fake did not log out the body's token; the test is wrong")
	}
	if status, _ := h.whoami(tablet); status != 401 {
		t.Errorf("the token Synapse logged out (the body's): whoami %d via the proxy, want 401: a revoked token outlives the logout", status)
	}
}

// Finding 2 (low, latent): a device ID that is not UTF-8 once unquoted. Synapse
// unquotes path parameters with urllib.parse.unquote (UTF-8, errors
// "replace"): DELETE /devices/%FF deletes the device named "\uFFFD", which
// a client can create (login accepts any device_id). The proxy's unquote
// keeps the raw byte 0xFF, drops a device that does not exist, and the
// deleted device's token stays cached. Against Synapse 1.163 it is masked:
// Synapse's JSON encoder escapes non-ASCII ("\ufffd"), and the cache only
// stores answers whose device ID appears literally in the body, so such a
// device's answers are never cached (checked against the real Synapse). A
// homeserver answering whoami in raw UTF-8 (this fake) exposes it.
func TestReviewDeviceIDDecodedAsPythonDoes(t *testing.T) {
	h := newHarness(t)
	laptop := h.hs.login("@alice:hs", "LAPTOP")
	// login() puts the device ID in the token; this token must be ASCII.
	odd := "syt_alice_odd_device_0001"
	h.hs.mu.Lock()
	h.hs.sessions[odd] = session{"@alice:hs", "\uFFFD"}
	h.hs.mu.Unlock()
	h.whoami(laptop)
	h.whoami(odd)
	h.cachedWithoutLookup(odd) // cacheable: the test is meaningful
	// python3 -c 'from urllib.parse import unquote; print(repr(unquote("%FF")))' → '\ufffd'
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodDelete || !strings.Contains(r.URL.Path, "/devices/") {
			return false
		}
		raw := r.URL.EscapedPath()
		dev := strings.ToValidUTF8(unquote(raw[strings.LastIndex(raw, "/")+1:], false), "\uFFFD")
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		h.hs.mu.Lock()
		s := h.hs.sessions[tok]
		h.hs.mu.Unlock()
		h.hs.revoke(func(_ string, o session) bool { return o.user == s.user && o.device == dev })
		writeJSON(w, 200, `{}`)
		return true
	})

	h.call(200, "DELETE", "/_matrix/client/v3/devices/%FF", bearer(laptop), `{`+uiaAuth+`}`)

	if status, _ := h.whoami(odd); status != 401 {
		t.Errorf(`the token of device "\uFFFD", deleted by DELETE /devices/%%FF: whoami %d via the proxy, want 401`, status)
	}
}

// synapseDehydrated is DehydratedDeviceV2Servlet's pattern
// (synapse/rest/client/devices.py, client_patterns(…, releases=())): the
// dots of "org.matrix.msc3814.v1" are unescaped regex dots, so they match
// '/' too.
var synapseDehydrated = regexp.MustCompile(`^/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device$`)

// Finding 3 (medium): DELETE /_matrix/client/unstable/org/matrix/msc3814/v1/dehydrated_device
// routes to the dehydrated device servlet at Synapse (checked with
// Synapse's own client_patterns), which deletes the dehydrated device —
// which may be a live device of the caller (PUT dehydrated_device with an
// existing device_id: check_device_registered keeps it). The proxy allows
// at most two version segments and misses it.
func TestReviewDehydratedDevicePathWithSlashesIsRevoking(t *testing.T) {
	for _, method := range []string{"PUT", "DELETE"} {
		p := "/_matrix/client/unstable/org/matrix/msc3814/v1/dehydrated_device"
		if !synapseDehydrated.MatchString(p) {
			t.Fatal("the pattern does not match; the test is wrong")
		}
		r, _ := http.NewRequest(method, "http://hs"+p, nil)
		if rt := classify(r); len(rt.matches) == 0 {
			t.Errorf("%s %s routes to Synapse's dehydrated device servlet, but the proxy does not see a revoking call", method, p)
		}
	}

	h := newHarness(t)
	phone := h.hs.login("@alice:hs", "PHONE")
	h.whoami(phone)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodDelete || !synapseDehydrated.MatchString(r.URL.EscapedPath()) {
			return false
		}
		// PHONE was made the dehydrated device earlier (PUT with its ID).
		h.hs.revoke(func(_ string, o session) bool { return o.user == "@alice:hs" && o.device == "PHONE" })
		writeJSON(w, 200, `{"device_id":"PHONE"}`)
		return true
	})
	h.call(200, "DELETE", "/_matrix/client/unstable/org/matrix/msc3814/v1/dehydrated_device", bearer(phone), "")
	if status, _ := h.whoami(phone); status != 401 {
		t.Errorf("the deleted device's token: whoami %d via the proxy, want 401", status)
	}
}

// synapsePushRules is PushRuleRestServlet's pattern
// (synapse/rest/client/push_rule.py): the path parameter is ".*", and
// _rule_spec_from_path ignores the segments after the rule's attribute.
var synapsePushRules = regexp.MustCompile(`^/_matrix/client/(api/v1|r0|v3|unstable)/(?P<path>pushrules/.*)$`)

// Finding 4 (medium): any user makes the proxy drop ANOTHER user's entries.
// The dot-resolved reading of a path is applied with every row, including
// the rows that name the user in the path. Synapse does not resolve dots;
// it routes PUT /_matrix/client/v3/pushrules/global/room/r//../…/_synapse/admin/v2/users/@bob:hs
// to the push rules servlet, which creates the caller's own rule "r" and
// answers 200 (extra keys of the body ignored). The proxy's resolved reading
// is PUT /_synapse/admin/v2/users/@bob:hs with {"deactivated": true}, a
// success: Bob's entries go. Same with …/admin/lock/@bob:hs and
// {"locked": true}, and with DELETE …/pushrules/…/_synapse/admin/v2/users/@bob:hs/devices/BOB
// once the rule exists.
func TestReviewDotSegmentsLetAUserDropAnotherUser(t *testing.T) {
	h := newHarness(t)
	mallory := h.hs.login("@mallory:hs", "M")
	bob := h.hs.login("@bob:hs", "BOB")
	h.whoami(mallory)
	h.whoami(bob)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !synapsePushRules.MatchString(r.URL.EscapedPath()) {
			return false
		}
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		h.hs.mu.Lock()
		_, ok := h.hs.sessions[tok]
		h.hs.mu.Unlock()
		if !ok {
			writeJSON(w, 401, unknownToken)
			return true
		}
		writeJSON(w, 200, `{}`) // the caller's own push rule is stored
		return true
	})
	// _matrix client v3 pushrules global room r = 7 segments to pop ("" is skipped).
	up := strings.Repeat("../", 7)
	for _, c := range []struct{ method, path, body string }{
		{"PUT", "/_matrix/client/v3/pushrules/global/room/r//" + up + "_synapse/admin/v2/users/@bob:hs", `{"actions":["notify"],"deactivated":true}`},
		{"PUT", "/_matrix/client/v3/pushrules/global/room/r//" + up + "_matrix/client/v1/admin/lock/@bob:hs", `{"actions":["notify"],"locked":true}`},
		{"DELETE", "/_matrix/client/v3/pushrules/global/room/r/" + up + "_synapse/admin/v2/users/@bob:hs/devices/BOB", ""},
	} {
		conn := h.rawRequest(c.method+" "+c.path+" HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer "+mallory+
			"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "+strconv.Itoa(len(c.body))+"\r\n", c.body)
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", c.method, resp.StatusCode)
		}
		if got, ok := h.hs.lastRequest("pushrules"); !ok || !strings.Contains(got.RequestURI, "/../") {
			t.Fatalf("the homeserver did not get the raw path: %+v", got.RequestURI)
		}
		h.cachedWithoutLookup(bob)
		h.whoami(bob) // re-prime for the next case
	}
}

// Finding 5 (medium): anyone, without a token, makes the proxy drop any
// user's entries. The admin rows name the user in the path and need no
// caller; their effect applies when the outcome is unknown. A client sends
// the headers of POST /_synapse/admin/v1/deactivate/@bob:hs and part of its
// Content-Length, waits past REVOKE_TIMEOUT (the forwarded call's detached
// deadline fires; the homeserver, still waiting for the body, never
// answered), then sends the rest. The body never broke off, so proxyError
// settles the call as performed (outcome unknown) and Bob's entries go.
// Synapse would have answered 401 (no token) had the request reached it.
// (While the client only stalls, the call is not bounded by
// REVOKE_TIMEOUT at all: RoundTrip waits for the body read to return.)
func TestReviewStalledBodyOnAdminRouteDropsAnyUser(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.RevokeTimeout = 200 * time.Millisecond })
	bob := h.hs.login("@bob:hs", "BOB")
	h.whoami(bob)
	body := `{"erase":false}`
	conn := h.rawRequest("POST /_synapse/admin/v1/deactivate/@bob:hs HTTP/1.1\r\nHost: hs\r\n"+
		"Content-Type: application/json\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n", body[:1])
	// The fake records a request once its body read ends: here when the
	// proxy closes the forward at its detached deadline. Then the client
	// completes its body. (The sleep is no assertion on time; it only
	// leaves ReverseProxy time to give up the RoundTrip.)
	eventually(t, "the homeserver got the request", func() bool {
		_, ok := h.hs.lastRequest("/deactivate/")
		return ok
	})
	time.Sleep(time.Second)
	if _, err := conn.Write([]byte(body[1:])); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	resp.Body.Close()
	t.Logf("the call was answered %d", resp.StatusCode)
	h.cachedWithoutLookup(bob)
	if n := h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", "deactivate"); n != 0 {
		t.Errorf("%v deactivate invalidations from a token-less request", n)
	}
}

// Finding 7 (high): a revoking call that is never forwarded is settled as
// performed. httputil.ReverseProxy calls the ErrorHandler, before sending
// anything, for a request asking to upgrade to a protocol name that is not
// printable ASCII ("client tried to switch to invalid protocol"); Go's
// server accepts such a header value (obs-text). proxyError finds the plan
// and settles it with status 0, "unknown", so the row's effect applies at
// once: with the admin rows, which need no caller, anyone without a token
// drops any user's entries, instantly and as often as they like.
func TestReviewUnforwardedCallSettledAsPerformed(t *testing.T) {
	h := newHarness(t)
	bob := h.hs.login("@bob:hs", "BOB")
	for _, req := range []string{
		"POST /_synapse/admin/v1/deactivate/@bob:hs",
		"DELETE /_synapse/admin/v2/users/@bob:hs/devices/BOB",
	} {
		h.whoami(bob)
		conn := h.rawRequest(req+" HTTP/1.1\r\nHost: hs\r\nConnection: Upgrade\r\nUpgrade: \xff\r\nContent-Length: 0\r\n", "")
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		resp.Body.Close()
		if _, ok := h.hs.lastRequest("@bob:hs"); ok {
			t.Fatalf("%s was forwarded; the test expected it refused by ReverseProxy", req)
		}
		t.Logf("%s: %d, never forwarded", req, resp.StatusCode)
		h.cachedWithoutLookup(bob)
	}
}

// Finding 9 (low): OIDC back-channel logout is a Twisted leaf resource
// (backchannel_logout_resource.py: isLeaf = 1), so Synapse serves it for
// any path below it too; the table's row matches the exact path only.
func TestReviewBackchannelLogoutIsALeaf(t *testing.T) {
	for _, p := range []string{
		"/_synapse/client/oidc/backchannel_logout/x",
		"/_synapse/client/oidc/backchannel_logout/x/y",
	} {
		r, _ := http.NewRequest("POST", "http://hs"+p, nil)
		if rt := classify(r); len(rt.matches) == 0 {
			t.Errorf("POST %s reaches Synapse's back-channel logout, but the proxy does not see a revoking call", p)
		}
	}
}

// Finding 10 (high): Synapse answers 500 to any request whose token is not
// ASCII (get_access_token_from_request: parts[1].decode("ascii"), or
// query_params[0].decode("ascii"); the UnicodeDecodeError becomes a 500),
// before any auth check. A 5xx is an unknown outcome, counted as performed,
// and the admin rows need no caller: POST /_synapse/admin/v1/deactivate/@bob:hs?access_token=%FF
// drops Bob's entries at once, from anyone. (Checked against Synapse
// 1.163.2: TestE2EReviewSynapse500DropsAnyUser.)
func TestReviewSynapse500FromANonASCIITokenDropsAnyUser(t *testing.T) {
	h := newHarness(t)
	bob := h.hs.login("@bob:hs", "BOB")
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if q := synapseQuery(r.URL.RawQuery)["access_token"]; len(q) > 0 {
			tok = q[0]
		}
		for i := 0; i < len(tok); i++ {
			if tok[i] >= 0x80 {
				writeJSON(w, 500, `{"errcode":"M_UNKNOWN","error":"Internal server error"}`)
				return true
			}
		}
		return false
	})
	for _, c := range []struct {
		method, uri string
		hdr         http.Header
	}{
		{"POST", "/_synapse/admin/v1/deactivate/@bob:hs?access_token=%FF", nil},
		{"DELETE", "/_synapse/admin/v2/users/@bob:hs/devices/BOB", http.Header{"Authorization": {"Bearer \xff"}}},
		// The client API's lock row matches any two version segments:
		// Synapse routes this to the push rules servlet (path ".*").
		{"PUT", "/_matrix/client/v3/pushrules/admin/lock/@bob:hs?access_token=%FF", nil},
	} {
		h.whoami(bob)
		body := ""
		if c.method == "PUT" {
			body = `{"locked":true}`
		}
		h.call(500, c.method, c.uri, c.hdr, body)
		t.Logf("%s %s", c.method, c.uri)
		h.cachedWithoutLookup(bob)
	}
}

// Finding 11 (low): "Connection: Authorization" makes httputil.ReverseProxy
// strip the Authorization header (hop-by-hop, RFC 9110 section 7.6.1)
// before forwarding, so the proxy and the homeserver read different
// credentials. With a header token A and a query token B, the proxy sees
// both forms (authInvalid) and names A; Synapse sees only B and logs it
// out. B's entries stay cached. (Synapse itself would reject both forms
// at once; the proxy reads the request before hop-by-hop headers go.)
func TestReviewConnectionHeaderStripsTheToken(t *testing.T) {
	h := newHarness(t)
	phone := h.hs.login("@alice:hs", "PHONE")
	tablet := h.hs.login("@alice:hs", "TABLET")
	h.whoami(phone)
	h.whoami(tablet)
	hdr := bearer(phone)
	hdr.Set("Connection", "Authorization")
	h.call(200, "POST", "/_matrix/client/v3/logout?access_token="+tablet, hdr, "")
	if got, ok := h.hs.lastRequest("/logout"); !ok || got.Header.Get("Authorization") != "" {
		t.Fatalf("the homeserver got Authorization %q; the test expected it stripped", got.Header.Get("Authorization"))
	}
	if status, _ := h.whoami(tablet); status != 401 {
		t.Errorf("the query token Synapse logged out: whoami %d via the proxy, want 401", status)
	}
}

// Finding 12 (low): a cached answer is reused for a revoking call from
// another address, which Synapse judges differently for an appservice with
// ip_range_whitelist (get_appservice_user returns None from other
// addresses: "unknown token"). The cache key has no address: a 401 cached
// for the appservice token (with its user_id masquerade) from a refused
// address makes the proxy treat a later POST /logout/all?user_id=… from the
// allowed address as callerToken, and Synapse performs it there: the
// masqueraded user's tokens go, the proxy drops only the appservice
// token's answers.
func TestReviewAnswerCachedForAnotherAddressNamesTheWrongCaller(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")} })
	asTok := h.hs.login("@as_bot:hs", "ASDEV")
	bridged := h.hs.login("@as_bridge_x:hs", "BRIDGEDEV")
	h.whoami(bridged)
	h.cachedWithoutLookup(bridged)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") == "Bearer "+asTok && r.Header.Get("X-Forwarded-For") != "127.0.0.3" {
			writeJSON(w, 401, unknownToken) // the fenced appservice from a refused address
			return true
		}
		return false
	})
	from := func(ip string) http.Header {
		hdr := bearer(asTok)
		hdr.Set("X-Forwarded-For", ip)
		return hdr
	}
	h.call(401, "GET", whoamiV3+"?user_id=@as_bridge_x:hs", from("192.0.2.7"), "")
	h.call(200, "POST", "/_matrix/client/v3/logout/all?user_id=@as_bridge_x:hs", from("127.0.0.3"), "")
	if status, _ := h.whoami(bridged); status != 401 {
		t.Errorf("the bridged user's token, logged out by the appservice: whoami %d via the proxy, want 401", status)
	}
}
