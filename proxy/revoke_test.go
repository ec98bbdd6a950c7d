package proxy

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"
)

const uiaAuth = `"auth":{"type":"m.login.password","identifier":{"type":"m.id.user","user":"@alice:hs"},"password":"correct horse","session":"uia1"}`

// TestRevocations checks, for every token-revoking call, that after the
// homeserver said yes the affected tokens get 401 through the proxy at once
// (not after CACHE_TTL), and that the others are still answered from the
// cache.
func TestRevocations(t *testing.T) {
	type tokens map[string]string // name → token
	tests := []struct {
		name string
		// call makes the revoking request(s) with the harness's tokens.
		call     func(h *harness, tok tokens)
		revoked  []string
		reason   string
		lookedUp []string // tokens cached beforehand; default all
	}{
		{
			name: "logout",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/logout", bearer(tok["phone"]), "")
			},
			revoked: []string{"phone"}, reason: "logout",
		},
		{
			name: "logout r0 with query token",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/r0/logout?access_token="+tok["phone"], nil, "")
			},
			revoked: []string{"phone"}, reason: "logout",
		},
		{
			name: "logout/all with a token never looked up",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/logout/all", bearer(tok["tablet"]), "")
			},
			revoked: []string{"phone", "laptop", "tablet"}, reason: "logout_all",
			lookedUp: []string{"phone", "laptop", "bob"},
		},
		{
			name: "DELETE /devices/{id} through user-interactive auth",
			call: func(h *harness, tok tokens) {
				// The first round is a 401 asking for a password: nothing is
				// revoked yet, and the cache must still answer.
				h.call(401, "DELETE", "/_matrix/client/v3/devices/PHONE", bearer(tok["laptop"]), `{}`)
				if h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", "device") != 0 ||
					h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", "unknown_token") != 0 {
					h.t.Error("the UIA round invalidated")
				}
				if code, _ := h.whoami(tok["phone"]); code != 200 {
					h.t.Errorf("after the UIA round: %d", code)
				}
				h.call(200, "DELETE", "/_matrix/client/v3/devices/PHONE", bearer(tok["laptop"]), `{`+uiaAuth+`}`)
			},
			revoked: []string{"phone"}, reason: "device",
		},
		{
			name: "POST /delete_devices",
			call: func(h *harness, tok tokens) {
				h.call(401, "POST", "/_matrix/client/v3/delete_devices", bearer(tok["laptop"]), `{"devices":["PHONE","TABLET"]}`)
				h.call(200, "POST", "/_matrix/client/v3/delete_devices", bearer(tok["laptop"]), `{"devices":["PHONE","TABLET"],`+uiaAuth+`}`)
			},
			revoked: []string{"phone", "tablet"}, reason: "device",
		},
		{
			name: "password, devices logged out",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/account/password", bearer(tok["laptop"]), `{"new_password":"x",`+uiaAuth+`}`)
			},
			// The requesting token stays valid, as the spec says.
			revoked: []string{"phone", "tablet"}, reason: "password",
		},
		{
			name: "password with logout_devices false",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/account/password", bearer(tok["laptop"]), `{"new_password":"x","logout_devices":false,`+uiaAuth+`}`)
			},
			revoked: nil,
		},
		{
			name: "deactivate",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/account/deactivate", bearer(tok["phone"]), `{`+uiaAuth+`}`)
			},
			revoked: []string{"phone", "laptop", "tablet"}, reason: "deactivate",
		},
		{
			name: "login reusing a device ID",
			call: func(h *harness, tok tokens) {
				h.call(200, "POST", "/_matrix/client/v3/login", nil, `{"user":"@alice:hs","device_id":"PHONE"}`)
			},
			revoked: []string{"phone"}, reason: "login",
		},
		{
			name: "revoked behind the proxy's back, seen at next use",
			call: func(h *harness, tok tokens) {
				h.hs.revoke(func(t string, _ session) bool { return t == tok["phone"] })
				h.call(401, "GET", "/_matrix/client/v3/sync", bearer(tok["phone"]), "")
			},
			revoked: []string{"phone"}, reason: "unknown_token",
		},
		{
			name: "percent-encoded logout path",
			call: func(h *harness, tok tokens) {
				h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
					// A homeserver that decodes paths before routing.
					if r.URL.Path == "/_matrix/client/v3/logout" {
						h.hs.revoke(func(t string, _ session) bool { return t == tok["phone"] })
						writeJSON(w, 200, `{}`)
						return true
					}
					return false
				})
				h.call(200, "POST", "/_matrix/client/v3/%6Cogout", bearer(tok["phone"]), "")
			},
			revoked: []string{"phone"}, reason: "logout",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			tok := tokens{
				"phone":  h.hs.login("@alice:hs", "PHONE"),
				"laptop": h.hs.login("@alice:hs", "LAPTOP"),
				"tablet": h.hs.login("@alice:hs", "TABLET"),
				"bob":    h.hs.login("@bob:hs", "PHONE"),
			}
			lookedUp := tt.lookedUp
			if lookedUp == nil {
				lookedUp = []string{"phone", "laptop", "tablet", "bob"}
			}
			for _, name := range lookedUp {
				if code, _ := h.whoami(tok[name]); code != 200 {
					t.Fatalf("%s: whoami %d before the call", name, code)
				}
			}
			tt.call(h, tok)
			revoked := map[string]bool{}
			for _, name := range tt.revoked {
				revoked[name] = true
			}
			before := h.hs.whoamiCalls.Load()
			for name, tk := range tok {
				code, _ := h.whoami(tk)
				switch {
				case revoked[name] && code != 401:
					t.Errorf("%s: whoami %d after the call, want 401", name, code)
				case !revoked[name] && code != 200:
					t.Errorf("%s: whoami %d after the call, want 200", name, code)
				}
			}
			// The tokens not revoked are still answered from memory,
			// unless they were never looked up.
			wantCalls := int64(len(tt.revoked))
			for name := range tok {
				if !revoked[name] && !contains(lookedUp, name) {
					wantCalls++
				}
			}
			if got := h.hs.whoamiCalls.Load() - before; got > wantCalls {
				t.Errorf("whoami reached the homeserver %d times after the call, want at most %d (unrevoked tokens were dropped)", got, wantCalls)
			}
			if tt.reason != "" {
				if n := h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", tt.reason); n < 1 {
					t.Errorf("invalidations_total{reason=%q}: %v", tt.reason, n)
				}
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// call sends a request through the proxy, fails the test unless the status
// is as expected, and returns the body.
func (h *harness) call(status int, method, path string, hdr http.Header, body string) string {
	h.t.Helper()
	resp, got := h.do(method, path, hdr, body)
	if resp.StatusCode != status {
		h.t.Fatalf("%s %s: got %d %s, want %d", method, path, resp.StatusCode, got, status)
	}
	return got
}

