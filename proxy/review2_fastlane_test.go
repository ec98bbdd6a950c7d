package proxy

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/proxy/fastlane"
)

// The proxy as deployed serves its client listener with the fast lane
// (cmd/matrix-auth-proxy wires fastlane.New(clientSrv)), so a request that
// takes forward meets the fast lane's ResponseWriter, not net/http's. The
// client must see what p.rp behind net/http would give it.
func TestReview2FastLaneForwardSameAsReverseProxy(t *testing.T) {
	fp := newForwardPair(t, "")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: fp.fwd, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		DisableGeneralOptionsHandler: true}
	fs := fastlane.New(srv)
	go func() { _ = fs.Serve(ln) }()
	t.Cleanup(func() { _ = fs.Close() })
	fp.fURL = ln.Addr().String()
	for i, req := range forwardRequests {
		for j, ans := range forwardAnswers {
			t.Run(fmt.Sprintf("req%d/ans%d", i, j), func(t *testing.T) { fp.compare(t, req, ans) })
		}
	}
}

// forward's client-gone path behind the fast lane, as deployed: the
// homeserver connection is closed, not pooled, and nothing leaks.
func TestReview2FastLaneClientGoneMidBody(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	hs := startStallingHomeserver(t, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
	defer hs.stop()
	front, stop := fastLaneFront(t, hs.proxy(t))
	defer stop()
	hs.clientGoneMidBody(t, front)
}

// fastLaneFront serves h with the fast lane, as cmd does.
func fastLaneFront(t *testing.T, h http.Handler) (addr string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fs := fastlane.New(&http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute})
	served := make(chan struct{})
	go func() { defer close(served); _ = fs.Serve(ln) }()
	return ln.Addr().String(), func() { _ = fs.Close(); <-served }
}

// A client that leaves while forward waits on the homeserver (a long-poll
// /sync that has not answered yet, or a body that stalls) behind the fast
// lane: the homeserver connection is closed and the handler returns.
func TestReview2FastLaneClientGoneWhileWaiting(t *testing.T) {
	for _, answer := range []string{"", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"} {
		t.Run(fmt.Sprintf("%q", answer), func(t *testing.T) {
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
			hs := startStallingHomeserver(t, answer)
			defer hs.stop()
			front, stop := fastLaneFront(t, hs.proxy(t))
			defer stop()
			c, err := net.Dial("tcp", front)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.WriteString(c, "GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\nHost: hs\r\n\r\n")
			time.Sleep(100 * time.Millisecond)
			c.Close()
			hs.waitClosed(t)
		})
	}
}
