package proxy

import (
	"net/url"
	"strings"
	"testing"

	"go.uber.org/zap/zapcore"
)

const (
	tokSynapse = "syt_YWxpY2U_HmKsmHNYbXzCYUpjLRkk_2WB6Gq"
	tokRefresh = "syr_YWxpY2U_QmRvYvbNfEdWsTahqXWb_1xEW9n"
	tokMAS     = "mat_Kf3mXXnJvTUsJ1pVb7cyUQ3YzT7zXp_0aBcDe"
)

func TestLogQuery(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "", ""},
		{"access token", "access_token=" + tokSynapse, "access_token=REDACTED"},
		{"access token among harmless ones", "timeout=30000&access_token=abc&since=s72594_4483_1934",
			"timeout=30000&access_token=REDACTED&since=s72594_4483_1934"},
		{"names are matched exactly: a stray case is not allowlisted", "Access_Token=abc&TIMEOUT=5", "REDACTED&REDACTED"},
		{"SSO redirect and login token", "loginToken=abc&redirectUrl=https%3A%2F%2Fapp.example%2F",
			"loginToken=REDACTED&redirectUrl=REDACTED"},
		{"registration token validity", "token=MySecretRegToken", "token=REDACTED"},
		{"OIDC callback", "code=c0de-SECRET&state=st4te-SECRET", "code=REDACTED&state=REDACTED"},
		{"3PID submit_token", "token=123456&client_secret=cs-SECRET&sid=sid-SECRET",
			"token=REDACTED&client_secret=REDACTED&sid=REDACTED"},
		{"consent form HMAC", "u=alice&h=0123abcdef&v=1.0", "u=REDACTED&h=REDACTED&v=REDACTED"},
		{"CAS ticket", "ticket=ST-1-SECRET&redirectUrl=x", "ticket=REDACTED&redirectUrl=REDACTED"},
		{"SAML", "SAMLResponse=PHNhbWw%2B&RelayState=abc", "SAMLResponse=REDACTED&RelayState=REDACTED"},
		{"UIA fallback session", "session=AbCdEfGhIjKlMnOpQrStUvWx", "session=REDACTED"},
		{"unsubscribe link", "access_token=" + tokSynapse + "&app_id=m.email&pushkey=alice%40example.org",
			"access_token=REDACTED&app_id=REDACTED&pushkey=REDACTED"},
		{"masquerading appservice", "user_id=%40bridge_alice%3Alocalhost&org.matrix.msc3202.device_id=PHONE&ts=1700000000000",
			"user_id=%40bridge_alice%3Alocalhost&org.matrix.msc3202.device_id=PHONE&ts=1700000000000"},
		{"sync", "filter=0&since=s1_2_3&full_state=false&set_presence=offline&timeout=30000",
			"filter=0&since=s1_2_3&full_state=false&set_presence=offline&timeout=30000"},
		{"inline filter JSON keeps its escapes", "filter=%7B%22room%22%3A%7B%7D%7D", "filter=%7B%22room%22%3A%7B%7D%7D"},
		{"messages", "dir=b&from=t47-1234_0_0&limit=20", "dir=b&from=t47-1234_0_0&limit=20"},
		{"media", "width=96&height=96&method=crop&allow_remote=true", "width=96&height=96&method=crop&allow_remote=true"},
		{"join via", "via=example.org&via=matrix.org", "via=example.org&via=matrix.org"},
		{"a token in an allowlisted value", "since=" + tokSynapse + "&user_id=" + tokMAS, "since=REDACTED&user_id=REDACTED"},
		{"a token in an allowlisted value, escaped", "since=syt%5Fabc", "since=REDACTED"},
		{"a bare token as a key", tokSynapse, "REDACTED"},
		{"a bare token among others", "timeout=1&" + tokRefresh + "&limit=2", "timeout=1&REDACTED&limit=2"},
		{"a bare unknown name", "flag", "REDACTED"},
		{"a bare allowlisted name", "full_state", "full_state"},
		{"a token as a key with a value", tokSynapse + "=1", "REDACTED"},
		{"a camelCase unknown name", "myToken=x", "REDACTED"},
		{"a long name", strings.Repeat("a", 33) + "=x", "REDACTED"},
		{"a name with odd characters", "a%20b=x&a%2Fb=y", "REDACTED&REDACTED"},
		{"semicolons separate, as Twisted splits", "timeout=1;access_token=" + tokSynapse, "timeout=1&access_token=REDACTED"},
		{"empty parts are dropped", "&&timeout=1&&", "timeout=1"},
		{"unparseable is replaced whole", "access_token=abc&x=%zz", unparseableQuery},
		{"unparseable name", "%zz=1", unparseableQuery},
		{"long value cut", "filter=" + strings.Repeat("x", 200), "filter=" + strings.Repeat("x", maxLoggedValue) + "..."},
		{"empty value", "timeout=&token=", "timeout=&token=REDACTED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := logQuery(tc.in); got != tc.want {
				t.Errorf("logQuery(%q)\n got %q\nwant %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestLogQueryBoundsParameters(t *testing.T) {
	raw := strings.Repeat("limit=1&", maxLoggedParams+10)
	got := logQuery(raw)
	if n := strings.Count(got, "limit=1"); n != maxLoggedParams {
		t.Errorf("%d parameters logged, want %d", n, maxLoggedParams)
	}
	if !strings.HasSuffix(got, "&...") {
		t.Errorf("%q does not say it was cut", got)
	}
	if got := logQuery(strings.Repeat("limit=1&", maxLoggedParams)); strings.Contains(got, "...") {
		t.Errorf("exactly %d parameters were cut: %q", maxLoggedParams, got)
	}
}

func TestLogPath(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "", ""},
		{"root", "/", "/"},
		{"whoami", "/_matrix/client/v3/account/whoami", "/_matrix/client/v3/account/whoami"},
		{"registration token", "/_synapse/admin/v1/registration_tokens/MySecretRegToken",
			"/_synapse/admin/v1/registration_tokens/REDACTED"},
		{"registration token, another version", "/_synapse/admin/v2/registration_tokens/abc",
			"/_synapse/admin/v2/registration_tokens/REDACTED"},
		{"registration token, trailing slash", "/_synapse/admin/v1/registration_tokens/abc/",
			"/_synapse/admin/v1/registration_tokens/REDACTED/"},
		{"registration token, doubled slashes", "//_synapse//admin/v1/registration_tokens//abc",
			"//_synapse//admin/v1/registration_tokens//REDACTED"},
		{"registration token, other case", "/_Synapse/ADMIN/v1/Registration_Tokens/abc",
			"/_Synapse/ADMIN/v1/Registration_Tokens/REDACTED"},
		{"registration token, escaped prefix", "/_synapse/admin/v1/registration%5Ftokens/abc",
			"/_synapse/admin/v1/registration%5Ftokens/REDACTED"},
		{"registration token with escapes", "/_synapse/admin/v1/registration_tokens/a%2Fb%20c",
			"/_synapse/admin/v1/registration_tokens/REDACTED"},
		{"creating a registration token", "/_synapse/admin/v1/registration_tokens/new",
			"/_synapse/admin/v1/registration_tokens/new"},
		{"listing registration tokens", "/_synapse/admin/v1/registration_tokens", "/_synapse/admin/v1/registration_tokens"},
		{"not at the root", "/x/_synapse/admin/v1/registration_tokens/abc", "/x/_synapse/admin/v1/registration_tokens/abc"},
		{"MSC4108 rendezvous", "/_synapse/client/rendezvous/0a1b2c3d", "/_synapse/client/rendezvous/REDACTED"},
		{"MSC4108 rendezvous, client path", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous/abc",
			"/_matrix/client/unstable/org.matrix.msc4108/rendezvous/REDACTED"},
		{"MSC4108 create", "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
			"/_matrix/client/unstable/org.matrix.msc4108/rendezvous"},
		{"MSC4388 rendezvous", "/_matrix/client/unstable/io.element.msc4388/rendezvous/abc",
			"/_matrix/client/unstable/io.element.msc4388/rendezvous/REDACTED"},
		{"MSC4140 delayed event", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc/cancel",
			"/_matrix/client/unstable/org.matrix.msc4140/delayed_events/REDACTED/cancel"},
		{"Synapse delay ID anywhere", "/x/syd_AbCdEfGhIjKlMnOpQrSt", "/x/REDACTED"},
		{"an access token in a path", "/_matrix/client/v3/rooms/" + tokSynapse + "/state", "/_matrix/client/v3/rooms/REDACTED/state"},
		{"a refresh token, last", "/foo/" + tokRefresh, "/foo/REDACTED"},
		{"a MAS token", "/" + tokMAS, "/REDACTED"},
		{"an escaped token", "/a/syt%5Fabc", "/a/REDACTED"},
		{"a macaroon", "/a/MDAxOGxvY2F0aW9uIGxvY2FsaG9zdAowMDEz", "/a/REDACTED"},
		{"a long random segment", "/a/Zx8Qk2Lm9Vb4Nc7Tr1Ws5Yh3Jd6Gf0Ep2Au", "/a/REDACTED"},
		{"a UUID", "/a/3f2b8c1e-4d5a-4e6f-9a7b-8c9d0e1f2a3b", "/a/REDACTED"},
		{"media IDs stay", "/_matrix/client/v1/media/download/localhost/ohPBkCXHYZdhRyabHcVFHjXq",
			"/_matrix/client/v1/media/download/localhost/ohPBkCXHYZdhRyabHcVFHjXq"},
		{"room and event IDs stay", "/_matrix/client/v3/rooms/%21OGEhHVWSdvArJzumhm%3Amatrix.org/event/%24Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg",
			"/_matrix/client/v3/rooms/%21OGEhHVWSdvArJzumhm%3Amatrix.org/event/%24Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"},
		{"v12 room IDs stay", "/_matrix/client/v3/rooms/%21Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg/messages",
			"/_matrix/client/v3/rooms/%21Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg/messages"},
		{"long unstable prefixes stay", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
			"/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"},
		{"long lowercase names stay", "/_synapse/admin/v1/rooms/x/forward_extremities_and_more_words",
			"/_synapse/admin/v1/rooms/x/forward_extremities_and_more_words"},
		{"user IDs stay", "/_synapse/admin/v2/users/%40alice%3Alocalhost/devices/ABCDEFGHIJ",
			"/_synapse/admin/v2/users/%40alice%3Alocalhost/devices/ABCDEFGHIJ"},
		{"OIDC callback path stays", "/_synapse/client/oidc/callback", "/_synapse/client/oidc/callback"},
		{"a bad escape is judged raw", "/a/syt_%zz", "/a/REDACTED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := logPath(tc.in); got != tc.want {
				t.Errorf("logPath(%q)\n got %q\nwant %q", tc.in, got, tc.want)
			}
		})
	}
}

