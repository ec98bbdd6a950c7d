package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

const testMASSecret = "mas-shared-secret-0123456789"

// serveMAS makes the fake homeserver answer MAS's calls as Synapse 1.163
// does (synapse/rest/synapse/mas/): only with the shared secret, users named
// by localpart on server "hs". A lock changes nothing the fake answers:
// Synapse ignores its locked flag in MAS mode, and its introspection cache
// keeps answering 200 for a while.
func (hs *fakeHS) serveMAS() {
	hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		call, ok := strings.CutPrefix(r.URL.Path, "/_synapse/mas/")
		if !ok {
			return false
		}
		if r.Header.Get("Authorization") != "Bearer "+testMASSecret {
			writeJSON(w, 403, `{"errcode":"M_FORBIDDEN","error":"This endpoint must only be called by MAS"}`)
			return true
		}
		var b struct {
			Localpart *string  `json:"localpart"`
			DeviceID  *string  `json:"device_id"`
			Devices   []string `json:"devices"`
		}
		body, _ := io.ReadAll(r.Body)
		if json.Unmarshal(body, &b) != nil || b.Localpart == nil {
			writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"bad body"}`)
			return true
		}
		user := "@" + *b.Localpart + ":hs"
		switch call {
		case "delete_device":
			if b.DeviceID == nil {
				writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"device_id"}`)
				return true
			}
			hs.revoke(func(_ string, s session) bool { return s.user == user && s.device == *b.DeviceID })
			w.WriteHeader(http.StatusNoContent)
			return true
		case "sync_devices":
			hs.revoke(func(_ string, s session) bool { return s.user == user && !slices.Contains(b.Devices, s.device) })
		case "delete_user":
			hs.revoke(func(_ string, s session) bool { return s.user == user })
		}
		writeJSON(w, 200, `{}`)
		return true
	})
}

func masHeader() http.Header { return bearer(testMASSecret) }

// TestMASCalls checks each MAS → Synapse call through the proxy: the tokens
// it ends get 401 from the cached whoami at once, the others are still
// answered from the cache.
func TestMASCalls(t *testing.T) {
	tests := []struct {
		name, path, body string
		status           int
		revoked          []string // 401 at once
		uncached         []string // still valid, but looked up again (the whole user dropped)
		reason           string
	}{
		{name: "delete_device", path: "delete_device", body: `{"localpart":"alice","device_id":"PHONE"}`, status: 204,
			revoked: []string{"phone"}, reason: "device"},
		{name: "sync_devices", path: "sync_devices", body: `{"localpart":"alice","devices":["LAPTOP"]}`, status: 200,
			revoked: []string{"phone", "tablet"}, reason: "device"},
		{name: "delete_user", path: "delete_user", body: `{"localpart":"alice","erase":true}`, status: 200,
			revoked: []string{"phone", "laptop", "tablet"}, reason: "deactivate"},
		{name: "upsert_device", path: "upsert_device", body: `{"localpart":"alice","device_id":"NEW"}`, status: 200},
		{name: "provision_user without lock", path: "provision_user", body: `{"localpart":"alice","set_displayname":"A"}`, status: 200},
		{name: "provision_user unlocked", path: "provision_user", body: `{"localpart":"alice","locked":false}`, status: 200},
		{name: "reactivate_user", path: "reactivate_user", body: `{"localpart":"alice"}`, status: 200},
		{name: "set_displayname", path: "set_displayname", body: `{"localpart":"alice","displayname":"A"}`, status: 200},
		{name: "a refused call", path: "delete_user", body: `{"erase":true}`, status: 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.hs.serveMAS()
			tok := map[string]string{
				"phone":  h.hs.login("@alice:hs", "PHONE"),
				"laptop": h.hs.login("@alice:hs", "LAPTOP"),
				"tablet": h.hs.login("@alice:hs", "TABLET"),
				"bob":    h.hs.login("@bob:hs", "PHONE"),
			}
			for name, tk := range tok {
				if code, _ := h.whoami(tk); code != 200 {
					t.Fatalf("%s: whoami %d before the call", name, code)
				}
			}
			h.call(tt.status, "POST", "/_synapse/mas/"+tt.path, masHeader(), tt.body)
			before := h.hs.whoamiCalls.Load()
			for name, tk := range tok {
				code, _ := h.whoami(tk)
				if want := map[bool]int{true: 401, false: 200}[slices.Contains(tt.revoked, name)]; code != want {
					t.Errorf("%s: whoami %d after the call, want %d", name, code, want)
				}
			}
			if got, want := h.hs.whoamiCalls.Load()-before, int64(len(tt.revoked)+len(tt.uncached)); got != want {
				t.Errorf("whoami reached the homeserver %d times after the call, want %d", got, want)
			}
			if tt.reason != "" && h.counter("matrix_auth_proxy_token_cache_invalidations_total", "reason", tt.reason) < 1 {
				t.Errorf("no invalidation counted under %q", tt.reason)
			}
			if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
				t.Errorf("%v flushes", n)
			}
		})
	}
}