// The homeserver receives a revoking request's body byte for byte, even one
// that the proxy read to learn what it revokes, and even one over the bound.
func TestRevokingBodiesForwardedByteForByte(t *testing.T) {
	bodies := map[string]string{
		"small":          `{"devices": ["A", "B"], "auth": {"type": "m.login.dummy"}}  `,
		"not JSON":       "\x00\xffnot json",
		"over the bound": `{"devices":["` + strings.Repeat("X", maxBody+100) + `"]}`,
	}
	for name, body := range bodies {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			tok := h.hs.login("@alice:hs", "PHONE")
			for _, path := range []string{"/_matrix/client/v3/delete_devices", "/_matrix/client/v3/account/password"} {
				h.do("POST", path, bearer(tok), body)
				r, ok := h.hs.lastRequest(path)
				if !ok || !bytes.Equal(r.Body, []byte(body)) {
					t.Errorf("%s: homeserver got %d bytes, want %d", path, len(r.Body), len(body))
				}
			}
		})
	}
}

// When the proxy cannot read what a call revoked, it drops more, never less.
func TestUnreadableBodiesInvalidateTheWholeUser(t *testing.T) {
	for name, body := range map[string]string{
		"delete_devices not JSON":        `{"devices":`,
		"delete_devices over the bound":  `{"devices":["PHONE"],"pad":"` + strings.Repeat("x", maxBody) + `"}`,
		"password logout_devices string": `{"logout_devices":"false"}`,
		// Synapse reads keys exactly; encoding/json alone would not.
		"password Logout_Devices": `{"Logout_Devices":false}`,
	} {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method == "POST" && !strings.Contains(r.URL.Path, "whoami") {
					writeJSON(w, 200, `{}`) // pretend it worked
					return true
				}
				return false
			})
			phone := h.hs.login("@alice:hs", "PHONE")
			laptop := h.hs.login("@alice:hs", "LAPTOP")
			h.whoami(phone)
			h.whoami(laptop)
			path := "/_matrix/client/v3/delete_devices"
			if strings.HasPrefix(name, "password") {
				path = "/_matrix/client/v3/account/password"
			}
			h.call(200, "POST", path, bearer(laptop), body)
			before := h.hs.whoamiCalls.Load()
			h.whoami(phone)
			if h.hs.whoamiCalls.Load() == before {
				t.Error("the user's other token is still cached")
			}
		})
	}
}

func TestUnidentifiedCallerFlushesOnSuccess(t *testing.T) {
	h := newHarness(t)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/account/password") {
			writeJSON(w, 200, `{}`) // a password reset by email: no token
			return true
		}
		return false
	})
	tok := h.hs.login("@alice:hs", "PHONE")
	h.whoami(tok)
	h.call(200, "POST", "/_matrix/client/v3/account/password", nil, `{"new_password":"x"}`)
	if n := h.counter("matrix_auth_proxy_token_cache_entries"); n != 0 {
		t.Errorf("entries after an unattributable password change: %v", n)
	}
}