// FuzzLogQuery checks that a secret never survives logQuery, wherever in a
// query it sits: as the value of a name that is not allowlisted, with a
// token's shape as the value of one that is, or as a name with no value.
func FuzzLogQuery(f *testing.F) {
	f.Add("timeout=1", "access_token", "abc", "since=2", false)
	f.Add("", "since", "x", "", false)
	f.Add("a=%zz", "token", "", "b", true)
	f.Add("x;y", "user_id", "@a:b", "limit=5&dir=b", false)
	f.Fuzz(func(t *testing.T, before, name, tail, after string, bare bool) {
		const marker = "S3CR3T"
		if strings.Contains(strings.ToUpper(before+name+after), marker) || strings.ContainsAny(name, "&;=") {
			t.Skip()
		}
		var pair string
		if bare {
			pair = url.QueryEscape(marker + tail)
		} else {
			secret := marker + tail
			if decoded, err := url.QueryUnescape(name); err == nil && loggedQuery[decoded] == logValue {
				secret = "syt_" + secret
			}
			pair = name + "=" + url.QueryEscape(secret)
		}
		raw := before + "&" + pair + "&" + after
		if got := logQuery(raw); strings.Contains(strings.ToUpper(got), marker) {
			t.Errorf("logQuery(%q) = %q: the secret survived", raw, got)
		}
	})
}

