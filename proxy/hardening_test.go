package proxy

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// The tests of this file pin down the promise off the happy path: a
// revocation the homeserver performed is never lost, no ordinary client can
// flush the cache, paths are read as Synapse reads them, and slow bodies
// cannot pin memory.

// eventually polls cond every 5 ms for up to 3 s; the effects it waits for
// happen on another goroutine once the homeserver answers.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 600 {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("never happened: %s", what)
}

// cachedWithoutLookup asserts that tok is answered 200 from the cache: no
// homeserver whoami.
func (h *harness) cachedWithoutLookup(tok string) {
	h.t.Helper()
	before := h.hs.whoamiCalls.Load()
	if status, body := h.whoami(tok); status != 200 {
		h.t.Errorf("a bystander's token: %d %s", status, body)
	}
	if n := h.hs.whoamiCalls.Load() - before; n != 0 {
		h.t.Errorf("a bystander's token was looked up again (%d calls): its entry was dropped", n)
	}
}

// logoutHeldBack makes the homeserver perform every logout at once and then
// run then before answering.
func (h *harness) logoutHeldBack(then func(w http.ResponseWriter, r *http.Request)) {
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/logout") {
			return false
		}
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		h.hs.revoke(func(t string, _ session) bool { return t == tok })
		then(w, r)
		return true
	})
}

func TestRevocationSurvivesTheClientHangingUp(t *testing.T) {
	var published []tokencache.Invalidation
	var mu sync.Mutex
	h := newHarness(t, func(c *Config) {
		c.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
			mu.Lock()
			published = append(published, inv)
			mu.Unlock()
		}
	})
	tok := h.hs.login("@alice:hs", "PHONE")
	bystander := h.hs.login("@bob:hs", "BOB")
	h.whoami(tok)
	h.whoami(bystander)

	arrived, answer := make(chan struct{}), make(chan struct{})
	h.logoutHeldBack(func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-answer
		// Give a proxy that would cancel the call with its client the
		// time to do so (the client's hang-up reaches the server
		// asynchronously); a detached call is not cancelled.
		select {
		case <-r.Context().Done():
			return
		case <-time.After(300 * time.Millisecond):
		}
		writeJSON(w, 200, `{}`)
	})
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, "POST", h.front.URL+"/_matrix/client/v3/logout", nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	<-arrived
	cancel() // the phone loses signal
	<-done
	close(answer) // the homeserver answers after the client left
	eventually(t, "the logged-out token gets 401 through the proxy", func() bool {
		status, _ := h.whoami(tok)
		return status == 401
	})
	h.cachedWithoutLookup(bystander)
	mu.Lock()
	defer mu.Unlock()
	if len(published) == 0 || published[0].Scope != tokencache.ScopeToken || published[0].Reason != reasonLogout {
		t.Errorf("the invalidation was not handed to the bus: %+v", published)
	}
}

func TestUnknownOutcomeCountsAsPerformed(t *testing.T) {
	tests := []struct {
		name   string
		then   func(w http.ResponseWriter, r *http.Request)
		status int
	}{
		{"connection dropped", func(w http.ResponseWriter, _ *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close()
			}
		}, 502},
		{"server error", func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, 500, `{"errcode":"M_UNKNOWN","error":"Internal server error"}`)
		}, 500},
		{"timeout", func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }, 504},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) { c.RevokeTimeout = 200 * time.Millisecond })
			tok := h.hs.login("@alice:hs", "PHONE")
			bystander := h.hs.login("@bob:hs", "BOB")
			h.whoami(tok)
			h.whoami(bystander)
			h.logoutHeldBack(tt.then)
			h.call(tt.status, "POST", "/_matrix/client/v3/logout", bearer(tok), "")
			if status, _ := h.whoami(tok); status != 401 {
				t.Errorf("after a logout with an unknown outcome the token got %d, want 401", status)
			}
			h.cachedWithoutLookup(bystander)
			if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
				t.Errorf("flushed %v times", n)
			}
		})
	}
}

