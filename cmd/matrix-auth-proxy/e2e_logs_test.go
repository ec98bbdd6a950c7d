package main_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
)

// TestE2ESecretsStayOutOfLogs makes, through a proxy logging at debug level,
// every kind of call that carries a secret in its path or query (Synapse
// admin registration tokens, the registration-token validity check, an OIDC
// callback, 3PID requestToken and submit_token, access tokens in the query,
// MSC4140 delayed-event and MSC4108 rendezvous IDs), and the same calls
// through a second proxy whose homeserver is unreachable (upstream-error
// warnings). Then it reads every line both proxies logged and looks for
// every secret and access token, as sent and escaped.
func TestE2ESecretsStayOutOfLogs(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	env := map[string]string{"RATE_LIMIT_RPS": "0", "LOG_LEVEL": "debug"}
	px := e2eStartProxy(t, syn.URL, env)
	// Nothing listens on a free address: every forwarded call fails.
	down := e2eStartProxy(t, "http://"+e2eFreeAddr(t), env)

	admin := syn.Register(t, "logadmin", true)
	user := syn.Register(t, "loguser", false)
	sess := e2eLogin(t, px.URL, user, nil)
	rnd := func(prefix string) string {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		return prefix + hex.EncodeToString(b)
	}
	var (
		regToken     = rnd("RegTok-") // Synapse allows [A-Za-z0-9._~-]
		oidcCode     = rnd("OidcCode-")
		oidcState    = rnd("OidcState-")
		clientSecret = rnd("ClientSecret-")
		sid          = rnd("Sid-")
		mailToken    = rnd("MailToken-")
		delayID      = rnd("syd_Delay")
		rendezvous   = rnd("Rendezvous-")
	)
	secrets := map[string]string{
		"registration token": regToken, "OIDC code": oidcCode, "OIDC state": oidcState,
		"client_secret": clientSecret, "sid": sid, "3PID token": mailToken, "delay ID": delayID,
		"rendezvous ID": rendezvous, "user's access token": sess.Token, "admin's access token": admin.Token,
	}

	regPath := "/_synapse/admin/v1/registration_tokens/" + regToken
	r := e2eDo(t, nil, http.MethodPost, px.URL+"/_synapse/admin/v1/registration_tokens/new", admin.Token,
		map[string]any{"token": regToken, "uses_allowed": 3})
	e2eWantStatus(t, r, http.StatusOK)
	if got, _ := r.JSON(t)["token"].(string); got != regToken {
		t.Fatalf("registration token created as %q, want %q", got, regToken)
	}
	e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, px.URL+regPath, admin.Token, nil), http.StatusOK)
	e2eWantStatus(t, e2eDo(t, nil, http.MethodPut, px.URL+regPath, admin.Token, map[string]any{"uses_allowed": 5}), http.StatusOK)

	q := url.Values{"client_secret": {clientSecret}, "sid": {sid}, "token": {mailToken}}.Encode()
	threepid := map[string]any{"client_secret": clientSecret, "email": "log@example.org", "send_attempt": 1}
	calls := []struct {
		method, path, token string
		body                any
	}{
		{http.MethodGet, regPath, admin.Token, nil},
		{http.MethodGet, "/_matrix/client/v1/register/m.login.registration_token/validity?token=" + regToken, "", nil},
		{http.MethodGet, "/_synapse/client/oidc/callback?code=" + oidcCode + "&state=" + oidcState, "", nil},
		{http.MethodPost, "/_matrix/client/v3/register/email/requestToken?client_secret=" + clientSecret, "", threepid},
		{http.MethodPost, "/_matrix/client/v3/register/msisdn/requestToken?client_secret=" + clientSecret, "",
			map[string]any{"client_secret": clientSecret, "country": "GB", "phone_number": "7700900000", "send_attempt": 1}},
		{http.MethodPost, "/_matrix/client/v3/account/password/email/requestToken?client_secret=" + clientSecret, "", threepid},
		{http.MethodGet, "/_synapse/client/password_reset/email/submit_token?" + q, "", nil},
		{http.MethodGet, "/_matrix/client/unstable/registration/email/submit_token?" + q, "", nil},
		{http.MethodPost, "/_matrix/client/v3/account/3pid/msisdn/submit_token?" + q, "", nil},
		{http.MethodPost, "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/" + delayID + "/cancel", sess.Token, map[string]any{}},
		{http.MethodPut, "/_synapse/client/rendezvous/" + rendezvous, "", []byte("x")},
		{http.MethodGet, "/_matrix/client/v3/account/whoami?access_token=" + sess.Token, "", nil},
		{http.MethodGet, "/_matrix/client/v3/sync?timeout=0&access_token=" + sess.Token, "", nil},
		{http.MethodGet, "/_matrix/client/v3/sync?timeout=0;access_token=" + sess.Token, "", nil},
		{http.MethodGet, "/_matrix/client/v3/devices?" + url.QueryEscape(sess.Token), sess.Token, nil},
		{http.MethodDelete, regPath, admin.Token, nil},
	}
	for _, c := range calls {
		if r := e2eDo(t, nil, c.method, px.URL+c.path, c.token, c.body); r.Status >= 500 {
			t.Errorf("%s %s through the proxy: %d %s", c.method, c.path, r.Status, r.Body)
		}
		if r := e2eDo(t, nil, c.method, down.URL+c.path, c.token, c.body); r.Status != http.StatusBadGateway {
			t.Errorf("%s %s with the homeserver unreachable: %d %s, want 502", c.method, c.path, r.Status, r.Body)
		}
	}
	e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, px.URL+regPath, admin.Token, nil), http.StatusNotFound)
	// Stopping flushes the logs.
	px.Stop(t)
	down.Stop(t)

	requests, failures := 0, 0
	for _, p := range []*e2eProxy{px, down} {
		b, err := os.ReadFile(p.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			line := sc.Text()
			var entry map[string]any
			if err := json.Unmarshal([]byte(line), &entry); err != nil {
				t.Errorf("log line is not JSON (%v): %s", err, line)
			}
			switch entry["msg"] {
			case "request":
				requests++
			case "homeserver request failed":
				failures++
			}
			decoded := strings.Join(e2eStrings(entry), "\n")
			for what, s := range secrets {
				for _, form := range []string{s, url.QueryEscape(s), url.PathEscape(s)} {
					if strings.Contains(line, form) || strings.Contains(decoded, form) {
						t.Errorf("the %s reached the logs: %s", what, line)
						break
					}
				}
			}
		}
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
	}
	// A scan of lines that never carried the calls would prove nothing.
	if requests < 2*len(calls) {
		t.Errorf("%d debug request lines for %d calls through two proxies, want at least %d", requests, len(calls), 2*len(calls))
	}
	if failures < len(calls) {
		t.Errorf("%d upstream-error warnings for %d calls to an unreachable homeserver, want at least %d", failures, len(calls), len(calls))
	}
}

// e2eStrings returns every string in a decoded JSON value, keys included.
func e2eStrings(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case map[string]any:
		var out []string
		for k, e := range v {
			out = append(out, k)
			out = append(out, e2eStrings(e)...)
		}
		return out
	case []any:
		var out []string
		for _, e := range v {
			out = append(out, e2eStrings(e)...)
		}
		return out
	}
	return nil
}