// FuzzLogPath checks that a secret never survives logPath: not in a segment
// secretSegments names, nor a token anywhere.
func FuzzLogPath(f *testing.F) {
	f.Add("v1", "abc", "", "/x", "syt_abc")
	f.Add("v3", "", "/cancel", "", "mat_x")
	f.Add("unstable", "%zz", "a", "/a//b/", "syr_")
	f.Fuzz(func(t *testing.T, version, secret, after, before, token string) {
		const marker = "S3CR3T"
		if strings.Contains(strings.ToUpper(version+after+before), marker) || version == "" ||
			strings.ContainsAny(version, "/%") || !hasTokenPrefix(token) {
			t.Skip()
		}
		for _, prefix := range []string{
			"/_synapse/admin/" + version + "/registration_tokens/",
			"/_matrix/client/" + version + "/org.matrix.msc4140/delayed_events/",
			"/_synapse/client/rendezvous/",
		} {
			p := prefix + url.PathEscape(marker+secret) + after
			if got := logPath(p); strings.Contains(strings.ToUpper(got), marker) {
				t.Errorf("logPath(%q) = %q: the secret survived", p, got)
			}
		}
		p := before + "/" + url.PathEscape(token+marker+secret) + "/" + after
		if got := logPath(p); strings.Contains(strings.ToUpper(got), marker) {
			t.Errorf("logPath(%q) = %q: the token survived", p, got)
		}
	})
}

