package main_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestE2EReview2DeleteDevicesFlushesPeers (review 2, finding 2, on the real
// Synapse and Redis): one POST /delete_devices naming 5,000 device IDs the
// user never had (Synapse answers 200: it deletes what exists, and lets a
// UIA session be reused for repeated calls) makes replica A publish 5,000
// explicit invalidations. They overflow A's explicit lane (1,024), so A
// tells every peer to flush: replica B loses a bystander's entry, which no
// revocation concerned. A sentinel logout sent through A afterwards marks
// when B has applied everything A published before it.
func TestE2EReview2DeleteDevicesFlushesPeers(t *testing.T) {
	e2eShort(t)
	rs := e2eBusStartRedis(t)
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	env := map[string]string{
		"REDIS_URL":      "redis://" + rs.addr,
		"TOKEN_HASH_KEY": hex.EncodeToString(key),
		"RATE_LIMIT_RPS": "0",
	}
	pa := e2eStartProxy(t, syn.URL, env)
	pb := e2eStartProxy(t, syn.URL, env)
	e2eBusWaitUp(t, 1, pa, pb)

	mallory := syn.Register(t, "r2mallory", false)
	bystanderUser := syn.Register(t, "r2bystander", false)
	m := e2eLogin(t, syn.URL, mallory, nil)
	sentinel := e2eLogin(t, syn.URL, mallory, nil)
	bystander := e2eLogin(t, syn.URL, bystanderUser, nil)
	e2eWantStatus(t, e2eWhoami(t, pb.URL, bystander.Token), http.StatusOK)
	e2eWantStatus(t, e2eWhoami(t, pb.URL, sentinel.Token), http.StatusOK)

	ids := make([]string, 5000)
	for i := range ids {
		ids[i] = fmt.Sprintf("NX%d", i)
	}
	body := map[string]any{
		"devices": ids,
		"auth": map[string]any{"type": "m.login.password", "password": mallory.Password,
			"identifier": map[string]any{"type": "m.id.user", "user": mallory.ID}},
	}
	e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, pa.URL+"/_matrix/client/v3/delete_devices", m.Token, body))
	e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, pa.URL+"/_matrix/client/v3/logout", sentinel.Token, map[string]any{}))
	e2eEventually(t, 30*time.Second, "B applying A's messages up to the sentinel logout", func() string {
		if r := e2eWhoami(t, pb.URL, sentinel.Token); r.Status != http.StatusUnauthorized {
			return fmt.Sprintf("sentinel still %d at B", r.Status)
		}
		return ""
	})
	t.Logf("A: queue_full %v, published %v",
		e2eMetric(t, pa.AdminURL, `matrix_auth_proxy_bus_messages_dropped_total{reason="queue_full"}`),
		e2eMetric(t, pa.AdminURL, `matrix_auth_proxy_bus_messages_published_total`))
	before := e2eMetric(t, pb.AdminURL, e2eUpstreamWhoami200)
	e2eWantStatus(t, e2eWhoami(t, pb.URL, bystander.Token), http.StatusOK)
	if d := e2eMetric(t, pb.AdminURL, e2eUpstreamWhoami200) - before; d != 0 {
		t.Errorf("replica B flushed a bystander's entry after one ordinary delete_devices call through A (looked up again: %v)", d)
	}
}

// TestE2EReview2IgnoredMasqueradeHidesTheCaller (review 2, finding 9, on the
// real Synapse): Synapse ignores ?user_id= for an ordinary user's token, so
// POST /logout/all?user_id=<someone else> logs the caller out everywhere.
// The proxy resolves the caller with that masquerade, gets the caller's own
// 200 (not the user asked for), does not take it as the caller, and drops
// only the calling token: the user's other session stays a cached 200.
func TestE2EReview2IgnoredMasqueradeHidesTheCaller(t *testing.T) {
	e2eShort(t)
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, map[string]string{"RATE_LIMIT_RPS": "0"})
	u := syn.Register(t, "r2masq", false)
	other := syn.Register(t, "r2other", false)
	a := e2eLogin(t, syn.URL, u, nil)
	b := e2eLogin(t, syn.URL, u, nil)
	e2eWantStatus(t, e2eWhoami(t, px.URL, a.Token), http.StatusOK)
	e2eWantStatus(t, e2eWhoami(t, px.URL, b.Token), http.StatusOK)
	e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/logout/all?user_id="+other.ID, a.Token, map[string]any{}))
	// Synapse did log every session of u out.
	e2eWantStatus(t, e2eWhoami(t, syn.URL, b.Token), http.StatusUnauthorized)
	if r := e2eWhoami(t, px.URL, b.Token); r.Status != http.StatusUnauthorized {
		t.Errorf("after POST /logout/all?user_id=… through the proxy, another session of the caller: %d %s from the proxy, want 401", r.Status, r.Body)
	}
}
