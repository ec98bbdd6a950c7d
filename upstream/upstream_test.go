package upstream

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newClient(t *testing.T, h http.HandlerFunc) (*Client, *httptest.Server) {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	tr := NewTransport(time.Second)
	t.Cleanup(tr.CloseIdleConnections)
	u, _ := url.Parse(srv.URL + "/prefix/")
	c, err := New(u, tr)
	if err != nil {
		t.Fatal(err)
	}
	return c, srv
}

func TestWhoamiRequest(t *testing.T) {
	var got *http.Request
	c, _ := newClient(t, func(w http.ResponseWriter, r *http.Request) {
		got = r
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"user_id":"@a:hs"}`))
	})
	reply, err := c.Whoami(t.Context(), WhoamiRequest{
		Token:   "syt_tok",
		Query:   url.Values{"user_id": {"@b:hs"}},
		Forward: http.Header{"X-Forwarded-For": {"192.0.2.7"}, "User-Agent": {"Element"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if reply.Status != 200 || string(reply.Body) != `{"user_id":"@a:hs"}` {
		t.Errorf("reply: %d %q", reply.Status, reply.Body)
	}
	if got.Method != "GET" || got.URL.Path != "/prefix/_matrix/client/v3/account/whoami" || got.URL.RawQuery != "user_id=%40b%3Ahs" {
		t.Errorf("request: %s %s", got.Method, got.URL)
	}
	if got.Header.Get("Authorization") != "Bearer syt_tok" || got.Header.Get("X-Forwarded-For") != "192.0.2.7" || got.Header.Get("User-Agent") != "Element" {
		t.Errorf("headers: %v", got.Header)
	}
}

func TestReplyTooLarge(t *testing.T) {
	c, _ := newClient(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(strings.Repeat("x", MaxReplyBody+1)))
	})
	if _, err := c.Whoami(t.Context(), WhoamiRequest{Token: "t"}); !errors.Is(err, ErrReplyTooLarge) {
		t.Errorf("got %v", err)
	}
}

func TestErrorKinds(t *testing.T) {
	// A port nothing listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	tr := NewTransport(time.Second)
	defer tr.CloseIdleConnections()
	u, _ := url.Parse("http://" + addr)
	refused, _ := New(u, tr)
	_, err = refused.Whoami(t.Context(), WhoamiRequest{Token: "t"})
	if k := ErrorKind(err); k != KindRefused {
		t.Errorf("refused: kind %q (%v)", k, err)
	}
	if strings.Contains(err.Error(), addr+"/_matrix") {
		t.Errorf("the error carries the URL: %v", err)
	}

	release := make(chan struct{})
	slow, srv := newClient(t, func(w http.ResponseWriter, r *http.Request) { <-release })
	defer srv.CloseClientConnections()
	defer close(release)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	_, err = slow.Whoami(ctx, WhoamiRequest{Token: "t"})
	if k := ErrorKind(err); k != KindTimeout {
		t.Errorf("timeout: kind %q (%v)", k, err)
	}
	ctx, cancel = context.WithCancel(t.Context())
	cancel()
	_, err = slow.Whoami(ctx, WhoamiRequest{Token: "t"})
	if k := ErrorKind(err); k != KindCanceled {
		t.Errorf("canceled: kind %q (%v)", k, err)
	}
	if k := ErrorKind(errors.New("boom")); k != KindOther {
		t.Errorf("other: %q", k)
	}
}

func TestNewRejectsBadInput(t *testing.T) {
	tr := NewTransport(time.Second)
	for _, raw := range []string{"ftp://x", "http://", "127.0.0.1:8008"} {
		u, _ := url.Parse(raw)
		if _, err := New(u, tr); err == nil {
			t.Errorf("%q accepted", raw)
		}
	}
	u, _ := url.Parse("http://127.0.0.1:8008")
	if _, err := New(u, nil); err == nil {
		t.Error("nil RoundTripper accepted")
	}
}

func TestProbe(t *testing.T) {
	var status atomic.Int32
	status.Store(200)
	c, _ := newClient(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/prefix/_matrix/client/versions" {
			t.Errorf("probe asked for %s", r.URL.Path)
		}
		w.WriteHeader(int(status.Load()))
	})
	now := time.Unix(1_700_000_000, 0)
	p := NewProbe(c, 5*time.Second, time.Second)
	p.now = func() time.Time { return now }
	if p.Ready() {
		t.Error("ready before any probe")
	}
	p.Check(t.Context())
	if !p.Ready() {
		t.Error("not ready after a good probe")
	}
	now = now.Add(11*time.Second + 1) // 2 intervals + timeout passed without a probe
	if p.Ready() {
		t.Error("still ready on a stale probe")
	}
	p.Check(t.Context())
	status.Store(502)
	p.Check(t.Context())
	if p.Ready() {
		t.Error("ready after a failed probe")
	}
	status.Store(200)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	deadline := time.Now().Add(2 * time.Second)
	for !p.Ready() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if !p.Ready() {
		t.Error("Run did not probe")
	}
	cancel()
	<-done
}

func TestAdminStatusRequest(t *testing.T) {
	for _, tc := range []struct{ user, wantRaw string }{
		{"@a:hs", "/prefix/_synapse/admin/v1/users/@a:hs/admin"},
		// A historical user ID with a slash stays one path segment.
		{"@a/b:hs", "/prefix/_synapse/admin/v1/users/@a%2Fb:hs/admin"},
	} {
		var gotURI string
		var got http.Header
		c, _ := newClient(t, func(w http.ResponseWriter, r *http.Request) {
			gotURI, got = r.RequestURI, r.Header
			_, _ = w.Write([]byte(`{"admin":true}`))
		})
		reply, err := c.AdminStatus(t.Context(), "syt_tok", tc.user, http.Header{"X-Forwarded-For": {"192.0.2.7"}})
		if err != nil {
			t.Fatal(err)
		}
		if reply.Status != 200 || string(reply.Body) != `{"admin":true}` {
			t.Errorf("reply: %d %q", reply.Status, reply.Body)
		}
		if gotURI != tc.wantRaw || got.Get("Authorization") != "Bearer syt_tok" || got.Get("X-Forwarded-For") != "192.0.2.7" {
			t.Errorf("request: %s %v", gotURI, got)
		}
	}
}