// TestNoOrdinaryUserCanFlush: every request of item 2 of the hardening
// issue, made by Alice, drops at most Alice's entries, never Bob's.
func TestNoOrdinaryUserCanFlush(t *testing.T) {
	tests := []struct {
		name        string
		method, uri string
		header      bool
		body        string
		status      int
		aliceGone   bool // the token that made the call
		tabletGone  bool // Alice's other device
	}{
		{"two query tokens", "POST", "/_matrix/client/v3/logout?access_token=TOKEN&access_token=TOKEN", false, "", 200, true, false},
		{"query token then another", "POST", "/_matrix/client/v3/logout?access_token=TOKEN;access_token=junk", false, "", 200, true, false},
		{"empty devices with empty user_id", "POST", "/_matrix/client/v3/delete_devices?user_id=", true,
			`{"devices":[],` + uiaAuth + `}`, 200, false, false},
		{"logout with empty user_id", "POST", "/_matrix/client/v3/logout?user_id=", true, "", 200, true, false},
		{"password with empty user_id", "POST", "/_matrix/client/v3/account/password?user_id=", true,
			`{"new_password":"x",` + uiaAuth + `}`, 200, false, true},
		{"query Go rejects", "POST", "/_matrix/client/v3/logout?x=%zz", true, "", 200, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			tablet := h.hs.login("@alice:hs", "TABLET")
			bystander := h.hs.login("@bob:hs", "BOB")
			for _, x := range []string{tok, tablet, bystander} {
				h.whoami(x)
			}
			var hdr http.Header
			if tt.header {
				hdr = bearer(tok)
			}
			h.call(tt.status, tt.method, strings.ReplaceAll(tt.uri, "TOKEN", tok), hdr, tt.body)
			for name, c := range map[string]struct {
				tok  string
				gone bool
			}{"caller": {tok, tt.aliceGone}, "tablet": {tablet, tt.tabletGone}} {
				if status, _ := h.whoami(c.tok); (status == 401) != c.gone {
					t.Errorf("%s: %d after the call, want revoked=%v", name, status, c.gone)
				}
			}
			h.cachedWithoutLookup(bystander)
			if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
				t.Errorf("flushed %v times", n)
			}
		})
	}
}

// TestLogoutOfAnExpiredToken: Synapse lets a client log out a token that
// has expired (whoami then says only soft_logout). The proxy cannot learn
// whose token it was; it drops that token's answers and flushes nothing.
func TestLogoutOfAnExpiredToken(t *testing.T) {
	h := newHarness(t)
	bystander := h.hs.login("@bob:hs", "BOB")
	h.whoami(bystander)
	const expired = "syt_expired_token"
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") != "Bearer "+expired {
			return false
		}
		if strings.HasSuffix(r.URL.Path, "/logout") {
			writeJSON(w, 200, `{}`)
		} else {
			writeJSON(w, 401, `{"errcode":"M_UNKNOWN_TOKEN","error":"Access token has expired","soft_logout":true}`)
		}
		return true
	})
	h.call(200, "POST", "/_matrix/client/v3/logout", bearer(expired), "")
	h.cachedWithoutLookup(bystander)
	if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
		t.Errorf("flushed %v times", n)
	}
	if n := h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", "logout"); n != 0 {
		t.Errorf("dropped %v entries, want none (the expired token was never cached)", n)
	}
}

// TestTokenlessSuccessFlushesAndIsCounted: a password reset by email carries
// no token; only then does a success flush, counted with its route.
func TestTokenlessSuccessFlushesAndIsCounted(t *testing.T) {
	h := newHarness(t)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/account/password") {
			writeJSON(w, 200, `{}`)
			return true
		}
		return false
	})
	h.whoami(h.hs.login("@bob:hs", "BOB"))
	h.call(200, "POST", "/_matrix/client/v3/account/password", nil, `{"new_password":"x"}`)
	if n := h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "password"); n != 1 {
		t.Errorf("flushes{route=password} = %v, want 1", n)
	}
	if n := h.counter("matrix_auth_proxy_token_cache_entries"); n != 0 {
		t.Errorf("entries after the flush: %v", n)
	}
}