// The effects of MAS's calls, for every body shape: what they drop, lock
// and unlock, depending on the outcome and on whether the server name is
// known.
func TestMASEffects(t *testing.T) {
	dev := func(u, d string) string { return "device " + u + " " + d }
	usr := func(u string) string { return "user " + u }
	const flush = "flush"
	tests := []struct {
		name   string
		effect effect
		body   string
		bodyOK bool // default true, see below
		unread bool
		res    result
		client bool   // the call did not carry MAS's secret
		server string // default "hs"
		noName bool
		want   []string
	}{
		{name: "delete_device", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, want: []string{dev("@alice:hs", "PHONE")}},
		{name: "delete_device, unknown outcome", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, res: unknown, want: []string{dev("@alice:hs", "PHONE")}},
		{name: "delete_device without device", effect: masDeleteDevice, body: `{"localpart":"alice"}`, want: []string{usr("@alice:hs")}},
		{name: "delete_device, device not a string", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":7}`, want: []string{usr("@alice:hs")}},
		{name: "delete_device, Localpart", effect: masDeleteDevice, body: `{"Localpart":"alice","device_id":"PHONE"}`, want: []string{flush}},
		{name: "delete_device, localpart null", effect: masDeleteDevice, body: `{"localpart":null,"device_id":"PHONE"}`, want: []string{flush}},
		{name: "delete_device, not JSON", effect: masDeleteDevice, body: `{"localpart":`, want: []string{flush}},
		{name: "delete_device, not JSON, unknown outcome", effect: masDeleteDevice, body: `{"localpart":`, res: unknown, want: nil},
		{name: "delete_device, body unread", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, unread: true, want: []string{flush}},
		{name: "delete_device, server name unknown", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, noName: true, want: []string{flush}},
		{name: "delete_device, server name unknown, unknown outcome", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, noName: true, res: unknown, want: nil},
		{name: "delete_device, server with port", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, server: "hs:8448", want: []string{dev("@alice:hs:8448", "PHONE")}},
		{name: "sync_devices", effect: masSyncDevices, body: `{"localpart":"alice","devices":["A","B"]}`, want: []string{"all devices of @alice:hs but A,B"}},
		{name: "sync_devices, empty list", effect: masSyncDevices, body: `{"localpart":"alice","devices":[]}`, want: []string{"all devices of @alice:hs but "}},
		{name: "sync_devices, no list", effect: masSyncDevices, body: `{"localpart":"alice"}`, want: []string{usr("@alice:hs")}},
		{name: "sync_devices, list unreadable", effect: masSyncDevices, body: `{"localpart":"alice","devices":"A"}`, want: []string{usr("@alice:hs")}},
		{name: "delete_user", effect: masDeleteUser, body: `{"localpart":"alice","erase":false}`, want: []string{usr("@alice:hs")}},
		{name: "delete_user, body unread", effect: masDeleteUser, unread: true, want: []string{flush}},
		{name: "provision_user locked", effect: masProvisionUser, body: `{"localpart":"alice","locked":true}`, want: []string{"lock alice", usr("@alice:hs")}},
		{name: "provision_user locked, unknown outcome", effect: masProvisionUser, body: `{"localpart":"alice","locked":true}`, res: unknown, want: []string{"lock alice", usr("@alice:hs")}},
		{name: "provision_user locked, server name unknown", effect: masProvisionUser, body: `{"localpart":"alice","locked":true}`, noName: true, want: []string{"lock alice", flush}},
		{name: "provision_user unlocked", effect: masProvisionUser, body: `{"localpart":"alice","locked":false}`, want: []string{"unlock alice"}},
		{name: "provision_user unlocked, unknown outcome", effect: masProvisionUser, body: `{"localpart":"alice","locked":false}`, res: unknown, want: nil},
		{name: "provision_user, lock unchanged", effect: masProvisionUser, body: `{"localpart":"alice","locked":null,"set_displayname":"A"}`, want: nil},
		{name: "provision_user, lock not a boolean", effect: masProvisionUser, body: `{"localpart":"alice","locked":"yes"}`, want: []string{usr("@alice:hs")}},
		{name: "provision_user, not JSON", effect: masProvisionUser, body: `[`, want: []string{flush}},
		// Synapse's reactivation leaves a lock in place: so does the proxy.
		{name: "reactivate_user", effect: masReactivateUser, body: `{"localpart":"alice"}`, want: nil},
		{name: "reactivate_user, unknown outcome", effect: masReactivateUser, body: `{"localpart":"alice"}`, res: unknown, want: nil},
		{name: "reactivate_user, not JSON", effect: masReactivateUser, body: `x`, want: nil},
		// Without MAS's secret only a confirmed success counts: any client
		// can send these paths and have them fail.
		{name: "delete_device by a client, unknown outcome", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, res: unknown, client: true, want: nil},
		{name: "delete_device by a client, success", effect: masDeleteDevice, body: `{"localpart":"alice","device_id":"PHONE"}`, client: true, want: []string{dev("@alice:hs", "PHONE")}},
		{name: "provision_user locked by a client, unknown outcome", effect: masProvisionUser, body: `{"localpart":"alice","locked":true}`, res: unknown, client: true, want: nil},
		{name: "sync_devices, a long list", effect: masSyncDevices, body: `{"localpart":"alice","devices":["1","2","3","4","5","6","7","8","9","10","11","12","13","14","15","16","17","18","19","20","21","22","23","24","25","26","27","28","29","30","31","32","33"]}`, want: []string{usr("@alice:hs")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := outcome{result: tt.res, body: []byte(tt.body), bodyOK: !tt.unread, serverName: tt.server, fromMAS: !tt.client}
			if o.result == refused {
				o.result = performed
			}
			if o.serverName == "" && !tt.noName {
				o.serverName = "hs"
			}
			var d decision
			tt.effect(&o, &d)
			var got []string
			for _, l := range d.locks {
				got = append(got, "lock "+l)
			}
			for _, l := range d.unlocks {
				got = append(got, "unlock "+l)
			}
			for _, inv := range d.drops {
				switch inv.Scope {
				case tokencache.ScopeDevice:
					got = append(got, dev(inv.UserID, inv.DeviceID))
				case tokencache.ScopeUser:
					got = append(got, usr(inv.UserID))
				case tokencache.ScopeAll:
					got = append(got, flush)
				case tokencache.ScopeDevicesExcept:
					got = append(got, "all devices of "+inv.UserID+" but "+strings.Join(inv.Keep, ","))
				default:
					got = append(got, fmt.Sprint(inv))
				}
				if inv.Reason == "" {
					t.Errorf("%v without a reason", inv)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseMASCall(t *testing.T) {
	tests := []struct {
		body string
		ok   bool
		want masCall
	}{
		{`{"localpart":"alice","device_id":"D"}`, true, masCall{localpart: "alice", deviceID: "D", hasDevice: true}},
		{`{"localpart":"alice","devices":["A","B"]}`, true, masCall{localpart: "alice", devices: []string{"A", "B"}, hasList: true}},
		{`{"localpart":"alice","locked":true}`, true, masCall{localpart: "alice", locked: lockSet}},
		{`{"localpart":"alice","locked":false}`, true, masCall{localpart: "alice", locked: lockCleared}},
		{`{"localpart":"alice","locked":1}`, true, masCall{localpart: "alice", locked: lockUnreadable}},
		{`{"localpart":"alice","Locked":true}`, true, masCall{localpart: "alice"}},
		{`{"localpart":""}`, true, masCall{}},
		{`{"localpart":1}`, false, masCall{}},
		{`{"user":"alice"}`, false, masCall{}},
		{`null`, false, masCall{}},
		{``, false, masCall{}},
	}
	for _, tt := range tests {
		got, ok := parseMASCall([]byte(tt.body))
		if ok != tt.ok || (ok && (got.localpart != tt.want.localpart || got.deviceID != tt.want.deviceID ||
			got.hasDevice != tt.want.hasDevice || !slices.Equal(got.devices, tt.want.devices) || got.locked != tt.want.locked)) {
			t.Errorf("%s: got %+v %v, want %+v %v", tt.body, got, ok, tt.want, tt.ok)
		}
	}
}

func FuzzParseMASCall(f *testing.F) {
	for _, s := range []string{`{"localpart":"alice","device_id":"D"}`, `{"localpart":"a","devices":["A"]}`,
		`{"localpart":"a","locked":true}`, `{"localpart":"a","locked":"x"}`, `{"localpart":null}`, `[]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		c, ok := parseMASCall(body)
		if !ok {
			return
		}
		// What Synapse's model would read, where it reads anything.
		var m struct {
			Localpart string `json:"localpart"`
		}
		if json.Unmarshal(body, &m) == nil && m.Localpart != c.localpart && !strings.Contains(strings.ToLower(string(body)), `"localpart"`) {
			t.Fatalf("localpart %q, encoding/json reads %q", c.localpart, m.Localpart)
		}
		if c.locked > lockUnreadable {
			t.Fatalf("lock state %d", c.locked)
		}
		// Every effect decides something or nothing, without panicking.
		for _, e := range []effect{masDeleteDevice, masSyncDevices, masDeleteUser, masProvisionUser, masReactivateUser} {
			var d decision
			e(&outcome{result: performed, body: body, bodyOK: true, serverName: "hs"}, &d)
		}
	})
}

// Before any positive answer the server name is unknown: a MAS call that
// succeeds flushes (this replica then holds no positive answer, and lookups
// in flight are kept from storing theirs). Once learned, or configured, the
// call names the user.
func TestMASServerName(t *testing.T) {
	t.Run("learned", func(t *testing.T) {
		h := newHarness(t)
		h.hs.serveMAS()
		h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
		if n := h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "mas"); n != 1 {
			t.Errorf("flushes %v before the server name is known, want 1", n)
		}
		tok := h.hs.login("@alice:hs", "PHONE")
		other := h.hs.login("@alice:hs", "LAPTOP")
		h.whoami(tok)
		h.whoami(other)
		if got := h.p.mas.serverName(); got != "hs" {
			t.Fatalf("server name %q after a positive answer", got)
		}
		h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
		if code, _ := h.whoami(tok); code != 401 {
			t.Errorf("deleted device: %d", code)
		}
		before := h.hs.whoamiCalls.Load()
		if code, _ := h.whoami(other); code != 200 || h.hs.whoamiCalls.Load() != before {
			t.Errorf("other device: %d, looked up again: %v", code, h.hs.whoamiCalls.Load() != before)
		}
		if n := h.counter("matrix_auth_proxy_token_cache_flushes_total", "route", "mas"); n != 1 {
			t.Errorf("flushes %v once the name is known, want still 1", n)
		}
	})
	t.Run("configured", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.ServerName = "hs" })
		h.hs.serveMAS()
		tok := h.hs.login("@alice:hs", "PHONE")
		h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
		if n := h.counter("matrix_auth_proxy_token_cache_flushes_total"); n != 0 {
			t.Errorf("flushes %v with SERVER_NAME set", n)
		}
		h.whoami(tok)
		// A later answer never changes a configured name.
		if got := h.p.mas.serverName(); got != "hs" {
			t.Errorf("server name %q", got)
		}
	})
}

// A lock keeps the user's answers out of the cache until MAS unlocks them:
// Synapse's warm introspection cache keeps answering 200 for a while, and
// must not refill the cache.
func TestMASLockAndUnlock(t *testing.T) {
	for _, unlock := range []struct {
		path, body string
		unlocks    bool
	}{
		{"provision_user", `{"localpart":"alice","locked":false}`, true},
		// Synapse's activate_account leaves a lock in place: so does the
		// proxy (a reactivated user is still locked until provision_user
		// says otherwise).
		{"reactivate_user", `{"localpart":"alice"}`, false},
	} {
		t.Run(unlock.path, func(t *testing.T) {
			h := newHarness(t)
			h.hs.serveMAS()
			tok := h.hs.login("@alice:hs", "PHONE")
			bob := h.hs.login("@bob:hs", "PHONE")
			h.whoami(tok)
			h.whoami(bob)
			h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"alice","locked":true}`)
			// Each whoami reaches the homeserver: nothing is stored.
			for i := range 3 {
				before := h.hs.whoamiCalls.Load()
				if code, _ := h.whoami(tok); code != 200 || h.hs.whoamiCalls.Load() != before+1 {
					t.Errorf("locked, whoami %d: %d, reached the homeserver: %v", i, code, h.hs.whoamiCalls.Load() != before)
				}
			}
			// Others are untouched.
			before := h.hs.whoamiCalls.Load()
			if code, _ := h.whoami(bob); code != 200 || h.hs.whoamiCalls.Load() != before {
				t.Errorf("bob: %d, looked up again: %v", code, h.hs.whoamiCalls.Load() != before)
			}
			// Once the homeserver says no, the negative answer is cached
			// as always.
			h.hs.revoke(func(t string, _ session) bool { return t == tok })
			if code, _ := h.whoami(tok); code != 401 {
				t.Errorf("revoked while locked: %d", code)
			}
			tok2 := h.hs.login("@alice:hs", "LAPTOP")
			h.call(200, "POST", "/_synapse/mas/"+unlock.path, masHeader(), unlock.body)
			h.whoami(tok2)
			before = h.hs.whoamiCalls.Load()
			if code, _ := h.whoami(tok2); code != 200 || (h.hs.whoamiCalls.Load() != before) == unlock.unlocks {
				t.Errorf("after %s: %d, looked up again: %v, want %v", unlock.path, code, h.hs.whoamiCalls.Load() != before, !unlock.unlocks)
			}
		})
	}
}

func TestLockedUsersAreBounded(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxLockedUsers = 3 })
	h.hs.serveMAS()
	for _, u := range []string{"a", "b", "c", "d"} {
		h.call(200, "POST", "/_synapse/mas/provision_user", masHeader(), `{"localpart":"`+u+`","locked":true}`)
	}
	if n := h.p.mas.locked.len(); n != 3 {
		t.Errorf("%d locked users held, want the bound 3", n)
	}
	// The oldest lock is the one forgotten.
	if h.p.mas.locked.has("@a:hs") || !h.p.mas.locked.has("@d:hs") {
		t.Errorf("kept a: %v, d: %v", h.p.mas.locked.has("@a:hs"), h.p.mas.locked.has("@d:hs"))
	}
}

// MAS's calls carry its secret; only those are exempt from the rate limit,
// never a path alone.
func TestMASCallsAreNotRateLimited(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}), func(c *Config) { c.MASSecret = testMASSecret })
	h.hs.serveMAS()
	for i := range 5 {
		if rec := h.serveFrom("192.0.2.9:1", "POST", "/_synapse/mas/upsert_device", masHeader()); rec.Code == 429 {
			t.Errorf("MAS call %d: 429", i)
		}
	}
	limitedAt := func(hdr http.Header) bool {
		for range 3 {
			if h.serveFrom("192.0.2.10:1", "POST", "/_synapse/mas/upsert_device", hdr).Code == 429 {
				return true
			}
		}
		return false
	}
	if !limitedAt(bearer("not-the-secret")) {
		t.Error("a wrong secret on MAS's path is not limited")
	}
	if !limitedAt(http.Header{"Authorization": {"Bearer " + testMASSecret, "Bearer x"}}) {
		t.Error("two Authorization headers are not limited")
	}
	// Without a configured secret nothing is exempt.
	h2 := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}))
	got429 := false
	for range 3 {
		got429 = got429 || h2.serveFrom("192.0.2.9:1", "POST", "/_synapse/mas/upsert_device", masHeader()).Code == 429
	}
	if !got429 {
		t.Error("no MASSecret: MAS's calls were exempt by path")
	}
}

