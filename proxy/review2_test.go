package proxy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache/bus"
)

// masBehindFlakyGateway makes the fake homeserver answer MAS's calls from
// anyone but MAS with a 502, as an ingress or load balancer in front of
// Synapse does while Synapse restarts or is overloaded (or as the proxy
// itself settles a call that timed out). Synapse itself only ever answers
// such a caller 403 ("This endpoint must only be called by MAS"): the call
// cannot have been performed.
func (hs *fakeHS) masBehindFlakyGateway() {
	hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/_synapse/mas/") {
			return false
		}
		if r.Header.Get("Authorization") != "Bearer "+testMASSecret {
			writeJSON(w, 502, `{"errcode":"M_UNKNOWN","error":"bad gateway"}`)
			return true
		}
		writeJSON(w, 200, `{}`)
		return true
	})
}

// Review 2, finding 1: an ordinary client's MAS call with an unknown outcome
// acts as if MAS had made it. MAS rows are settled like the others: a 5xx
// or a timeout with a well-formed token counts as performed. But only MAS's
// secret can make Synapse perform them, and the proxy knows that secret
// (MAS_SECRET, needed for MAS_INTROSPECTION_URL and the rate-limit
// exemption): a call carrying any other token cannot have been performed.
// While the homeserver is in trouble any user can drop any other user's
// entries (delete_user, sync_devices with an empty list) and lock them out
// of the cache for good (provision_user locked), which during the outage
// turns their cached whoami into a 502.
func TestReview2MASCallWithOrdinaryTokenDropsOtherUsers(t *testing.T) {
	for _, c := range []struct{ path, body string }{
		{"delete_user", `{"localpart":"bob","erase":false}`},
		{"sync_devices", `{"localpart":"bob","devices":[]}`},
		{"delete_device", `{"localpart":"bob","device_id":"BOB"}`},
		{"provision_user", `{"localpart":"bob","locked":true}`},
	} {
		t.Run(c.path, func(t *testing.T) {
			h := newHarness(t, func(cfg *Config) { cfg.MASSecret = testMASSecret })
			h.hs.masBehindFlakyGateway()
			bob := h.hs.login("@bob:hs", "BOB")
			mallory := h.hs.login("@mallory:hs", "M")
			h.whoami(bob) // cached; the server name "hs" is learned
			h.call(502, "POST", "/_synapse/mas/"+c.path, bearer(mallory), c.body)
			h.cachedWithoutLookup(bob)
			if h.p.mas.locked.has("@bob:hs") {
				t.Error("an ordinary client's call locked bob out of the cache")
			}
		})
	}
}