// TestRevokingCallNotForwardedWhenTheCallerCannotBeResolved: if the
// homeserver cannot answer whoami for the caller, the call is not forwarded
// (it would revoke what the proxy could not name): 502, never a flush.
func TestRevokingCallNotForwardedWhenTheCallerCannotBeResolved(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/account/whoami") {
			writeJSON(w, 503, `{"errcode":"M_UNKNOWN","error":"overloaded"}`)
			return true
		}
		return false
	})
	h.call(503, "POST", "/_matrix/client/v3/logout", bearer(tok), "")
	if _, ok := h.hs.lastRequest("/logout"); ok {
		t.Error("the logout was forwarded although its caller could not be resolved")
	}
}

func TestDeviceIDsAreTakenAsSynapseTakesThem(t *testing.T) {
	for _, path := range []string{"/_matrix/client/v3/devices/%2E%2E", "/_matrix/client/v3/devices/.."} {
		t.Run(path, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			dots := h.hs.login("@alice:hs", "..")
			h.whoami(tok)
			h.whoami(dots)
			h.call(200, "DELETE", path, bearer(tok), `{`+uiaAuth+`}`)
			if status, _ := h.whoami(dots); status != 401 {
				t.Errorf("the device named .. was deleted, its token got %d from the proxy", status)
			}
		})
	}
}

func TestRoutesAddedByTheHardening(t *testing.T) {
	t.Run("dehydrated device", func(t *testing.T) {
		for _, method := range []string{"PUT", "DELETE"} {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			other := h.hs.login("@alice:hs", "OLD")
			h.whoami(tok)
			h.whoami(other)
			h.hs.revoke(func(_ string, s session) bool { return s.device == "OLD" }) // what Synapse does
			h.call(200, method, "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", bearer(tok), `{}`)
			if status, _ := h.whoami(other); status != 401 {
				t.Errorf("%s dehydrated_device: the replaced device's token got %d", method, status)
			}
		}
	})
	t.Run("account lock", func(t *testing.T) {
		h := newHarness(t)
		admin := h.hs.login("@admin:hs", "ADMIN")
		victim := h.hs.login("@eve:hs", "EVE")
		h.whoami(victim)
		h.hs.revoke(func(_ string, s session) bool { return s.user == "@eve:hs" })
		h.call(200, "PUT", "/_matrix/client/v1/admin/lock/%40eve%3Ahs", bearer(admin), `{"locked":false}`)
		if status, _ := h.whoami(victim); status != 200 {
			t.Errorf("an unlock dropped the user: %d", status)
		}
		h.call(200, "PUT", "/_matrix/client/unstable/uk.timedout.msc4323/admin/lock/@eve:hs", bearer(admin), `{"locked":true}`)
		if status, _ := h.whoami(victim); status != 401 {
			t.Errorf("after a lock the user's token got %d", status)
		}
	})
	t.Run("OIDC back-channel logout", func(t *testing.T) {
		h := newHarness(t)
		h.whoami(h.hs.login("@bob:hs", "BOB"))
		h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
			if strings.HasSuffix(r.URL.Path, "/backchannel_logout") {
				writeJSON(w, 200, `{}`)
				return true
			}
			return false
		})
		h.call(200, "POST", "/_synapse/client/oidc/backchannel_logout", nil, "logout_token=x")
		if n := h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "sso_logout"); n != 1 {
			t.Errorf("flushes{route=sso_logout} = %v, want 1", n)
		}
	})
}

