package main_test

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"testing"
)

// TestE2EAdminAPIRevocations: revocations made with Synapse's admin API
// through a proxy drop the revoked tokens at once from that proxy (CACHE_TTL
// is 10m, so a pass proves invalidation, not expiry) and, over the Redis
// bus, from its sibling replica; the tokens not revoked stay cached.
func TestE2EAdminAPIRevocations(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	rs := e2eBusStartRedis(t)
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	env := map[string]string{
		"REDIS_URL": "redis://" + rs.addr, "TOKEN_HASH_KEY": hex.EncodeToString(key),
		"REDIS_DOWN_CACHE_TTL": "1m", "RATE_LIMIT_RPS": "0",
	}
	pa := e2eStartProxy(t, syn.URL, env)
	pb := e2eStartProxy(t, syn.URL, env)
	e2eBusWaitUp(t, 1, pa, pb)
	admin := syn.Register(t, "revadmin", true)

	for _, tc := range []struct {
		name    string
		method  string
		path    func(u *e2eUser, s map[string]*e2eSession) string
		body    any
		revoked []string
	}{
		{"delete a device", http.MethodDelete, func(u *e2eUser, s map[string]*e2eSession) string {
			return "/_synapse/admin/v2/users/" + e2ePath(u.ID) + "/devices/" + e2ePath(s["a"].DeviceID)
		}, nil, []string{"a"}},
		{"delete devices", http.MethodPost, func(u *e2eUser, s map[string]*e2eSession) string {
			return "/_synapse/admin/v2/users/" + e2ePath(u.ID) + "/delete_devices"
		}, nil, []string{"a", "b"}},
		{"deactivate", http.MethodPost, func(u *e2eUser, _ map[string]*e2eSession) string {
			return "/_synapse/admin/v1/deactivate/" + e2ePath(u.ID)
		}, map[string]any{"erase": false}, []string{"a", "b"}},
		{"reset password", http.MethodPost, func(u *e2eUser, _ map[string]*e2eSession) string {
			return "/_synapse/admin/v1/reset_password/" + e2ePath(u.ID)
		}, map[string]any{"new_password": "n3w-Passw0rd!", "logout_devices": true}, []string{"a", "b"}},
		{"reset password keeping devices", http.MethodPost, func(u *e2eUser, _ map[string]*e2eSession) string {
			return "/_synapse/admin/v1/reset_password/" + e2ePath(u.ID)
		}, map[string]any{"new_password": "n3w-Passw0rd!", "logout_devices": false}, nil},
		{"PUT users deactivated", http.MethodPut, func(u *e2eUser, _ map[string]*e2eSession) string {
			return "/_synapse/admin/v2/users/" + e2ePath(u.ID)
		}, map[string]any{"deactivated": true}, []string{"a", "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := syn.Register(t, "adminrev", false)
			other := syn.Register(t, "bystander", false)
			sessions := map[string]*e2eSession{
				"a": e2eLogin(t, syn.URL, u, nil), "b": e2eLogin(t, syn.URL, u, nil),
				"other": e2eLogin(t, syn.URL, other, nil),
			}
			for _, px := range []*e2eProxy{pa, pb} {
				for _, s := range sessions {
					e2eWantStatus(t, e2eWhoami(t, px.URL, s.Token), http.StatusOK)
				}
			}
			body := tc.body
			if tc.name == "delete devices" {
				body = map[string]any{"devices": []string{sessions["a"].DeviceID, sessions["b"].DeviceID}}
			}
			e2eWant2xx(t, e2eDo(t, nil, tc.method, pa.URL+tc.path(u, sessions), admin.Token, body))

			// The proxy the call went through knows at once.
			e2eCheckTokens(t, pa, syn, sessions, tc.revoked)
			// Its sibling hears of it over the bus.
			for _, name := range tc.revoked {
				e2eBusWant401Within(t, pb, sessions[name].Token, e2eBusBound)
			}
			e2eCheckTokens(t, pb, syn, sessions, tc.revoked)
		})
	}
}
