package fastlane

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// Review tests: each fails on the code as reviewed (eb2c734).

// TestReviewHeldHeaderMapAfterWriteHeader: a handler that keeps the map
// Header returned and changes it after WriteHeader. net/http sends the
// header as of WriteHeader (it clones at WriteHeader once Header was
// called); the fast lane clones only when Header is called again, so the
// late changes reach the wire.
func TestReviewHeldHeaderMapAfterWriteHeader(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hdr := w.Header()
		hdr.Set("X-Early", "1")
		w.WriteHeader(http.StatusOK)
		hdr.Set("X-Late", "2")
		hdr.Set("Content-Length", "1")
		_, _ = io.WriteString(w, "x")
	})
	for _, head := range requestHeads {
		plain, fast := pair(t, h)
		want, got := exchange(t, plain, head), exchange(t, fast, head)
		if got != want {
			t.Errorf("%q: fast lane sent\n%q\nnet/http\n%q", head, got, want)
		}
	}
}

// TestReviewReadFromMatchesNetHTTP: io.Copy into the ResponseWriter from a
// reader without WriteTo. net/http's response is an io.ReaderFrom that
// sends the header after the first 512 bytes (sniffLen), so a 1000-byte
// body goes out chunked; the fast lane has no ReadFrom, buffers 2 KiB and
// sends a Content-Length.
func TestReviewReadFromMatchesNetHTTP(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		src := io.LimitReader(strings.NewReader(strings.Repeat("a", 1000)), 1000)
		_, _ = io.Copy(w, src)
	})
	plain, fast := pair(t, h)
	head := requestHeads[0]
	want, got := exchange(t, plain, head), exchange(t, fast, head)
	if got != want {
		t.Errorf("fast lane sent\n%.300q\nnet/http\n%.300q", got, want)
	}
}

// TestReviewHandedConnCloseWrite: net/http answers some requests and then
// half-closes (CloseWrite) and lingers before closing, so that the client
// reads the answer and not a reset (431 here; also a request body left
// unread, MaxBytesReader's limit). It finds CloseWrite by a type assertion
// on its net.Conn; handedConn embeds net.Conn and hides it, so on a handed
// connection the client gets no FIN, then a reset.
func TestReviewHandedConnCloseWrite(t *testing.T) {
	quiet := log.New(io.Discard, "", 0)
	head := "GET /big HTTP/1.1\r\nHost: h\r\nX-Big: " + strings.Repeat("b", 6000) + "\r\n\r\n"
	try := func(addr string) error {
		c, br := dial(t, addr)
		_, _ = io.WriteString(c, head)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			return errors.New(resp.Status)
		}
		// The 431 has no Content-Length: its body ends at the FIN.
		_ = c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		_, err = io.ReadAll(resp.Body)
		return err
	}
	mk := func() *http.Server {
		return &http.Server{Handler: echo(), ErrorLog: quiet, MaxHeaderBytes: 1}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	plain := mk()
	go func() { _ = plain.Serve(ln) }()
	t.Cleanup(func() { _ = plain.Close() })
	if err := try(ln.Addr().String()); err != nil {
		t.Fatalf("net/http: %v (reference broken)", err)
	}
	_, addr, _ := start(t, mk())
	if err := try(addr); err != nil {
		t.Errorf("fast lane, handed to net/http: reading the 431 to its end: %v; net/http half-closes at once (EOF)", err)
	}
}

// TestReviewPipelinedClientGoneCancels: a client that pipelines a second
// request behind a long-poll and hangs up. net/http's background read
// reads the socket, not its buffer, so it sees the hang-up and cancels
// the long-poll; the fast lane never watches a request with bytes
// buffered behind it.
func TestReviewPipelinedClientGoneCancels(t *testing.T) {
	check := func(t *testing.T, addr string, cancelled chan error) error {
		c, _ := dial(t, addr)
		_, _ = io.WriteString(c, "GET /sync HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n")
		time.Sleep(4 * DisconnectDelay)
		c.Close()
		return <-cancelled
	}
	mk := func() (*http.Server, chan error) {
		cancelled := make(chan error, 2)
		return &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/sync" {
				return
			}
			select {
			case <-r.Context().Done():
				cancelled <- r.Context().Err()
			case <-time.After(3 * time.Second):
				cancelled <- nil
			}
		})}, cancelled
	}
	srv, cancelled := mk()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	if err := check(t, ln.Addr().String(), cancelled); !errors.Is(err, context.Canceled) {
		t.Fatalf("net/http: %v (reference broken)", err)
	}
	srv, cancelled = mk()
	_, addr, _ := start(t, srv)
	if err := check(t, addr, cancelled); !errors.Is(err, context.Canceled) {
		t.Errorf("fast lane: long-poll's context %v after the client went; net/http cancels it", err)
	}
}

