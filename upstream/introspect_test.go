package upstream

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// The request is Synapse's (synapse/api/auth/mas.py): a form POST with the
// token and a hint, the shared secret as bearer token.
func TestIntrospectRequest(t *testing.T) {
	var got struct {
		method, auth, ctype string
		form                url.Values
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got.method, got.auth, got.ctype = r.Method, r.Header.Get("Authorization"), r.Header.Get("Content-Type")
		_ = r.ParseForm()
		got.form = r.PostForm
		_, _ = w.Write([]byte(`{"active":true,"exp":1700000300,"username":"alice"}`))
	}))
	t.Cleanup(srv.Close)
	tr := NewTransport(time.Second)
	t.Cleanup(tr.CloseIdleConnections)
	u, _ := url.Parse(srv.URL + "/oauth2/introspect")
	in, err := NewIntrospector(u, "s3cret", tr, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := in.Introspect(t.Context(), "mat_token")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Active || !res.Exp.Equal(time.Unix(1700000300, 0)) {
		t.Errorf("got %+v", res)
	}
	if got.method != "POST" || got.auth != "Bearer s3cret" || got.ctype != "application/x-www-form-urlencoded" ||
		got.form.Get("token") != "mat_token" || got.form.Get("token_type_hint") != "access_token" {
		t.Errorf("MAS received %+v", got)
	}
}

// MAS's trouble is an error, and no error carries the token, the secret or
// the URL.
func TestIntrospectErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		h    http.HandlerFunc
	}{
		{"401", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(401) }},
		{"500", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(500) }},
		{"not JSON", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte(`<html>`)) }},
		{"too large", func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte(`{"active":true,"x":"` + strings.Repeat("x", MaxReplyBody) + `"}`))
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(tt.h)
			t.Cleanup(srv.Close)
			tr := NewTransport(time.Second)
			t.Cleanup(tr.CloseIdleConnections)
			u, _ := url.Parse(srv.URL + "/oauth2/introspect?secret-ish=1")
			in, err := NewIntrospector(u, "s3cret", tr, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = in.Introspect(t.Context(), "mat_token")
			if err == nil {
				t.Fatal("no error")
			}
			for _, s := range []string{"s3cret", "mat_token", "secret-ish"} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error %q carries %q", err, s)
				}
			}
		})
	}
	// A MAS that is down.
	tr := NewTransport(time.Second)
	t.Cleanup(tr.CloseIdleConnections)
	u, _ := url.Parse("http://127.0.0.1:1/oauth2/introspect")
	in, _ := NewIntrospector(u, "s3cret", tr, nil)
	if _, err := in.Introspect(t.Context(), "mat_token"); err == nil || strings.Contains(err.Error(), "127.0.0.1:1/oauth2") {
		t.Errorf("down: %v", err)
	}
}

func TestNewIntrospectorChecks(t *testing.T) {
	tr := NewTransport(time.Second)
	t.Cleanup(tr.CloseIdleConnections)
	good, _ := url.Parse("http://mas:8080/oauth2/introspect")
	bad, _ := url.Parse("mas:8080")
	for _, tt := range []struct {
		u      *url.URL
		secret string
		rt     http.RoundTripper
	}{{nil, "s", tr}, {bad, "s", tr}, {good, "", tr}, {good, "s", nil}} {
		if _, err := NewIntrospector(tt.u, tt.secret, tt.rt, nil); err == nil {
			t.Errorf("%v %q %v: accepted", tt.u, tt.secret, tt.rt)
		}
	}
}

func TestParseIntrospection(t *testing.T) {
	sent := time.Unix(1_700_000_000, 0)
	tests := []struct {
		body   string
		ok     bool
		active bool
		exp    time.Time
	}{
		{`{"active":true,"exp":1700000300}`, true, true, time.Unix(1700000300, 0)},
		{`{"active":true,"expires_in":60}`, true, true, sent.Add(time.Minute)},
		{`{"active":true,"exp":1700000300,"expires_in":60}`, true, true, time.Unix(1700000300, 0)},
		{`{"active":true}`, true, true, time.Time{}},
		{`{"active":true,"exp":null}`, true, true, time.Time{}},
		{`{"active":false}`, true, false, time.Time{}},
		{`{"active":false,"exp":"x"}`, true, false, time.Time{}},
		{`{"active":true,"exp":"1700000300"}`, false, false, time.Time{}},
		{`{"active":true,"exp":1.5}`, false, false, time.Time{}},
		{`{"active":true,"exp":-1}`, false, false, time.Time{}},
		{`{"active":true,"expires_in":-1}`, false, false, time.Time{}},
		{`{"active":"true"}`, false, false, time.Time{}},
		{`{"Active":true}`, false, false, time.Time{}},
		{`{"active":null}`, false, false, time.Time{}},
		{`[]`, false, false, time.Time{}},
		{``, false, false, time.Time{}},
	}
	for _, tt := range tests {
		got, err := ParseIntrospection([]byte(tt.body), sent)
		if (err == nil) != tt.ok || got.Active != tt.active || !got.Exp.Equal(tt.exp) {
			t.Errorf("%s: got %+v, %v", tt.body, got, err)
		}
	}
}

func FuzzParseIntrospection(f *testing.F) {
	for _, s := range []string{`{"active":true,"exp":1700000300}`, `{"active":true,"expires_in":60}`, `{"active":false}`, `{"active":1}`} {
		f.Add([]byte(s))
	}
	sent := time.Unix(1_700_000_000, 0)
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := ParseIntrospection(body, sent)
		if err != nil && (got.Active || !got.Exp.IsZero()) {
			t.Fatalf("an error with an answer: %+v", got)
		}
		if !got.Active && !got.Exp.IsZero() {
			t.Fatalf("an expiry for an inactive token: %+v", got)
		}
		if !got.Exp.IsZero() && got.Exp.Before(time.Unix(0, 0)) {
			t.Fatalf("expiry before the epoch: %v", got.Exp)
		}
	})
}
