package main_test

import (
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestE2ESynapseDown: with the homeserver stopped, a whoami the cache cannot
// answer is a 502 or 504 with a Matrix error, never a 401 (which would log the
// client out), /readyz turns 503, and both recover once Synapse is back. It
// stops its own Synapse, so the other tests' one is not disturbed.
func TestE2ESynapseDown(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eOwnSynapse(t, "outage")
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, map[string]string{"READINESS_INTERVAL": "500ms", "UPSTREAM_TIMEOUT": "2s"})
	u := syn.Register(t, "outage", false)
	cached := e2eLogin(t, px.URL, u, nil)
	uncached := e2eLogin(t, px.URL, u, nil)
	e2eWantStatus(t, e2eWhoami(t, px.URL, cached.Token), http.StatusOK)
	e2eWaitReady(t, px, http.StatusOK)

	if err := syn.Stop(); err != nil {
		t.Fatalf("stop Synapse: %v", err)
	}
	refusedBefore := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_upstream_errors_total{kind="refused"}`)

	r := e2eWhoami(t, px.URL, uncached.Token)
	if r.Status != http.StatusBadGateway && r.Status != http.StatusGatewayTimeout {
		t.Errorf("whoami of an uncached token with Synapse down: %d %s, want 502 or 504 (never 401)", r.Status, r.Body)
	}
	if got := r.Errcode(); got != "M_UNKNOWN" {
		t.Errorf("its errcode = %q (%s), want M_UNKNOWN", got, r.Body)
	}
	if got := r.Header.Get("Access-Control-Allow-Origin"); got != "*" {
		t.Errorf("its Access-Control-Allow-Origin = %q, want * (browser clients must be able to read it)", got)
	}
	// A second try must not have been cached as a failure either.
	if r := e2eWhoami(t, px.URL, uncached.Token); r.Status == http.StatusUnauthorized {
		t.Errorf("second whoami with Synapse down: 401 %s", r.Body)
	}
	if r := e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/devices", uncached.Token, nil); r.Status != http.StatusBadGateway {
		t.Errorf("proxied GET /devices with Synapse down: %d %s, want 502", r.Status, r.Body)
	}
	if d := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_upstream_errors_total{kind="refused"}`) - refusedBefore; d < 1 {
		t.Errorf("upstream_errors_total{kind=refused} went up by %v, want at least 1", d)
	}
	// A token the cache knows keeps working through the outage.
	if r := e2eWhoami(t, px.URL, cached.Token); r.Status != http.StatusOK {
		t.Errorf("whoami of a cached token with Synapse down: %d %s, want 200 from the cache", r.Status, r.Body)
	}
	e2eWaitReady(t, px, http.StatusServiceUnavailable)

	syn.Start(t)
	e2eWaitReady(t, px, http.StatusOK)
	e2eWantStatus(t, e2eWhoami(t, px.URL, uncached.Token), http.StatusOK)
}

// e2eWaitReady waits for the proxy's /readyz to answer want. The probe runs
// every READINESS_INTERVAL; a failed one turns /readyz 503 at once.
func e2eWaitReady(t testing.TB, px *e2eProxy, want int) {
	t.Helper()
	e2eEventually(t, 10*time.Second, fmt.Sprintf("/readyz %d", want), func() string {
		code, err := e2eStatusOf(px.AdminURL + "/readyz")
		if code == want {
			return ""
		}
		return fmt.Sprintf("got %d %v", code, err)
	})
}