// TestReviewCloseCancelsRequests: Close closes every connection; with
// net/http that cancels the context of every request under way (its
// background read fails). The fast lane's watcher stops at Close, so a
// request younger than DisconnectDelay never learns.
func TestReviewCloseCancelsRequests(t *testing.T) {
	entered := make(chan struct{}, 1)
	cancelled := make(chan error, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		select {
		case <-r.Context().Done():
			cancelled <- r.Context().Err()
		case <-time.After(3 * time.Second):
			cancelled <- nil
		}
	})}
	s, addr, _ := start(t, srv)
	c, _ := dial(t, addr)
	_, _ = io.WriteString(c, "GET /sync HTTP/1.1\r\nHost: h\r\n\r\n")
	<-entered
	_ = s.Close()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("request under way at Close: context %v, want canceled (as net/http)", err)
	}
}

// TestReviewSuperfluousWriteHeaderLog: net/http's ErrorLog line names the
// caller ("... call from pkg.Func (file.go:line)"), which is how one finds
// the handler at fault; the fast lane's does not.
func TestReviewSuperfluousWriteHeaderLog(t *testing.T) {
	var mu sync.Mutex
	var logged bytes.Buffer
	srv := &http.Server{ErrorLog: log.New(lockedWriter{&mu, &logged}, "", 0),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(200)
			w.WriteHeader(500)
		})}
	_, addr, _ := start(t, srv)
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
	readBody(t, br, "GET")
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(logged.String(), "superfluous response.WriteHeader call from ") {
		t.Errorf("log %q; net/http names the caller", logged.String())
	}
}

// TestReviewShutdownSlowSecondHead: on a kept-alive connection the first
// bytes of the next head have arrived, the rest trickles. net/http keeps
// such a connection StateIdle until the head is read, so Shutdown closes
// it at once; the fast lane marks it active at its first byte, and
// Shutdown waits for ReadHeaderTimeout (a slow client delays every
// deploy by up to ReadHeaderTimeout, 10 s in cmd).
func TestReviewShutdownSlowSecondHead(t *testing.T) {
	const rht = 3 * time.Second
	quiet := log.New(io.Discard, "", 0)
	run := func(t *testing.T, addr string, shutdown func(context.Context) error) time.Duration {
		c, br := dial(t, addr)
		_, _ = io.WriteString(c, "GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
		readBody(t, br, "GET")
		_, _ = io.WriteString(c, "GET /b HTTP/1.1\r\n")
		time.Sleep(100 * time.Millisecond)
		begin := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 2*rht)
		defer cancel()
		_ = shutdown(ctx)
		return time.Since(begin)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	plain := &http.Server{Handler: echo(), ErrorLog: quiet, ReadHeaderTimeout: rht}
	go func() { _ = plain.Serve(ln) }()
	t.Cleanup(func() { _ = plain.Close() })
	if d := run(t, ln.Addr().String(), plain.Shutdown); d > rht/3 {
		t.Fatalf("net/http: Shutdown took %v (reference broken)", d)
	}
	s, addr, _ := start(t, &http.Server{Handler: echo(), ErrorLog: quiet, ReadHeaderTimeout: rht})
	if d := run(t, addr, s.Shutdown); d > rht/3 {
		t.Errorf("fast lane: Shutdown took %v with a slow second head; net/http closes that connection at once", d)
	}
}

// TestReviewTLSListener: Serve on a TLS listener (tls.NewListener, the
// http.Server's TLSConfig unset) is the usual way to serve TLS with Serve.
// net/http sees the *tls.Conn and sets Request.TLS (which ReverseProxy's
// SetXForwarded turns into X-Forwarded-Proto: https, and handlers use for
// the scheme); the fast lane serves such a connection as plain HTTP:
// Request.TLS is nil.
func TestReviewTLSListener(t *testing.T) {
	ts := httptest.NewUnstartedServer(http.NotFoundHandler())
	ts.StartTLS()
	defer ts.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tln := tls.NewListener(ln, &tls.Config{Certificates: ts.TLS.Certificates})
	s := New(&http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, fmt.Sprint(r.TLS != nil))
	}), ErrorLog: log.New(io.Discard, "", 0)})
	go func() { _ = s.Serve(tln) }()
	defer s.Close()
	resp, err := ts.Client().Get("https://" + ln.Addr().String() + "/x")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "true" {
		t.Errorf("Request.TLS set: %s; net/http sets it for a TLS connection", b)
	}
}