// Review 2, finding 1b: the same unknown outcomes let a client push MAS's
// real locks out of the bounded set (oldest forgotten first), after which
// Synapse's warm introspection cache refills the cache for the locked user
// for CACHE_TTL. Shown with a bound of 3; the default 10,000 takes 10,000
// calls.
func TestReview2ClientCallsEvictMASLocks(t *testing.T) {
	h := newHarness(t, func(cfg *Config) { cfg.MASSecret = testMASSecret; cfg.MaxLockedUsers = 3 })
	h.hs.masBehindFlakyGateway()
	alice := h.hs.login("@alice:hs", "A")
	mallory := h.hs.login("@mallory:hs", "M")
	h.whoami(mallory) // learns the server name
	h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"alice","locked":true}`)
	for _, u := range []string{"x1", "x2", "x3"} {
		h.call(502, "POST", "/_synapse/mas/provision_user", bearer(mallory), `{"localpart":"`+u+`","locked":true}`)
	}
	if !h.p.mas.locked.has("@alice:hs") {
		t.Error("MAS's lock of alice was pushed out by an ordinary client's calls")
	}
	// Synapse's introspection cache still answers 200 for alice: that
	// answer must not be stored.
	h.whoami(alice)
	before := h.hs.whoamiCalls.Load()
	h.whoami(alice)
	if h.hs.whoamiCalls.Load() == before {
		t.Error("locked alice's whoami was served from the cache")
	}
}

// Review 2, finding 2: one ordinary request makes every other replica
// flush its whole cache. POST /delete_devices names its devices in the
// body; the proxy drops each (one explicit invalidation per ID, each
// published on the bus as its own message) even for IDs the user never
// had, and Synapse answers 200 for those (it deletes what exists). A 64 KiB
// body names ~10,000 devices; the bus's explicit lane holds 1,024, and one
// that does not fit is owed to the peers as a flush. The same holds for the
// admin API's delete_devices (an admin), and for any sequence of own
// revocations faster than Redis takes them, but this one needs a single
// request and a password.
//
// The bus here is not running (Redis slower than the request): the test
// shows what one request queues, which with a running bus is drained at
// Redis's pace while the request's apply loop adds thousands in a few
// milliseconds.
func TestReview2OneDeleteDevicesRequestMakesPeersFlush(t *testing.T) {
	var b *bus.Bus
	var explicit atomic.Int64
	h := newHarness(t, func(c *Config) {
		c.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
			if inv.Reason != tokencache.ReasonUnknownToken {
				explicit.Add(1)
			}
			b.Publish(inv)
		}
	})
	reg := prometheus.NewRegistry()
	var err error
	if b, err = bus.New(bus.Config{URL: "redis://127.0.0.1:1", Registerer: reg}, h.p.cache); err != nil {
		t.Fatal(err)
	}
	tok := h.hs.login("@mallory:hs", "M")
	ids := make([]string, 2000)
	for i := range ids {
		ids[i] = fmt.Sprintf("x%d", i)
	}
	list, _ := json.Marshal(ids)
	h.call(200, "POST", "/_matrix/client/v3/delete_devices", bearer(tok), `{"devices":`+string(list)+`,`+uiaAuth+`}`)
	t.Logf("one request published %d explicit invalidations", explicit.Load())
	if n := gathered(t, reg, "matrix_auth_proxy_bus_messages_dropped_total", "queue_full"); n != 0 {
		t.Errorf("one ordinary delete_devices overflowed the bus's explicit lane %v times: every peer is told to flush", n)
	}
}

// gathered is the value of the counter name{reason=reason} in reg.
func gathered(t *testing.T, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{reason=%q}", name, reason)
	return 0
}

// Review 2, finding 4: a SERVER_NAME that is not the homeserver's name
// (a typo, "matrix.example.org" for "example.org", the delegated host)
// makes every MAS revocation through the proxy name users that have no
// entries: nothing is dropped, nothing is logged, and the revoked tokens
// live CACHE_TTL. The proxy sees the real name in every positive whoami
// answer, yet never compares it with the configured one.
func TestReview2WrongServerNameSilentlyDisablesMASRevocations(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ServerName = "matrix.hs" }) // the homeserver is "hs"
	h.hs.serveMAS()
	tok := h.hs.login("@alice:hs", "PHONE")
	h.whoami(tok)
	h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
	if code, _ := h.whoami(tok); code != 401 {
		t.Errorf("MAS deleted the device, whoami through the proxy still answers %d", code)
	}
}

// holdBodyBudget makes an ordinary client hold the whole body budget with a
// body it never finishes (each such request is let go after
// BodyReadTimeout; a client repeats it).
func (h *harness) holdBodyBudget(t *testing.T) {
	t.Helper()
	staller := h.hs.login("@mallory:hs", "M")
	h.rawRequest("POST /_matrix/client/v3/delete_devices HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer "+staller+
		"\r\nContent-Length: 100\r\n", `{`)
	eventually(t, "the stalled body holds the budget", func() bool {
		return !h.p.bodyBudget.TryAcquire(1) || func() bool {
			h.p.bodyBudget.Release(1)
			return false
		}()
	})
}

// Review 2, finding 6: an ordinary client that holds the shared body budget
// (BODY_MEMORY, 16 MiB: 256 bodies of 64 KiB trickled in, each held up to
// BODY_READ_TIMEOUT and then sent again) turns MAS's routine calls into
// flushes of every replica's cache, and makes MAS's locks forgotten. A MAS
// call whose body is forwarded unread names no user, so a success flushes:
// provision_user, which MAS sends for profile syncs that revoke nothing,
// empties the cache; with "locked": true the lock is not remembered, and
// Synapse's warm introspection cache refills the locked user's entry for
// CACHE_TTL. MAS's calls carry its secret: they could be read whatever the
// budget (their bodies are small), or have budget of their own.
// Shown with a budget of 100 bytes.
func TestReview2HeldBodyBudgetTurnsMASCallsIntoFlushes(t *testing.T) {
	t.Run("profile sync flushes", func(t *testing.T) {
		h := newHarness(t, func(c *Config) {
			c.MASSecret = testMASSecret
			c.BodyMemory = 100
			c.BodyReadTimeout = 5 * time.Second
		})
		h.hs.serveMAS()
		bob := h.hs.login("@bob:hs", "BOB")
		h.whoami(bob)
		h.holdBodyBudget(t)
		h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"carol","set_displayname":"Carol"}`)
		if n := h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "mas"); n != 0 {
			t.Errorf("MAS's profile sync flushed the cache %v times while a client held the body budget", n)
		}
		h.cachedWithoutLookup(bob)
	})
	t.Run("lock forgotten", func(t *testing.T) {
		h := newHarness(t, func(c *Config) {
			c.MASSecret = testMASSecret
			c.BodyMemory = 100
			c.BodyReadTimeout = 5 * time.Second
		})
		h.hs.serveMAS()
		alice := h.hs.login("@alice:hs", "A")
		h.whoami(alice)
		h.holdBodyBudget(t)
		h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"alice","locked":true}`)
		if !h.p.mas.locked.has("@alice:hs") {
			t.Error("MAS locked alice while a client held the body budget: the lock was not remembered")
		}
		h.whoami(alice) // Synapse's warm introspection cache: 200
		before := h.hs.whoamiCalls.Load()
		h.whoami(alice)
		if h.hs.whoamiCalls.Load() == before {
			t.Error("locked alice's whoami was served from the cache")
		}
	})
}

// Review 2, finding 8 (low): a revoking call whose caller's whoami answer
// is handed on but not stored (Uncacheable) names nobody. With MAS,
// masReview makes every answer for a user MAS locked such an answer; in
// MAS mode Synapse ignores its locked flag, so an appservice managing that
// user's devices (MSC4190: DELETE /devices/{id}?user_id=…) really deletes
// the device, yet the proxy drops (and tells its peers) only the
// appservice token's own answers. This replica holds nothing for the
// locked user, but a peer that has not seen the lock (locks are per
// replica; without MAS_INTROSPECTION_URL it refills from Synapse's warm
// cache) keeps the deleted device's answers for CACHE_TTL, although the
// README lists device deletion as coherent at once on every replica.
func TestReview2DeviceDeletionForLockedUserNamesNobody(t *testing.T) {
	var mu sync.Mutex
	var published []tokencache.Invalidation
	h := newHarness(t, func(c *Config) {
		c.ServerName = "hs"
		c.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
			mu.Lock()
			published = append(published, inv)
			mu.Unlock()
		}
	})
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		switch {
		case strings.HasPrefix(r.URL.Path, "/_synapse/mas/"):
			writeJSON(w, 200, `{}`)
		case r.Header.Get("Authorization") != "Bearer as_bridge":
			return false
		case strings.HasSuffix(r.URL.Path, "/whoami"):
			h.hs.whoamiCalls.Add(1)
			writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":false}`, r.URL.Query().Get("user_id")))
		case r.Method == http.MethodDelete && strings.Contains(r.URL.Path, "/devices/"):
			writeJSON(w, 200, `{}`) // MSC4190: no UIA for appservices; Synapse ignores the lock
		default:
			return false
		}
		return true
	})
	h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"bridge_alice","locked":true}`)
	mu.Lock()
	published = nil
	mu.Unlock()
	h.call(200, "DELETE", "/_matrix/client/v3/devices/PHONE?user_id=@bridge_alice:hs", bearer("as_bridge"), "")
	mu.Lock()
	defer mu.Unlock()
	for _, inv := range published {
		if (inv.Scope == tokencache.ScopeDevice && inv.UserID == "@bridge_alice:hs" && inv.DeviceID == "PHONE") ||
			(inv.Scope == tokencache.ScopeUser && inv.UserID == "@bridge_alice:hs") || inv.Scope == tokencache.ScopeAll {
			return
		}
	}
	t.Errorf("an appservice deleted @bridge_alice:hs's device PHONE; the proxy published only %+v", published)
}

// Review 2, finding 9: an ordinary user's revoking call with a masquerade
// parameter names only its token. Synapse ignores ?user_id= (and
// ?device_id=) for a token that is not an appservice's, so
// POST /logout/all?user_id=@bob:hs ends every session of the caller; the
// proxy resolves the caller with the same masquerade, gets a 200 for the
// caller rather than for @bob:hs, which answerFor hands on unstored
// (Uncacheable), and resolveCaller then treats the caller as unknown: only
// the calling token's answers go. The user's other sessions, revoked at
// Synapse, stay cached for CACHE_TTL. The same for /account/deactivate and
// /account/password.
func TestReview2IgnoredMasqueradeHidesTheCaller(t *testing.T) {
	for _, c := range []struct{ name, method, path, body string }{
		{"logout/all", "POST", "/_matrix/client/v3/logout/all?user_id=@bob:hs", `{}`},
		{"deactivate", "POST", "/_matrix/client/v3/account/deactivate?user_id=@bob:hs", `{}`},
		{"delete the other device", "DELETE", "/_matrix/client/v3/devices/LAPTOP?user_id=@bob:hs", `{` + uiaAuth + `}`},
		{"device_id not the caller's", "POST", "/_matrix/client/v3/logout/all?device_id=NOTMINE", `{}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			// Like Synapse (api/auth/internal.py): only an appservice's
			// token reads user_id; an ordinary token's call is its own.
			h.hs.setOverride(func(_ http.ResponseWriter, r *http.Request) bool {
				q := r.URL.Query()
				q.Del("user_id")
				q.Del("device_id")
				r.URL.RawQuery = q.Encode()
				return false
			})
			phone := h.hs.login("@alice:hs", "PHONE")
			laptop := h.hs.login("@alice:hs", "LAPTOP")
			h.whoami(phone)
			h.whoami(laptop)
			h.call(200, c.method, c.path, bearer(phone), c.body)
			if code, _ := h.whoami(laptop); code != 401 {
				t.Errorf("alice's other session after %s: whoami %d from the cache, want 401", c.path, code)
			}
		})
	}
}