// MAS's invalidations go to OnInvalidate (the bus) like any other.
func TestMASInvalidationsArePublished(t *testing.T) {
	var mu sync.Mutex
	var got []tokencache.Invalidation
	h := newHarness(t, func(c *Config) {
		c.ServerName = "hs"
		c.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
			mu.Lock()
			got = append(got, inv)
			mu.Unlock()
		}
	})
	h.hs.serveMAS()
	h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0].Scope != tokencache.ScopeDevice || got[0].UserID != "@alice:hs" || got[0].DeviceID != "PHONE" {
		t.Errorf("published %+v", got)
	}
}

// introspectorFunc adapts a function to Introspector.
type introspectorFunc func(ctx context.Context, token string) (upstream.Introspection, error)

func (f introspectorFunc) Introspect(ctx context.Context, token string) (upstream.Introspection, error) {
	return f(ctx, token)
}

// With an Introspector, a MAS token's answer never outlives its exp; an
// inactive token's is not stored; MAS's trouble leaves the answer as it
// was, for CACHE_TTL, and never fails the whoami.
func TestMASIntrospectionBoundsLifetime(t *testing.T) {
	var calls atomic.Int64
	var mu sync.Mutex
	answers := map[string]func() (upstream.Introspection, error){}
	newH := func(t *testing.T) *harness {
		mu.Lock()
		clear(answers) // the fake's tokens repeat from one harness to the next
		mu.Unlock()
		return newHarness(t, func(c *Config) {
			c.Introspector = introspectorFunc(func(_ context.Context, token string) (upstream.Introspection, error) {
				calls.Add(1)
				mu.Lock()
				f := answers[token]
				mu.Unlock()
				if f == nil {
					return upstream.Introspection{}, errors.New("no answer")
				}
				return f()
			})
		})
	}
	answer := func(tok string, f func() (upstream.Introspection, error)) {
		mu.Lock()
		answers[tok] = f
		mu.Unlock()
	}
	// lookups says how many of n whoamis reached the homeserver.
	lookups := func(h *harness, tok string, n int) int64 {
		before := h.hs.whoamiCalls.Load()
		for range n {
			if code, body := h.whoami(tok); code != 200 {
				t.Fatalf("whoami %d %s", code, body)
			}
		}
		return h.hs.whoamiCalls.Load() - before
	}
	t.Run("exp", func(t *testing.T) {
		h := newH(t)
		tok := h.hs.login("@alice:hs", "PHONE")
		answer(tok, func() (upstream.Introspection, error) {
			return upstream.Introspection{Active: true, Exp: h.now.Now().Add(30 * time.Second)}, nil
		})
		if n := lookups(h, tok, 3); n != 1 {
			t.Errorf("%d lookups before exp, want 1", n)
		}
		h.now.Advance(30 * time.Second)
		if n := lookups(h, tok, 1); n != 1 {
			t.Errorf("served from the cache at exp (TTL is 2m)")
		}
	})
	t.Run("exp already past", func(t *testing.T) {
		h := newH(t)
		tok := h.hs.login("@alice:hs", "PHONE")
		answer(tok, func() (upstream.Introspection, error) {
			return upstream.Introspection{Active: true, Exp: h.now.Now().Add(-time.Second)}, nil
		})
		if n := lookups(h, tok, 2); n != 2 {
			t.Errorf("%d lookups, want 2: an expired token is not stored", n)
		}
	})
	t.Run("inactive", func(t *testing.T) {
		h := newH(t)
		tok := h.hs.login("@alice:hs", "PHONE")
		answer(tok, func() (upstream.Introspection, error) { return upstream.Introspection{Active: false}, nil })
		if n := lookups(h, tok, 2); n != 2 {
			t.Errorf("%d lookups, want 2: not stored", n)
		}
		if h.counter("matrix_auth_proxy_mas_introspections_total", "result", "inactive") != 2 {
			t.Error("inactive not counted")
		}
	})
	t.Run("MAS fails", func(t *testing.T) {
		h := newH(t)
		tok := h.hs.login("@alice:hs", "PHONE")
		if n := lookups(h, tok, 3); n != 1 {
			t.Errorf("%d lookups, want 1: stored for CACHE_TTL", n)
		}
		if h.counter("matrix_auth_proxy_mas_introspections_total", "result", "error") != 1 {
			t.Error("error not counted")
		}
	})
	t.Run("a slow MAS is not waited for past introspectTimeout", func(t *testing.T) {
		var bounded atomic.Bool
		h := newHarness(t, func(c *Config) {
			c.Cache.LookupTimeout = time.Minute
			c.Introspector = introspectorFunc(func(ctx context.Context, _ string) (upstream.Introspection, error) {
				dl, ok := ctx.Deadline()
				bounded.Store(ok && time.Until(dl) <= introspectTimeout)
				return upstream.Introspection{}, context.DeadlineExceeded
			})
		})
		tok := h.hs.login("@alice:hs", "PHONE")
		if n := lookups(h, tok, 2); n != 1 || !bounded.Load() {
			t.Errorf("%d lookups (want 1: stored for CACHE_TTL); introspection bounded by introspectTimeout: %v", n, bounded.Load())
		}
	})
	t.Run("appservice and device-less answers are not introspected", func(t *testing.T) {
		h := newH(t)
		as := h.hs.login("@as_bot:hs", "")
		before := calls.Load()
		lookups(h, as, 2)
		resp, _ := h.do("GET", whoamiV3+"?user_id=%40bridge_x%3Ahs&device_id=D", bearer(as), "")
		if resp.StatusCode != 200 {
			t.Fatalf("masquerade: %d", resp.StatusCode)
		}
		if n := calls.Load() - before; n != 0 {
			t.Errorf("%d introspections", n)
		}
	})
}

