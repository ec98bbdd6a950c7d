package main_test

import (
	"fmt"
	"net/http"
	"testing"
)

// TestE2EAddressBoundAnswers: Synapse admits the Fenced appservice's token
// only from e2eFencedAddr (ip_range_whitelist) and calls it unknown from
// anywhere else. Through the proxy, in either order, each address gets
// Synapse's own answer, never the other address's cached one.
func TestE2EAddressBoundAnswers(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	const outsider = "127.0.0.1"
	const whoami = "/_matrix/client/v3/account/whoami"
	fenced, outside := e2eClientFrom(t, e2eFencedAddr), e2eClientFrom(t, outsider)

	// The premise, straight to Synapse.
	e2eWantStatus(t, e2eDo(t, fenced, http.MethodGet, syn.URL+whoami, syn.Fenced.Token, nil), http.StatusOK)
	if r := e2eDo(t, outside, http.MethodGet, syn.URL+whoami, syn.Fenced.Token, nil); r.Status != http.StatusUnauthorized || r.Errcode() != "M_UNKNOWN_TOKEN" {
		t.Fatalf("Synapse from %s: %d %s, want 401 M_UNKNOWN_TOKEN", outsider, r.Status, r.Body)
	}

	type step struct {
		client *http.Client
		from   string
		want   int
	}
	allowed, other := step{fenced, e2eFencedAddr, http.StatusOK}, step{outside, outsider, http.StatusUnauthorized}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"allowed first", []step{allowed, allowed, other, other}},
		{"outsider first", []step{other, other, allowed, allowed}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// TRUSTED_PROXIES unset: the connection's peer is the client.
			px := e2eStartProxy(t, syn.URL, nil)
			for i, s := range tc.steps {
				r := e2eDo(t, s.client, http.MethodGet, px.URL+whoami, syn.Fenced.Token, nil)
				if r.Status != s.want {
					t.Errorf("step %d, from %s: %d %s, want %d", i, s.from, r.Status, r.Body, s.want)
				}
				if s.want == http.StatusOK && r.Status == http.StatusOK && r.JSON(t)["user_id"] != syn.Fenced.Sender {
					t.Errorf("step %d: %s, want the sender %s", i, r.Body, syn.Fenced.Sender)
				}
			}
			// Each address's repeat came from the cache.
			m := e2eMetrics(t, px.AdminURL)
			if hits := m[e2eLookupHit] + m[e2eLookupNegative]; hits < 1 {
				t.Errorf("no repeat was answered from the cache: %v hits, %v negative hits", m[e2eLookupHit], m[e2eLookupNegative])
			}
		})
	}
}

// TestE2EMasqueradeCannotFillTheCache: Synapse ignores user_id on an
// ordinary user's token, so 2,000 whoami calls with one token and distinct
// user_id values all get the user's own answer; they must not become 2,000
// cache entries that push everyone else's out.
func TestE2EMasqueradeCannotFillTheCache(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	// Rate limiting off: 2,000 requests in a row are the point here.
	px := e2eStartProxy(t, syn.URL, map[string]string{"RATE_LIMIT_RPS": "0"})
	u := syn.Register(t, "filler", false)
	sess := e2eLogin(t, syn.URL, u, nil)

	const n = 2000
	for i := range n {
		r := e2eDo(t, nil, http.MethodGet, fmt.Sprintf("%s/_matrix/client/v3/account/whoami?user_id=%s", px.URL,
			e2ePath(fmt.Sprintf("@x%d:localhost", i))), sess.Token, nil)
		if r.Status != http.StatusOK || r.JSON(t)["user_id"] != u.ID {
			t.Fatalf("request %d: %d %s, want 200 for %s", i, r.Status, r.Body, u.ID)
		}
	}
	// The plain whoami is still cached, as one entry.
	for range 2 {
		e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami", sess.Token, nil), http.StatusOK)
	}
	m := e2eMetrics(t, px.AdminURL)
	if got := m["matrix_auth_proxy_token_cache_entries"]; got > 2 {
		t.Errorf("%d whoami calls with distinct user_id left %v cache entries, want at most 2", n, got)
	}
	if m[e2eLookupHit] < 1 {
		t.Errorf("the plain whoami was not cached: %v hits", m[e2eLookupHit])
	}
}
