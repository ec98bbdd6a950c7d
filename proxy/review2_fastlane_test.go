package proxy

import (
	"bufio"
	"io"
	"sync"

	"fmt"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"net"
	"net/http"
	"testing"
	"time"

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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted sync.WaitGroup
	closed := make(chan struct{}, 2)
	conns := make(chan net.Conn, 2)
	accepted.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
			accepted.Go(func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if line == "\r\n" {
						break
					}
				}
				// Of unknown length, so that the proxy passes "first" on at once.
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
				_, _ = io.Copy(io.Discard, br) // until the proxy hangs up
				closed <- struct{}{}
			})
		}
	})
	defer accepted.Wait()
	defer ln.Close()

	tr := upstream.NewTransport(time.Second)
	defer tr.CloseIdleConnections()
	p, err := New(Config{Upstream: mustParseURL(t, "http://"+ln.Addr().String()), Transport: tr, Registerer: prometheus.NewRegistry(), Cache: testCacheConfig})
	if err != nil {
		t.Fatal(err)
	}
	if p.direct == nil {
		t.Fatal("the proxy would never forward")
	}
	fln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fs := fastlane.New(&http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute})
	served := make(chan struct{})
	go func() { defer close(served); _ = fs.Serve(fln) }()
	defer func() { _ = fs.Close(); <-served }()
	for range 2 {
		c, err := net.Dial("tcp", fln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, "GET /_matrix/media/v3/download/hs/big HTTP/1.1\r\nHost: hs\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "first" {
			t.Fatalf("%q %v", buf, err)
		}
		c.Close()
		select {
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("the homeserver connection stayed open after the client left")
		}
	}
	if n := len(conns); n != 2 {
		t.Errorf("%d homeserver connections for two requests: one was reused after its client left", n)
	}
	close(conns)
	for c := range conns {
		c.Close()
	}
}

// A client that leaves while forward waits on the homeserver (a long-poll
// /sync that has not answered yet, or a body that stalls) behind the fast
// lane: the homeserver connection is closed and the handler returns.
func TestReview2FastLaneClientGoneWhileWaiting(t *testing.T) {
	for _, answer := range []string{"", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"} {
		t.Run(fmt.Sprintf("%q", answer), func(t *testing.T) {
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var accepted sync.WaitGroup
			closed := make(chan struct{}, 2)
			accepted.Go(func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					accepted.Go(func() {
						defer c.Close()
						br := bufio.NewReader(c)
						for {
							line, err := br.ReadString('\n')
							if err != nil {
								return
							}
							if line == "\r\n" {
								break
							}
						}
						_, _ = io.WriteString(c, answer)
						_, _ = io.Copy(io.Discard, br)
						closed <- struct{}{}
					})
				}
			})
			defer accepted.Wait()
			defer ln.Close()
			tr := upstream.NewTransport(time.Second)
			defer tr.CloseIdleConnections()
			reg := prometheus.NewRegistry()
			p, err := New(Config{Upstream: mustParseURL(t, "http://"+ln.Addr().String()), Transport: tr, Registerer: reg, Cache: testCacheConfig})
			if err != nil {
				t.Fatal(err)
			}
			fln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			fs := fastlane.New(&http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute})
			served := make(chan struct{})
			go func() { defer close(served); _ = fs.Serve(fln) }()
			defer func() { _ = fs.Close(); <-served }()
			c, err := net.Dial("tcp", fln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.WriteString(c, "GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\nHost: hs\r\n\r\n")
			time.Sleep(100 * time.Millisecond)
			c.Close()
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				t.Fatal("the homeserver connection stayed open after the client left")
			}
		})
	}
}