func BenchmarkLogPath(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		logPath("/_matrix/client/v3/rooms/%21OGEhHVWSdvArJzumhm%3Amatrix.org/send/m.room.message/m1700000000000.3")
	}
}

func BenchmarkLogQuery(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		logQuery("filter=0&since=s72594_4483_1934&timeout=30000&access_token=" + tokSynapse)
	}
}

// TestSecretsNeverReachLogs makes, at debug level, each kind of call that
// carries a secret in its path or query, first with the homeserver up (the
// debug request line) and then with it gone (the upstream-error warning),
// and looks for every secret in every log entry.
func TestSecretsNeverReachLogs(t *testing.T) {
	h := newHarness(t)
	alice := h.hs.login("@alice:hs", "PHONE")
	const (
		regToken = "RegT0ken-Secret"
		code     = "OidcC0de-Secret"
		state    = "OidcSt4te-Secret"
		secret   = "Client-Secret-3pid"
		sid      = "Sid-Secret-3pid"
		sms      = "Sms-Token-Secret"
		delayID  = "syd_DelaySecretAbCdEfGh"
		session  = "Rendezvous-Secret"
	)
	calls := []struct{ method, path string }{
		{"GET", "/_synapse/admin/v1/registration_tokens/" + regToken},
		{"PUT", "/_synapse/admin/v1/registration_tokens/" + regToken},
		{"DELETE", "/_synapse/admin/v1/registration_tokens/" + regToken},
		{"GET", "/_matrix/client/v1/register/m.login.registration_token/validity?token=" + regToken},
		{"GET", "/_synapse/client/oidc/callback?code=" + code + "&state=" + state},
		{"GET", "/_synapse/client/password_reset/email/submit_token?token=" + sms + "&client_secret=" + secret + "&sid=" + sid},
		{"POST", "/_matrix/client/v3/register/msisdn/requestToken?client_secret=" + secret},
		{"POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/" + delayID + "/cancel"},
		{"PUT", "/_synapse/client/rendezvous/" + session},
		{"GET", whoamiV3 + "?access_token=" + alice},
		{"GET", "/_matrix/client/v3/sync?timeout=0&access_token=" + alice},
		{"GET", "/_matrix/client/v3/sync?timeout=0;access_token=" + alice},
		{"GET", "/_matrix/client/v3/sync?" + alice},
	}
	for _, c := range calls {
		h.do(c.method, c.path, nil, "")
	}
	h.hs.srv.Close()
	for _, c := range calls {
		h.do(c.method, c.path, nil, "")
	}

	if h.logs.FilterMessage("request").Len() < 2*len(calls) {
		t.Fatalf("%d debug request lines for %d calls: the test proves nothing", h.logs.FilterMessage("request").Len(), 2*len(calls))
	}
	if h.logs.FilterMessage("homeserver request failed").Len() == 0 {
		t.Fatal("no upstream-error warning: the test proves nothing")
	}
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{MessageKey: "msg"})
	for _, e := range h.logs.All() {
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		line := buf.String()
		for _, s := range []string{alice, regToken, code, state, secret, sid, sms, delayID, session} {
			for _, form := range []string{s, url.QueryEscape(s), url.PathEscape(s)} {
				if strings.Contains(line, form) {
					t.Errorf("%q reached the logs: %s", s, line)
					break
				}
			}
		}
	}
}