func TestTokenLifetimeFromLogin(t *testing.T) {
	h := newHarness(t)
	h.hs.expiresInMS = 30_000
	body := h.call(200, "POST", "/_matrix/client/v3/login", nil, `{"user":"@alice:hs"}`)
	tok := body[strings.Index(body, `"access_token":"`)+len(`"access_token":"`):]
	tok = tok[:strings.Index(tok, `"`)]
	h.whoami(tok)
	h.now.Advance(30*time.Second - time.Millisecond)
	h.whoami(tok)
	if n := h.hs.whoamiCalls.Load(); n != 1 {
		t.Fatalf("before expiry: %d homeserver calls", n)
	}
	h.now.Advance(time.Millisecond)
	h.whoami(tok)
	if n := h.hs.whoamiCalls.Load(); n != 2 {
		t.Errorf("the entry outlived expires_in_ms: %d homeserver calls", n)
	}
}

// TestRevocationDuringLookup is the stale-fill race end to end: a whoami
// lookup for the phone's token is in flight when another device of the same
// user logs everything out. The lookup's answer (200, from before the
// logout) reaches its own client but must not be cached, or the dead token
// would be served until CACHE_TTL.
func TestRevocationDuringLookup(t *testing.T) {
	h := newHarness(t)
	phone := h.hs.login("@alice:hs", "PHONE")
	laptop := h.hs.login("@alice:hs", "LAPTOP")
	h.whoami(laptop)
	arrived, release := make(chan struct{}), make(chan struct{})
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/whoami") {
			// Answer as the homeserver did before the logout, late.
			close(arrived)
			<-release
			writeJSON(w, 200, `{"user_id":"@alice:hs","device_id":"PHONE"}`)
			return true
		}
		return false
	})
	done := make(chan int)
	go func() {
		code, _ := h.whoami(phone)
		done <- code
	}()
	<-arrived
	h.call(200, "POST", "/_matrix/client/v3/logout/all", bearer(laptop), "")
	h.hs.setOverride(nil)
	close(release)
	if code := <-done; code != 200 {
		t.Errorf("the in-flight lookup's own client got %d", code)
	}
	if code, _ := h.whoami(phone); code != 401 {
		t.Errorf("after logout/all: whoami %d, want 401 (a stale answer was cached)", code)
	}
}

// Revocations made with the Synapse admin API through the proxy invalidate
// like their client-API twins.
func TestAdminAPIRevocations(t *testing.T) {
	tests := []struct {
		method, path, body string
		revoked            []string
	}{
		{"DELETE", "/_synapse/admin/v2/users/%40alice%3Ahs/devices/PHONE", "", []string{"phone"}},
		{"POST", "/_synapse/admin/v2/users/@alice:hs/delete_devices", `{"devices":["PHONE","LAPTOP"]}`, []string{"phone", "laptop"}},
		{"POST", "/_synapse/admin/v1/deactivate/@alice:hs", `{"erase":false}`, []string{"phone", "laptop"}},
		{"POST", "/_synapse/admin/v1/reset_password/@alice:hs", `{"new_password":"x"}`, []string{"phone", "laptop"}},
		{"POST", "/_synapse/admin/v1/reset_password/@alice:hs", `{"new_password":"x","logout_devices":false}`, nil},
		{"PUT", "/_synapse/admin/v2/users/@alice:hs", `{"deactivated":true}`, []string{"phone", "laptop"}},
		{"PUT", "/_synapse/admin/v2/users/@alice:hs", `{"displayname":"Alice"}`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path+" "+tt.body, func(t *testing.T) {
			h := newHarness(t)
			tok := map[string]string{
				"phone":  h.hs.login("@alice:hs", "PHONE"),
				"laptop": h.hs.login("@alice:hs", "LAPTOP"),
				"bob":    h.hs.login("@bob:hs", "PHONE"),
			}
			admin := h.hs.login("@admin:hs", "ADMIN")
			for _, tk := range tok {
				h.whoami(tk)
			}
			revoked := map[string]bool{}
			for _, name := range tt.revoked {
				revoked[name] = true
			}
			h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
				if !strings.HasPrefix(r.URL.Path, "/_synapse/admin/") {
					return false
				}
				h.hs.revoke(func(t string, _ session) bool {
					for name := range revoked {
						if tok[name] == t {
							return true
						}
					}
					return false
				})
				writeJSON(w, 200, `{}`)
				return true
			})
			h.call(200, tt.method, tt.path, bearer(admin), tt.body)
			for name, tk := range tok {
				code, _ := h.whoami(tk)
				if want := map[bool]int{true: 401, false: 200}[revoked[name]]; code != want {
					t.Errorf("%s: whoami %d, want %d", name, code, want)
				}
			}
		})
	}
}
