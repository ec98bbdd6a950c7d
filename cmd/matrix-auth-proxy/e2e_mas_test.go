package main_test

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The Matrix Authentication Service tests run a Synapse in MAS mode
// (matrix_authentication_service: enabled) against e2eMAS, a stand-in for
// MAS served by the test itself on 127.0.0.1: it answers Synapse's token
// introspection for the tokens it mints and plays MAS's part in the calls
// MAS makes to Synapse (POST /_synapse/mas/…). Synapse decides every
// answer.

// e2eMAS is the MAS stand-in.
type e2eMAS struct {
	URL    string
	Secret string // the shared secret (MAS's matrix.secret)

	mu     sync.Mutex
	tokens map[string]e2eMASToken
	locked map[string]bool
	// target is where MAS's calls to Synapse go (MAS's matrix.endpoint):
	// a proxy, or Synapse itself.
	target string
}

type e2eMASToken struct {
	localpart, device string
	exp               time.Time
}

func e2eStartMAS(t *testing.T) *e2eMAS {
	t.Helper()
	m := &e2eMAS{Secret: "mas-secret-" + e2eRandHex(), tokens: map[string]e2eMASToken{}, locked: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(m.serve)) // 127.0.0.1
	t.Cleanup(srv.Close)
	m.URL = srv.URL
	return m
}

func e2eRandHex() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (m *e2eMAS) serve(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/.well-known/openid-configuration":
		_ = json.NewEncoder(w).Encode(map[string]any{
			"issuer": m.URL + "/", "account_management_uri": m.URL + "/account/",
			"authorization_endpoint": m.URL + "/authorize", "token_endpoint": m.URL + "/oauth2/token",
			"introspection_endpoint": m.URL + "/oauth2/introspect", "revocation_endpoint": m.URL + "/oauth2/revoke",
			"jwks_uri": m.URL + "/oauth2/keys.json", "response_types_supported": []string{"code"},
		})
	case r.Method == http.MethodPost && r.URL.Path == "/oauth2/introspect":
		// Synapse (and the proxy) authenticate with the shared secret.
		if r.Header.Get("Authorization") != "Bearer "+m.Secret {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"error":"invalid_client"}`))
			return
		}
		if err := r.ParseForm(); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		m.mu.Lock()
		tok, ok := m.tokens[r.PostForm.Get("token")]
		locked := m.locked[tok.localpart]
		m.mu.Unlock()
		now := time.Now()
		if !ok || locked || !now.Before(tok.exp) {
			_, _ = w.Write([]byte(`{"active":false}`))
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{
			"active":     true,
			"scope":      "urn:matrix:client:api:* urn:matrix:client:device:" + tok.device,
			"username":   tok.localpart,
			"sub":        "01SUB" + strings.ToUpper(tok.localpart),
			"token_type": "access_token",
			"exp":        tok.exp.Unix(),
			// Synapse reads expires_in, RFC 7662 clients exp.
			"expires_in": int64(tok.exp.Sub(now) / time.Second),
		})
	default:
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":"not found"}`))
	}
}

// setTarget sets MAS's matrix.endpoint.
func (m *e2eMAS) setTarget(u string) {
	m.mu.Lock()
	m.target = u
	m.mu.Unlock()
}

// call makes MAS's call to Synapse, at the current target.
func (m *e2eMAS) call(t testing.TB, endpoint string, body map[string]any) e2eResp {
	t.Helper()
	m.mu.Lock()
	target := m.target
	m.mu.Unlock()
	return e2eDo(t, nil, http.MethodPost, target+"/_synapse/mas/"+endpoint, m.Secret, body)
}

// user provisions a fresh user and returns its localpart and user ID.
func (m *e2eMAS) user(t testing.TB, prefix string) (localpart, userID string) {
	t.Helper()
	localpart = e2eUniqueName(t, prefix)
	e2eWant2xx(t, m.call(t, "provision_user", map[string]any{"localpart": localpart}))
	return localpart, "@" + localpart + ":localhost"
}

