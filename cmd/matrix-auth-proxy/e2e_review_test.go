package main_test

// Adversarial review of the revoking-call code, against the real Synapse:
// each test demonstrates a way to break the promise and FAILS on the code
// under review (branch h-review, see its report).

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// TestE2EReviewFormBodyTokenFlushes: POST /logout with the token in an
// application/x-www-form-urlencoded body. Twisted merges the form into
// request.args, so Synapse authenticates with it and logs the token out;
// the proxy sees a token-less success and flushes the whole cache.
func TestE2EReviewFormBodyTokenFlushes(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	u := syn.Register(t, "formlogout", false)
	a := e2eLogin(t, syn.URL, u, nil)
	v := e2eLogin(t, syn.URL, syn.Register(t, "bystander", false), nil)
	e2ePrime(t, px, map[string]string{"U's a": a.Token, "V (another user)": v.Token})
	flushes := e2eFamilySum(t, px.AdminURL, e2eFlushesFamily)

	r := e2eRawRequest(t, px.URL, http.MethodPost, "/_matrix/client/v3/logout",
		http.Header{"Content-Type": {"application/x-www-form-urlencoded"}},
		[]byte("access_token="+url.QueryEscape(a.Token)))
	if r.Status != http.StatusOK {
		t.Fatalf("Synapse did not take the form body's token: %d %s", r.Status, r.Body)
	}

	e2eWantServedFromCache(t, px, "V, another user's cached session", v.Token)
	if d := e2eFamilySum(t, px.AdminURL, e2eFlushesFamily) - flushes; d != 0 {
		t.Errorf("%s grew by %v: an ordinary user's logout flushed the cache", e2eFlushesFamily, d)
	}
	e2eWantProxy401(t, px, syn, "U's a (logged out by the form body)", a.Token)
}

// TestE2EReviewPushRulesDotSegmentsDropAnotherUser: Synapse routes
// PUT …/pushrules/global/room/r//../../…/_synapse/admin/v2/users/@v:localhost
// (raw path, no dot resolution; the push rules path parameter is ".*" and
// its extra segments are ignored) to the caller's own push rule and answers
// 200. The proxy's dot-resolved reading is the admin user update, and the
// body says "deactivated": true: V's entries are dropped by a request of U.
func TestE2EReviewPushRulesDotSegmentsDropAnotherUser(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	mallory := e2eLogin(t, syn.URL, syn.Register(t, "pushdots", false), nil)
	vu := syn.Register(t, "bystander", false)
	v := e2eLogin(t, syn.URL, vu, nil)
	e2ePrime(t, px, map[string]string{"V (another user)": v.Token})

	up := strings.Repeat("../", 7) // _matrix client v3 pushrules global room r
	for _, c := range []struct{ method, path, body string }{
		{http.MethodPut, "/_matrix/client/v3/pushrules/global/room/r//" + up + "_synapse/admin/v2/users/" + vu.ID,
			`{"actions":["notify"],"deactivated":true}`},
		{http.MethodDelete, "/_matrix/client/v3/pushrules/global/room/r/" + up + "_synapse/admin/v2/users/" + vu.ID + "/devices/" + v.DeviceID, ""},
	} {
		r := e2eRawRequest(t, px.URL, c.method, c.path,
			http.Header{"Authorization": {"Bearer " + mallory.Token}, "Content-Type": {"application/json"}}, []byte(c.body))
		if r.Status != http.StatusOK {
			t.Fatalf("%s: Synapse answered %d %s, want 200 (its own push rule)", c.method, r.Status, r.Body)
		}
		if d := e2eWhoami(t, syn.URL, v.Token); d.Status != http.StatusOK {
			t.Fatalf("V's token is not valid at Synapse any more: %d", d.Status)
		}
		e2eWantServedFromCache(t, px, c.method+": V, another user's cached session", v.Token)
		e2ePrime(t, px, map[string]string{"V (another user)": v.Token})
	}
}

// TestE2EReviewUnforwardedAdminCallDropsAnyUser: a request without any
// token for POST /_synapse/admin/v1/deactivate/{V} with a non-printable
// Upgrade header. ReverseProxy refuses to forward it and calls the error
// handler, which settles the revoking call as "outcome unknown", i.e.
// performed: V's entries are dropped although Synapse never saw a request.
func TestE2EReviewUnforwardedAdminCallDropsAnyUser(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	vu := syn.Register(t, "bystander", false)
	v := e2eLogin(t, syn.URL, vu, nil)
	e2ePrime(t, px, map[string]string{"V (another user)": v.Token})

	r := e2eRawRequest(t, px.URL, http.MethodPost, "/_synapse/admin/v1/deactivate/"+vu.ID,
		http.Header{"Connection": {"Upgrade"}, "Upgrade": {"\xff"}}, nil)
	t.Logf("answered %d %s", r.Status, r.Body)
	if d := e2eWhoami(t, syn.URL, v.Token); d.Status != http.StatusOK {
		t.Fatalf("V's token is not valid at Synapse any more: %d", d.Status)
	}
	e2eWantServedFromCache(t, px, "V, after a token-less request that never reached Synapse", v.Token)
}