func TestEvery401ButAChallengeDropsTheToken(t *testing.T) {
	tests := []struct {
		name, body string
		dropped    bool
	}{
		{"locked", `{"errcode":"M_USER_LOCKED","error":"This account has been locked"}`, true},
		{"soft logout", `{"errcode":"M_UNKNOWN_TOKEN","error":"expired","soft_logout":true}`, true},
		{"unreadable", `<html>no</html>`, true},
		{"user-interactive auth", `{"session":"s","flows":[{"stages":["m.login.password"]}],"params":{}}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			h.whoami(tok)
			h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, "/sync") {
					writeJSON(w, 401, tt.body)
					return true
				}
				return false
			})
			h.call(401, "GET", "/_matrix/client/v3/sync", bearer(tok), "")
			before := h.hs.whoamiCalls.Load()
			h.whoami(tok)
			if lookedUp := h.hs.whoamiCalls.Load() > before; lookedUp != tt.dropped {
				t.Errorf("token dropped: %v, want %v", lookedUp, tt.dropped)
			}
		})
	}
}

// rawRequest sends head (and body) on a new connection to the proxy and
// returns the connection, for requests net/http's client cannot stall.
func (h *harness) rawRequest(head, body string) net.Conn {
	h.t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(h.front.URL, "http://"))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte(head + "\r\n" + body)); err != nil {
		h.t.Fatal(err)
	}
	return conn
}

func TestSlowBodyGets408AndIsNotForwarded(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.BodyReadTimeout = 100 * time.Millisecond })
	tok := h.hs.login("@alice:hs", "PHONE")
	conn := h.rawRequest("POST /_matrix/client/v3/delete_devices HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer "+tok+
		"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n", `{"devices":`)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer to a stalled body: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout {
		t.Errorf("stalled body: %d, want 408", resp.StatusCode)
	}
	if _, ok := h.hs.lastRequest("/delete_devices"); ok {
		t.Error("a body that never arrived was forwarded")
	}
}

func TestBodiesOverTheMemoryBoundAreForwardedUnreadAndInvalidateMore(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.BodyMemory = 100
		c.BodyReadTimeout = 5 * time.Second
	})
	tok := h.hs.login("@alice:hs", "PHONE")
	tablet := h.hs.login("@alice:hs", "TABLET")
	h.whoami(tok)
	h.whoami(tablet)
	// A stalled body holds the whole budget.
	staller := h.hs.login("@mallory:hs", "M")
	h.rawRequest("POST /_matrix/client/v3/delete_devices HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer "+staller+
		"\r\nContent-Length: 100\r\n", `{`)
	eventually(t, "the stalled body holds the budget", func() bool {
		return !h.p.bodyBudget.TryAcquire(1) || func() bool {
			h.p.bodyBudget.Release(1)
			return false
		}()
	})
	body := `{"devices":["PHONE"],` + uiaAuth + `}`
	h.call(200, "POST", "/_matrix/client/v3/delete_devices", bearer(tablet), body)
	if r, ok := h.hs.lastRequest("/delete_devices"); !ok || string(r.Body) != body {
		t.Fatalf("the unread body did not reach the homeserver byte for byte: %q", r.Body)
	}
	if n := h.counter("matrix_auth_proxy_revoking_bodies_unread_total"); n != 1 {
		t.Errorf("bodies unread: %v, want 1", n)
	}
	// Unread, the body could name any device: the whole user goes.
	before := h.hs.whoamiCalls.Load()
	h.whoami(tablet)
	if h.hs.whoamiCalls.Load() == before {
		t.Error("the caller's own device stayed cached although the body was not read")
	}
}

// TestHangUpStillLearnsTheAnswer: the call goes on without its client, so
// the proxy acts on what the homeserver really answered. A token-less
// password reset (by email) flushes only on a success it saw: were the
// call cancelled with its client, the outcome would be unknown and the
// reset's revocations missed.
func TestHangUpStillLearnsTheAnswer(t *testing.T) {
	h := newHarness(t)
	h.whoami(h.hs.login("@bob:hs", "BOB"))
	arrived, answer := make(chan struct{}), make(chan struct{})
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/account/password") {
			return false
		}
		close(arrived)
		<-answer
		// Give a proxy that would cancel the call with its client the
		// time to do so (the client's hang-up reaches the server
		// asynchronously); a detached call is not cancelled.
		select {
		case <-r.Context().Done():
			return true
		case <-time.After(300 * time.Millisecond):
		}
		writeJSON(w, 200, `{}`)
		return true
	})
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, "POST", h.front.URL+"/_matrix/client/v3/account/password",
		strings.NewReader(`{"new_password":"x"}`))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	<-arrived
	cancel()
	<-done
	close(answer)
	eventually(t, "the reset's success flushes the cache", func() bool {
		return h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "password") == 1
	})
}