// session creates a device for the user and mints an access token for it,
// valid for ttl.
func (m *e2eMAS) session(t testing.TB, localpart, device string, ttl time.Duration) string {
	t.Helper()
	e2eWant2xx(t, m.call(t, "upsert_device", map[string]any{"localpart": localpart, "device_id": device}))
	tok := "mat_" + e2eRandHex()
	m.mu.Lock()
	m.tokens[tok] = e2eMASToken{localpart, device, time.Now().Add(ttl)}
	m.mu.Unlock()
	return tok
}

// mint mints a token for an existing device expiring at exp.
func (m *e2eMAS) mint(localpart, device string, exp time.Time) string {
	tok := "mat_" + e2eRandHex()
	m.mu.Lock()
	m.tokens[tok] = e2eMASToken{localpart, device, exp}
	m.mu.Unlock()
	return tok
}

func (m *e2eMAS) setLocked(localpart string, locked bool) {
	m.mu.Lock()
	m.locked[localpart] = locked
	m.mu.Unlock()
}

// e2eMASSynapse starts a Synapse in MAS mode for this test. Password login
// must be off in MAS mode (synapse/config/mas.py); the appservices of every
// test Synapse stay, and get MSC4190 device management forced on.
func e2eMASSynapse(t *testing.T, m *e2eMAS) *e2eSynapse {
	t.Helper()
	extra := "matrix_authentication_service:\n" +
		"  enabled: true\n" +
		"  endpoint: '" + m.URL + "/'\n" +
		"  secret: '" + m.Secret + "'\n" +
		"password_config:\n  enabled: false\n"
	syn := e2eOwnSynapseWith(t, "mas", extra)
	syn.DumpOnFailure(t)
	return syn
}