// TestE2EReviewDehydratedDevicePathWithSlashes: the dots of Synapse's
// pattern …/org.matrix.msc3814.v1/dehydrated_device are regex dots, so
// DELETE …/unstable/org/matrix/msc3814/v1/dehydrated_device deletes the
// dehydrated device, here a live device of the caller; the proxy does not
// see a revoking call.
func TestE2EReviewDehydratedDevicePathWithSlashes(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	u := syn.Register(t, "dehydslash", false)
	caller := e2eLogin(t, syn.URL, u, nil)
	victim := e2eLogin(t, syn.URL, u, nil)
	// Straight at Synapse: make the victim's device the dehydrated one.
	if r := e2ePutDehydrated(t, syn.URL, caller.Token, u.ID, victim.DeviceID); r.Status != http.StatusOK {
		t.Fatalf("PUT dehydrated_device: %d %s", r.Status, r.Body)
	}
	e2ePrime(t, px, map[string]string{"caller": caller.Token, "victim": victim.Token})
	r := e2eDo(t, nil, http.MethodDelete, px.URL+"/_matrix/client/unstable/org/matrix/msc3814/v1/dehydrated_device", caller.Token, nil)
	if r.Status != http.StatusOK {
		t.Fatalf("DELETE with slashes for the dots: %d %s, want Synapse's 200", r.Status, r.Body)
	}
	e2eWantProxy401(t, px, syn, "the session of the device deleted as the dehydrated device", victim.Token)
}

// TestE2EReviewSynapse500DropsAnyUser: Synapse answers 500 to any request
// whose token is not ASCII (get_access_token_from_request decodes it with
// "ascii" and nothing catches the UnicodeDecodeError), before any auth
// check. A 5xx is an "unknown outcome", counted as performed, and the
// admin rows need no caller: a request with ?access_token=%FF (or
// "Authorization: Bearer \xff") for POST /_synapse/admin/v1/deactivate/{V}
// drops V's entries at once.
func TestE2EReviewSynapse500DropsAnyUser(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	vu := syn.Register(t, "bystander", false)
	v := e2eLogin(t, syn.URL, vu, nil)
	for _, c := range []struct {
		method, uri string
		h           http.Header
	}{
		{http.MethodPost, "/_synapse/admin/v1/deactivate/" + vu.ID + "?access_token=%FF", nil},
		{http.MethodDelete, "/_synapse/admin/v2/users/" + vu.ID + "/devices/" + v.DeviceID, http.Header{"Authorization": {"Bearer \xff"}}},
		// The client API's lock row takes any two segments for the
		// version: Synapse routes this to the push rules servlet.
		{http.MethodPut, "/_matrix/client/v3/pushrules/admin/lock/" + vu.ID + "?access_token=%FF", nil},
	} {
		e2ePrime(t, px, map[string]string{"V (another user)": v.Token})
		var body []byte
		if c.method == http.MethodPut {
			body = []byte(`{"locked":true}`)
		}
		r := e2eRawRequest(t, px.URL, c.method, c.uri, c.h, body)
		if r.Status != http.StatusInternalServerError {
			t.Fatalf("%s: Synapse answered %d %s, want its 500", c.uri, r.Status, r.Body)
		}
		if d := e2eWhoami(t, syn.URL, v.Token); d.Status != http.StatusOK {
			t.Fatalf("V's token is not valid at Synapse any more: %d", d.Status)
		}
		e2eWantServedFromCache(t, px, "V, after a token-less request Synapse answered 500", v.Token)
	}
}

// TestE2EReviewFencedAppserviceAnswerFromAnotherAddress: the Fenced
// appservice is honoured only from e2eFencedAddr. A whoami with its token
// and a user_id masquerade from another address gets 401 M_UNKNOWN_TOKEN,
// which the proxy caches without the address. A POST /logout/all with the
// same token and masquerade from the allowed address then finds that
// negative answer: the proxy names no user, Synapse logs the masqueraded
// user out everywhere, and that user's token stays cached.
func TestE2EReviewFencedAppserviceAnswerFromAnotherAddress(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	px := e2eStartProxy(t, syn.URL, nil)
	fenced := e2eClientFrom(t, e2eFencedAddr)
	elsewhere := e2eClientFrom(t, "127.0.0.5")

	local := syn.Fenced.Prefix + e2eUniqueName(t, "rev")
	reg := e2eDo(t, fenced, http.MethodPost, syn.URL+"/_matrix/client/v3/register", syn.Fenced.Token,
		map[string]any{"type": "m.login.application_service", "username": local})
	e2eWant2xx(t, reg)
	userID, _ := reg.JSON(t)["user_id"].(string)
	bridged, _ := reg.JSON(t)["access_token"].(string)
	if bridged == "" {
		t.Fatalf("registration gave no token: %s", reg.Body)
	}
	e2ePrime(t, px, map[string]string{"the bridged user's own session": bridged})

	q := "?user_id=" + url.QueryEscape(userID)
	if r := e2eDo(t, elsewhere, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami"+q, syn.Fenced.Token, nil); r.Status != http.StatusUnauthorized {
		t.Fatalf("the fenced appservice from another address: whoami %d %s, want Synapse's 401", r.Status, r.Body)
	}
	e2eWant2xx(t, e2eDo(t, fenced, http.MethodPost, px.URL+"/_matrix/client/v3/logout/all"+q, syn.Fenced.Token, map[string]any{}))
	e2eWantProxy401(t, px, syn, "the bridged user's session after the appservice's logout/all", bridged)
}