// TestReviewCloseNotifier: net/http's ResponseWriter is an
// http.CloseNotifier (deprecated, still asserted by older middleware, and
// by ReverseProxy when the request's context has no Done channel); the
// fast lane's is not, so w.(http.CloseNotifier) panics there.
func TestReviewCloseNotifier(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, ok := w.(http.CloseNotifier)
		_, _ = io.WriteString(w, fmt.Sprint(ok))
	})
	plain, fast := pair(t, h)
	head := requestHeads[0]
	if want, got := exchange(t, plain, head), exchange(t, fast, head); got != want {
		t.Errorf("fast lane sent\n%q\nnet/http\n%q", got, want)
	}
}

// nilAddrListener's connections have no remote address, as net.Conn allows
// (an accepted socket whose peer reset before accept returned, on some
// systems; listeners of other transports).
type nilAddrListener struct{ net.Listener }

type nilAddrConn struct{ net.Conn }

func (nilAddrConn) RemoteAddr() net.Addr { return nil }

func (l nilAddrListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return nilAddrConn{c}, nil
}

// TestReviewNilRemoteAddr: net/http checks RemoteAddr for nil (Request's
// RemoteAddr is then empty); the fast lane calls String on it, and the
// panic in a connection's goroutine ends the process. Run in a child
// process, so the crash fails this test only.
func TestReviewNilRemoteAddr(t *testing.T) {
	if os.Getenv("FASTLANE_REVIEW_CHILD") == "1" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := New(&http.Server{Handler: echo(), ErrorLog: log.New(io.Discard, "", 0)})
		go func() { _ = s.Serve(nilAddrListener{ln}) }()
		c, br := dial(t, ln.Addr().String())
		_, _ = io.WriteString(c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
		if _, body := readBody(t, br, "GET"); body != "GET /x " {
			t.Fatalf("got %q", body)
		}
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestReviewNilRemoteAddr$", "-test.count=1")
	cmd.Env = append(os.Environ(), "FASTLANE_REVIEW_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		lines := strings.Split(string(out), "\n")
		t.Errorf("a connection without a remote address: %v\n%s", err, strings.Join(lines[:min(len(lines), 12)], "\n"))
	}
}

// TestReviewBareLFHead: a head whose lines end in a bare LF (netcat
// scripts, some probes and embedded clients). net/http answers it; the
// fast lane waits for a CRLF CRLF that never comes, and at
// ReadHeaderTimeout closes the connection without an answer (with no
// ReadHeaderTimeout, it waits for ever).
func TestReviewBareLFHead(t *testing.T) {
	quiet := log.New(io.Discard, "", 0)
	try := func(addr string) (string, error) {
		c, br := dial(t, addr)
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		_, _ = io.WriteString(c, "GET /lf HTTP/1.1\nHost: h\n\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return "", err
		}
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	plain := &http.Server{Handler: echo(), ErrorLog: quiet, ReadHeaderTimeout: time.Second}
	go func() { _ = plain.Serve(ln) }()
	t.Cleanup(func() { _ = plain.Close() })
	want, err := try(ln.Addr().String())
	if err != nil || want != "GET /lf " {
		t.Fatalf("net/http: %q, %v (reference broken)", want, err)
	}
	_, addr, _ := start(t, &http.Server{Handler: echo(), ErrorLog: quiet, ReadHeaderTimeout: time.Second})
	if got, err := try(addr); got != want {
		t.Errorf("fast lane: %q, %v; net/http answers %q", got, err, want)
	}
}

// TestReviewProtocolsWithoutHTTP1: an http.Server whose Protocols leave
// HTTP/1 out (h2c with prior knowledge only) serves no HTTP/1 request;
// the fast lane serves HTTP/1 GETs regardless.
func TestReviewProtocolsWithoutHTTP1(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	s, addr, _ := start(t, &http.Server{Handler: echo(), Protocols: &p, ErrorLog: log.New(io.Discard, "", 0)})
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err == nil {
		resp.Body.Close()
		t.Errorf("HTTP/1 request answered %s (%d served on the fast lane); net/http serves none without HTTP1 in Protocols", resp.Status, s.served.Load())
	}
}