// TestE2EMAS: behind a Synapse that delegates authentication to MAS, the
// proxy drops what MAS's calls end, keeps users MAS locked out of its cache,
// shares it all over the bus, and with MAS's introspection endpoint never
// serves a token past its expiry.
func TestE2EMAS(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	m := e2eStartMAS(t)
	syn := e2eMASSynapse(t, m)
	secretFile := filepath.Join(t.TempDir(), "mas-secret")
	if err := os.WriteFile(secretFile, []byte(m.Secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const ttl = time.Hour

	t.Run("calls through the proxy", func(t *testing.T) {
		// MAS's calls are exempt from the proxy's rate limit by the
		// secret: a limit the clients' own requests here stay within (about
		// 27 charged to 127.0.0.1) but MAS's 35 calls on top would not.
		px := e2eStartProxy(t, syn.URL, map[string]string{"MAS_SECRET": m.Secret, "RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "40"})
		m.setTarget(px.URL)
		for _, tc := range []struct {
			name     string
			call     string
			body     func(alice string) map[string]any
			revoked  []string // devices of alice: 401 at once
			uncached []string // devices of alice looked up again
		}{
			{"delete_device", "delete_device", func(a string) map[string]any { return map[string]any{"localpart": a, "device_id": "A1"} },
				[]string{"A1"}, nil},
			{"sync_devices", "sync_devices", func(a string) map[string]any { return map[string]any{"localpart": a, "devices": []string{"A2"}} },
				[]string{"A1", "A3"}, nil},
			{"delete_user", "delete_user", func(a string) map[string]any { return map[string]any{"localpart": a, "erase": false} },
				[]string{"A1", "A2", "A3"}, nil},
			{"upsert_device", "upsert_device", func(a string) map[string]any { return map[string]any{"localpart": a, "device_id": "A4"} },
				nil, nil},
			{"set_displayname", "set_displayname", func(a string) map[string]any { return map[string]any{"localpart": a, "displayname": "Alice"} },
				nil, nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				alice, _ := m.user(t, "mas-alice")
				bob, _ := m.user(t, "mas-bob")
				tokens := map[string]string{
					"A1": m.session(t, alice, "A1", ttl), "A2": m.session(t, alice, "A2", ttl), "A3": m.session(t, alice, "A3", ttl),
					"bob": m.session(t, bob, "B1", ttl),
				}
				e2ePrime(t, px, tokens)
				before := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily)
				e2eWant2xx(t, m.call(t, tc.call, tc.body(alice)))
				for _, d := range tc.revoked {
					if r := e2eWhoami(t, px.URL, tokens[d]); r.Status != http.StatusUnauthorized {
						t.Errorf("%s: whoami via the proxy %d %s after %s, want 401", d, r.Status, r.Body, tc.call)
					}
				}
				for _, d := range tc.uncached {
					e2eWantStatus(t, e2eWhoami(t, px.URL, tokens[d]), http.StatusOK)
				}
				if d := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily) - before; d != float64(len(tc.revoked)+len(tc.uncached)) {
					t.Errorf("%v lookups reached Synapse, want %d", d, len(tc.revoked)+len(tc.uncached))
				}
				for name, tok := range tokens {
					if !slices.Contains(tc.revoked, name) && !slices.Contains(tc.uncached, name) {
						e2eWantServedFromCache(t, px, name, tok)
					}
				}
			})
		}
		if n := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_rate_limited_total{key="ip"}`); n != 0 {
			t.Errorf("%v requests rate-limited: MAS's calls are exempt", n)
		}
		// The proxy logs every request at debug level here; MAS's secret
		// is in none of the lines, nor in the metrics.
		logs, err := os.ReadFile(px.LogPath)
		if err != nil || len(logs) == 0 {
			t.Fatalf("proxy log: %v (%d bytes)", err, len(logs))
		}
		if strings.Contains(string(logs), m.Secret) {
			t.Error("MAS's secret reached the proxy's log")
		}
		if r := e2eDo(t, nil, http.MethodGet, px.AdminURL+"/metrics", "", nil); strings.Contains(string(r.Body), m.Secret) {
			t.Error("MAS's secret reached the metrics")
		}
	})

	t.Run("calls made directly to Synapse", func(t *testing.T) {
		const cacheTTL = 3 * time.Second
		px := e2eStartProxy(t, syn.URL, map[string]string{"CACHE_TTL": cacheTTL.String()})
		m.setTarget(syn.URL)
		alice, _ := m.user(t, "mas-direct")
		tokens := map[string]string{"A1": m.session(t, alice, "A1", ttl), "A2": m.session(t, alice, "A2", ttl), "A3": m.session(t, alice, "A3", ttl)}
		e2ePrime(t, px, tokens)
		e2eWant2xx(t, m.call(t, "delete_device", map[string]any{"localpart": alice, "device_id": "A1"}))
		e2eWant2xx(t, m.call(t, "delete_device", map[string]any{"localpart": alice, "device_id": "A3"}))
		// The next request through the proxy meets Synapse's device check
		// and drops the entry.
		e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/devices", tokens["A1"], nil), http.StatusUnauthorized)
		e2eWantProxy401(t, px, syn, "A1", tokens["A1"])
		// whoami alone: bounded by CACHE_TTL.
		e2eEventually(t, cacheTTL+10*time.Second, "A3 refused once CACHE_TTL passed", func() string {
			if r := e2eWhoami(t, px.URL, tokens["A3"]); r.Status != http.StatusUnauthorized {
				return fmt.Sprintf("whoami %d", r.Status)
			}
			return ""
		})
		e2eWantStatus(t, e2eWhoami(t, px.URL, tokens["A2"]), http.StatusOK)
	})

	t.Run("two replicas on the bus", func(t *testing.T) {
		rs := e2eBusStartRedis(t)
		env := map[string]string{"REDIS_URL": "redis://" + rs.addr, "TOKEN_HASH_KEY": e2eRandHex() + e2eRandHex(), "RATE_LIMIT_RPS": "0",
			"MAS_INTROSPECTION_URL": m.URL + "/oauth2/introspect", "MAS_SECRET_FILE": secretFile}
		pa := e2eStartProxy(t, syn.URL, env)
		pb := e2eStartProxy(t, syn.URL, env)
		e2eBusWaitUp(t, 1, pa, pb)
		m.setTarget(pa.URL)
		alice, _ := m.user(t, "mas-bus")
		tokens := map[string]string{"A1": m.session(t, alice, "A1", ttl), "A2": m.session(t, alice, "A2", ttl)}
		e2ePrime(t, pa, tokens)
		e2ePrime(t, pb, tokens)
		e2eWant2xx(t, m.call(t, "delete_device", map[string]any{"localpart": alice, "device_id": "A1"}))
		e2eBusWant401Within(t, pb, tokens["A1"], e2eBusBound)
		e2eWantServedFromCache(t, pb, "A2 at B", tokens["A2"])

		// A lock through A: B drops the user (the bus) and, asking MAS
		// about the token on its next miss, stores nothing while Synapse's
		// introspection cache still answers 200.
		m.setLocked(alice, true)
		e2eWant2xx(t, m.call(t, "provision_user", map[string]any{"localpart": alice, "locked": true}))
		// The bus takes milliseconds (README, "Running several replicas"):
		// wait until B has dropped alice's entries, that is until a whoami
		// of A2 at B reaches Synapse.
		e2eEventually(t, e2eBusBound, "B drops alice's entries (bus)", func() string {
			before := e2eFamilySum(t, pb.AdminURL, e2eUpstreamWhoamiFamily)
			e2eWhoami(t, pb.URL, tokens["A2"])
			if d := e2eFamilySum(t, pb.AdminURL, e2eUpstreamWhoamiFamily) - before; d != 1 {
				return fmt.Sprintf("%v lookups reached Synapse", d)
			}
			return ""
		})
		for i := range 2 {
			before := e2eFamilySum(t, pb.AdminURL, e2eUpstreamWhoamiFamily)
			e2eWhoami(t, pb.URL, tokens["A2"])
			if d := e2eFamilySum(t, pb.AdminURL, e2eUpstreamWhoamiFamily) - before; d != 1 {
				t.Errorf("locked at A, whoami %d at B: %v lookups reached Synapse, want 1 (nothing stored)", i, d)
			}
		}
	})

	t.Run("lock then unlock", func(t *testing.T) {
		px := e2eStartProxy(t, syn.URL, nil)
		m.setTarget(px.URL)
		alice, _ := m.user(t, "mas-lock")
		bob, _ := m.user(t, "mas-nolock")
		tokens := map[string]string{"A1": m.session(t, alice, "A1", ttl), "bob": m.session(t, bob, "B1", ttl)}
		e2ePrime(t, px, tokens)
		// MAS locks: its introspection calls alice's tokens inactive, then
		// it tells Synapse.
		m.setLocked(alice, true)
		e2eWant2xx(t, m.call(t, "provision_user", map[string]any{"localpart": alice, "locked": true}))
		// Synapse's introspection cache still answers 200 for a while; the
		// proxy hands that on but stores none of it.
		if r := e2eWhoami(t, syn.URL, tokens["A1"]); r.Status == http.StatusOK {
			t.Logf("Synapse still answers 200 for a locked user's token (its introspection cache)")
		}
		for i := range 3 {
			before := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily)
			e2eWhoami(t, px.URL, tokens["A1"])
			if d := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily) - before; d != 1 {
				t.Errorf("locked, whoami %d: %v lookups reached Synapse, want 1 (nothing stored)", i, d)
			}
		}
		e2eWantServedFromCache(t, px, "bob", tokens["bob"])
		// A token Synapse has not seen is refused at once.
		fresh := m.session(t, alice, "A2", ttl)
		e2eWantProxy401(t, px, syn, "fresh token of a locked user", fresh)

		// Unlocked: cached again.
		m.setLocked(alice, false)
		e2eWant2xx(t, m.call(t, "provision_user", map[string]any{"localpart": alice, "locked": false}))
		again := m.session(t, alice, "A3", ttl)
		e2eWantStatus(t, e2eWhoami(t, px.URL, again), http.StatusOK)
		e2eWantServedFromCache(t, px, "after unlock", again)
	})

	t.Run("expiry", func(t *testing.T) {
		withMAS := e2eStartProxy(t, syn.URL, map[string]string{
			"MAS_INTROSPECTION_URL": m.URL + "/oauth2/introspect", "MAS_SECRET_FILE": secretFile,
		})
		without := e2eStartProxy(t, syn.URL, nil)
		m.setTarget(syn.URL)
		alice, _ := m.user(t, "mas-exp")
		e2eWant2xx(t, m.call(t, "upsert_device", map[string]any{"localpart": alice, "device_id": "A1"}))
		// exp is a whole second (RFC 7662): the token ends exactly there.
		exp := time.Now().Add(4 * time.Second).Truncate(time.Second)
		tok := m.mint(alice, "A1", exp)
		for _, px := range []*e2eProxy{withMAS, without} {
			e2eWantStatus(t, e2eWhoami(t, px.URL, tok), http.StatusOK)
			e2eWantServedFromCache(t, px, "before exp", tok)
		}
		if n := e2eMetric(t, withMAS.AdminURL, `matrix_auth_proxy_mas_introspections_total{result="active"}`); n != 1 {
			t.Errorf("%v active introspections, want 1", n)
		}
		time.Sleep(time.Until(exp))
		// Every whoami sent from exp on is refused.
		for range 3 {
			if r := e2eWhoami(t, withMAS.URL, tok); r.Status != http.StatusUnauthorized {
				t.Errorf("whoami via the proxy with MAS_INTROSPECTION_URL after exp: %d %s", r.Status, r.Body)
			}
		}
		e2eWantProxy401(t, withMAS, syn, "expired", tok)
		// Without the settings the bound is CACHE_TTL (10m here).
		if r := e2eWhoami(t, without.URL, tok); r.Status != http.StatusOK {
			t.Errorf("without MAS_INTROSPECTION_URL: %d, want the cached 200 (bounded by CACHE_TTL)", r.Status)
		}
	})

	t.Run("MSC4190 device deletion by an appservice", func(t *testing.T) {
		px := e2eStartProxy(t, syn.URL, nil)
		as := syn.Bridge
		name := as.Prefix + e2eRandHex()
		user := "@" + name + ":localhost"
		e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/register", as.Token,
			map[string]any{"type": "m.login.application_service", "username": name, "inhibit_login": true}))
		masq := func(device string) string {
			q := url.Values{"user_id": {user}}
			if device != "" {
				q.Set("device_id", device)
			}
			return q.Encode()
		}
		for _, d := range []string{"D1", "D2", "D3"} {
			e2eWant2xx(t, e2eDo(t, nil, http.MethodPut, px.URL+"/_matrix/client/v3/devices/"+d+"?"+masq(""), as.Token, map[string]any{}))
		}
		whoami := func(device string) e2eResp {
			return e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami?"+masq(device), as.Token, nil)
		}
		cached := func(who, device string) {
			t.Helper()
			before := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily)
			e2eWantStatus(t, whoami(device), http.StatusOK)
			if d := e2eFamilySum(t, px.AdminURL, e2eUpstreamWhoamiFamily) - before; d != 0 {
				t.Errorf("%s: %v lookups reached Synapse, want 0", who, d)
			}
		}
		gone := func(who, device string) {
			t.Helper()
			direct := e2eDo(t, nil, http.MethodGet, syn.URL+"/_matrix/client/v3/account/whoami?"+masq(device), as.Token, nil)
			if direct.Status == http.StatusOK {
				t.Fatalf("%s: Synapse still accepts the deleted device", who)
			}
			if r := whoami(device); r.Status != direct.Status {
				t.Errorf("%s: whoami via the proxy %d %s, Synapse says %d", who, r.Status, r.Body, direct.Status)
			}
		}
		for _, d := range []string{"D1", "D2", "D3", ""} {
			e2eWantStatus(t, whoami(d), http.StatusOK)
		}
		cached("D1 primed", "D1")

		// DELETE /devices/{id} masquerading as the user.
		e2eWant2xx(t, e2eDo(t, nil, http.MethodDelete, px.URL+"/_matrix/client/v3/devices/D1?"+masq(""), as.Token, map[string]any{}))
		gone("D1", "D1")
		cached("D2", "D2")
		// … and masquerading as another of its devices (MSC4326).
		e2eWant2xx(t, e2eDo(t, nil, http.MethodDelete, px.URL+"/_matrix/client/v3/devices/D2?"+masq("D3"), as.Token, map[string]any{}))
		gone("D2", "D2")
		cached("D3", "D3")
		cached("the user without a device", "")
		// POST /delete_devices: Synapse 1.163 serves it only without MAS;
		// whatever it answers, the proxy agrees.
		r := e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/delete_devices?"+masq(""), as.Token, map[string]any{"devices": []string{"D3"}})
		if r.Status >= 200 && r.Status <= 299 {
			gone("D3 by delete_devices", "D3")
		} else {
			t.Logf("POST /delete_devices in MAS mode: %d %s", r.Status, r.Body)
			cached("D3 after a refused delete_devices", "D3")
		}
	})
}