// MAS's secret is treated like a token: it never reaches the logs or the
// metrics, whatever MAS's calls do (succeed, flush, fail, time out).
func TestMASSecretNeverReachesLogsOrMetrics(t *testing.T) {
	h := newHarness(t, limited(RateLimitConfig{RPS: 0.001, Burst: 1}), func(c *Config) {
		c.MASSecret = testMASSecret
		c.Introspector = introspectorFunc(func(context.Context, string) (upstream.Introspection, error) {
			return upstream.Introspection{}, errors.New("MAS is down")
		})
	})
	h.hs.serveMAS()
	// Before the server name is known: a flush, logged.
	h.call(204, "POST", "/_synapse/mas/delete_device", masHeader(), `{"localpart":"alice","device_id":"PHONE"}`)
	h.do("POST", "/_synapse/mas/delete_user?access_token="+testMASSecret, nil, `{"localpart":"alice","erase":true}`)
	h.do("GET", "/_synapse/mas/query_user?localpart=alice", masHeader(), "")
	h.do("POST", "/_synapse/mas/provision_user", bearer(testMASSecret+"x"), `{"localpart":"alice","locked":true}`)
	h.whoami(h.hs.login("@alice:hs", "PHONE"))
	h.hs.srv.Close() // errors log too
	h.do("POST", "/_synapse/mas/sync_devices", masHeader(), `{"localpart":"alice","devices":[]}`)
	if h.logs.Len() == 0 {
		t.Fatal("nothing was logged: the test proves nothing")
	}
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{MessageKey: "msg"})
	for _, e := range h.logs.All() {
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(buf.String(), testMASSecret) {
			t.Errorf("MAS's secret reached the logs: %s", buf.String())
		}
	}
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if s := fmt.Sprint(mfs); strings.Contains(s, testMASSecret) {
		t.Errorf("MAS's secret reached the metrics: %s", s)
	}
}
