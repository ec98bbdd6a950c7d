package main_test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestE2ECoherence is the coherence driver of proxy/coherence_test.go with
// the real Synapse as the model: seeded-random operations (logins on new and
// existing devices, whoami, every client revoking call succeeding or
// refused, the admin API, non-whoami requests) through the proxy, and after
// every step, for every token ever issued, whoami through the proxy must
// answer what Synapse answers directly. Nothing happens behind the proxy's
// back, so no stale answer is allowed. E2E_COHERENCE_OPS sets the count
// (default 200), COHERENCE_SEED replays a seed.
func TestE2ECoherence(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	// No rate limit: the check alone sends hundreds of requests a step.
	px := e2eStartProxy(t, syn.URL, map[string]string{"CACHE_TTL": "10m", "RATE_LIMIT_RPS": "0"})

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("COHERENCE_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	n := 200
	if s := os.Getenv("E2E_COHERENCE_OPS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("COHERENCE_SEED=%d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	admin := syn.Register(t, "coh-admin", true)
	users := []*e2eUser{syn.Register(t, "coh", false), syn.Register(t, "coh", false), syn.Register(t, "coh", false)}
	type token struct {
		s *e2eSession
		u *e2eUser
	}
	var tokens []token
	gone := map[*e2eUser]bool{} // deactivated
	var trace []string
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("COHERENCE_SEED=%d: "+format+"\nsteps:\n%s", append([]any{seed}, append(args, strings.Join(trace, "\n"))...)...)
	}
	live := func(tok string) bool { return e2eWhoami(t, syn.URL, tok).Status == http.StatusOK }
	pick := func() token { return tokens[rng.IntN(len(tokens))] }
	login := func(u *e2eUser, extra map[string]any) {
		body := map[string]any{"type": "m.login.password", "identifier": map[string]any{"type": "m.id.user", "user": u.Name}, "password": u.Password}
		for k, v := range extra {
			body[k] = v
		}
		r := e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/login", "", body)
		if r.Status != http.StatusOK {
			fail("login %s: %d %s", u.Name, r.Status, r.Body)
		}
		tokens = append(tokens, token{e2eSessionFrom(t, r), u})
	}
	for _, u := range users {
		login(u, nil)
	}
	// uia makes a call that needs user-interactive auth with a live token;
	// with a revoked one, the call as it is (a 401).
	uia := func(method, path string, tk token, body map[string]any) e2eResp {
		if !live(tk.s.Token) {
			return e2eDo(t, nil, method, px.URL+path, tk.s.Token, body)
		}
		return e2eUIA(t, px.URL, method, path, tk.s.Token, tk.u, body)
	}
	for step := range n {
		var what string
		switch op := rng.IntN(12); op {
		case 0, 1:
			u := users[rng.IntN(len(users))]
			what = "login " + u.Name
			login(u, nil)
		case 2:
			tk := pick()
			if gone[tk.u] {
				continue // a deactivated user cannot log in
			}
			what = "login on the existing device " + tk.s.DeviceID
			login(tk.u, map[string]any{"device_id": tk.s.DeviceID})
		case 3:
			tk := pick()
			what = "logout " + tk.s.DeviceID
			e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/logout", tk.s.Token, map[string]any{})
		case 4:
			tk := pick()
			what = "logout/all " + tk.u.Name
			e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/r0/logout/all", tk.s.Token, map[string]any{})
		case 5:
			tk, victim := pick(), pick()
			what = "DELETE devices/" + victim.s.DeviceID + " by " + tk.s.DeviceID
			uia(http.MethodDelete, "/_matrix/client/v3/devices/"+e2ePath(victim.s.DeviceID), tk, map[string]any{})
		case 6:
			tk, victim := pick(), pick()
			what = "delete_devices " + victim.s.DeviceID + " by " + tk.s.DeviceID
			uia(http.MethodPost, "/_matrix/client/v3/delete_devices", tk, map[string]any{"devices": []string{victim.s.DeviceID}})
		case 7:
			tk := pick()
			logout := rng.IntN(2) == 0
			what = fmt.Sprintf("password change by %s of %s, logout_devices %t", tk.s.DeviceID, tk.u.Name, logout)
			next := tk.u.Password + "x"
			r := uia(http.MethodPost, "/_matrix/client/v3/account/password", tk, map[string]any{"new_password": next, "logout_devices": logout})
			if r.Status == http.StatusOK {
				tk.u.Password = next
			}
			what += fmt.Sprintf(": %d %s", r.Status, r.Body)
		case 8:
			tk := pick()
			what = "GET devices by " + tk.s.DeviceID
			e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/devices", tk.s.Token, nil)
		case 9:
			victim := pick()
			what = "admin DELETE device " + victim.s.DeviceID + " of " + victim.u.Name
			e2eDo(t, nil, http.MethodDelete, px.URL+"/_synapse/admin/v2/users/"+e2ePath(victim.u.ID)+"/devices/"+e2ePath(victim.s.DeviceID), admin.Token, nil)
		case 10:
			tk := pick()
			what = "whoami by query " + tk.s.DeviceID
			e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami?access_token="+tk.s.Token, "", nil)
		case 11:
			if rng.IntN(4) != 0 {
				continue
			}
			// Rare: a deactivated user is replaced by a new one.
			i := rng.IntN(len(users))
			u := users[i]
			what = "admin deactivate " + u.Name
			e2eDo(t, nil, http.MethodPost, px.URL+"/_synapse/admin/v1/deactivate/"+e2ePath(u.ID), admin.Token, map[string]any{"erase": false})
			gone[u] = true
			users[i] = syn.Register(t, "coh", false)
		}
		trace = append(trace, fmt.Sprintf("%d: %s", step, what))
		for _, tk := range tokens {
			for _, query := range []bool{false, true} {
				var via, direct e2eResp
				if query {
					via = e2eDo(t, nil, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami?access_token="+tk.s.Token, "", nil)
				} else {
					via = e2eWhoami(t, px.URL, tk.s.Token)
				}
				direct = e2eWhoami(t, syn.URL, tk.s.Token)
				if !e2eSameWhoami(via, direct) {
					fail("after step %d (%s): token of %s device %s (query %t): proxy says %d %s, Synapse %d %s",
						step, what, tk.u.Name, tk.s.DeviceID, query, via.Status, via.Body, direct.Status, direct.Body)
				}
			}
		}
	}
}

// e2eSameWhoami: the same status, and for a 200 the same user and device.
func e2eSameWhoami(a, b e2eResp) bool {
	if a.Status != b.Status {
		return false
	}
	if a.Status != http.StatusOK {
		return true
	}
	var x, y struct {
		UserID   string `json:"user_id"`
		DeviceID string `json:"device_id"`
	}
	return json.Unmarshal(a.Body, &x) == nil && json.Unmarshal(b.Body, &y) == nil && x == y
}
