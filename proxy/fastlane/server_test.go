package fastlane

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// start serves h on a fast-lane server on 127.0.0.1.
func start(t *testing.T, srv *http.Server) (*Server, string, chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(srv)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() { _ = s.Close() })
	return s, ln.Addr().String(), done
}

func echo() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Method", r.Method)
		_, _ = io.WriteString(w, r.Method+" "+r.RequestURI+" "+string(b))
	})
}

func dial(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

func readBody(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

// TestHandOff: on one connection, requests the fast lane serves and then
// one it does not; the rest of the connection is net/http's, and every
// answer is right.
func TestHandOff(t *testing.T) {
	s, addr, _ := start(t, &http.Server{Handler: echo()})
	c, br := dial(t, addr)
	long := strings.Repeat("x", 5000)
	reqs := "GET /a HTTP/1.1\r\nHost: h\r\n\r\n" +
		"HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n" +
		"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody" +
		"GET /d HTTP/1.1\r\nHost: h\r\nX-Long: " + long + "\r\n\r\n" +
		"GET /e HTTP/1.1\r\nHost: h\r\n\r\n"
	if _, err := io.WriteString(c, reqs); err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct{ method, body string }{
		{"GET", "GET /a "}, {"HEAD", ""}, {"POST", "POST /c body"}, {"GET", "GET /d "}, {"GET", "GET /e "},
	} {
		resp, body := readBody(t, br, want.method)
		if resp.StatusCode != 200 || body != want.body || resp.Header.Get("X-Method") != want.method {
			t.Errorf("%s: got %d %q %q, want %q", want.method, resp.StatusCode, resp.Header.Get("X-Method"), body, want.body)
		}
	}
	if s.served.Load() != 2 || s.handed.Load() != 1 {
		t.Errorf("served %d on the fast lane, handed %d connections; want 2 and 1", s.served.Load(), s.handed.Load())
	}

	// A head over the fast lane's buffer, an upgrade and HTTP/1.0 go
	// to net/http from the start.
	for _, raw := range []string{
		"GET /f HTTP/1.1\r\nHost: h\r\nX-Long: " + long + "\r\n\r\n",
		"GET /g HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
		"GET /h HTTP/1.0\r\nHost: h\r\n\r\n",
	} {
		before := s.handed.Load()
		c, br := dial(t, addr)
		_, _ = io.WriteString(c, raw)
		resp, body := readBody(t, br, "GET")
		if resp.StatusCode != 200 || !strings.HasPrefix(body, "GET /") || s.handed.Load() != before+1 {
			t.Errorf("%.30q: %d %q, handed %d", raw, resp.StatusCode, body, s.handed.Load()-before)
		}
	}
}

// TestSlowHeadOneTimeout: a head that trickles in is cut at
// ReadHeaderTimeout, also when it outgrows the fast lane's buffer and goes
// to net/http half-way (which would otherwise start a timeout of its own).
func TestSlowHeadOneTimeout(t *testing.T) {
	const rht = time.Second
	_, addr, _ := start(t, &http.Server{Handler: echo(), ReadHeaderTimeout: rht, ErrorLog: log.New(io.Discard, "", 0)})
	// The second head fills the fast lane's buffer after about 600 ms.
	long := "GET /slow HTTP/1.1\r\nHost: h\r\nX-Long: "
	long += strings.Repeat("x", headBuffer-60-len(long))
	for _, prefix := range []string{"GET /slow HTTP/1.1\r\nHost: h\r\n", long} {
		c, _ := dial(t, addr)
		begin := time.Now()
		_, _ = io.WriteString(c, prefix)
		closed := make(chan time.Duration, 1)
		go func() {
			_, _ = io.Copy(io.Discard, c)
			closed <- time.Since(begin)
		}()
		tick := time.NewTicker(rht / 10)
	trickle:
		for {
			select {
			case d := <-closed:
				if d > rht*135/100 {
					t.Errorf("head of %d bytes: closed after %v, want about %v", len(prefix), d, rht)
				}
				break trickle
			case <-tick.C:
				_, _ = io.WriteString(c, "XXXXXXXXXX")
			case <-time.After(5 * rht):
				t.Fatalf("head of %d bytes: still open after %v", len(prefix), 5*rht)
			}
		}
		tick.Stop()
	}
}

// TestClientGoneCancels: a client that hangs up during a long request
// (a /sync long-poll) cancels its context.
func TestClientGoneCancels(t *testing.T) {
	cancelled := make(chan error, 1)
	_, addr, _ := start(t, &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			cancelled <- r.Context().Err()
		case <-time.After(10 * time.Second):
			cancelled <- nil
		}
	})})
	c, _ := dial(t, addr)
	_, _ = io.WriteString(c, "GET /sync HTTP/1.1\r\nHost: h\r\n\r\n")
	time.Sleep(2 * DisconnectDelay)
	c.Close()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("handler's context: %v, want canceled", err)
	}
}

// TestPipelinedDuringLongRequest: the next request, arriving while the
// background read watches a long one, is served after it.
func TestPipelinedDuringLongRequest(t *testing.T) {
	s, addr, _ := start(t, &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/long" {
			time.Sleep(4 * DisconnectDelay)
		}
		_, _ = io.WriteString(w, r.URL.Path)
	})})
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /long HTTP/1.1\r\nHost: h\r\n\r\n")
	time.Sleep(2 * DisconnectDelay)
	_, _ = io.WriteString(c, "GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
	for _, want := range []string{"/long", "/next"} {
		if _, body := readBody(t, br, "GET"); body != want {
			t.Errorf("got %q, want %q", body, want)
		}
	}
	if s.served.Load() != 2 {
		t.Errorf("served %d on the fast lane, want 2", s.served.Load())
	}
}

// TestShutdown: idle connections are closed at once, a request under way
// finishes (its answer says Connection: close), then Serve and Shutdown
// return.
func TestShutdown(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{})
	s, addr, served := start(t, &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/wait" {
			close(entered)
			<-release
		}
		_, _ = io.WriteString(w, "ok")
	})})
	idle, idleBR := dial(t, addr)
	_, _ = io.WriteString(idle, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
	readBody(t, idleBR, "GET")
	busy, busyBR := dial(t, addr)
	_, _ = io.WriteString(busy, "GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
	<-entered

	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	if _, err := idleBR.ReadByte(); err != io.EOF {
		t.Errorf("idle connection: %v, want EOF", err)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a request under way", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	resp, body := readBody(t, busyBR, "GET")
	if body != "ok" || !resp.Close {
		t.Errorf("request under way: %q, close %v; want ok and Connection: close", body, resp.Close)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve: %v, want ErrServerClosed", err)
	}
}

// TestPanic: a handler's panic is logged (ErrAbortHandler is not), its
// connection closed, and the server goes on.
func TestPanic(t *testing.T) {
	var logged bytes.Buffer
	var mu sync.Mutex
	_, addr, _ := start(t, &http.Server{ErrorLog: log.New(lockedWriter{&mu, &logged}, "", 0),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/panic":
				panic("boom")
			case "/abort":
				panic(http.ErrAbortHandler)
			}
			_, _ = io.WriteString(w, "ok")
		})})
	for _, path := range []string{"/panic", "/abort"} {
		c, br := dial(t, addr)
		_, _ = io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: h\r\n\r\n")
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("%s: %v, want the connection closed", path, err)
		}
	}
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, body := readBody(t, br, "GET"); body != "ok" {
		t.Errorf("after panics: %q", body)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(logged.String(), "http: panic serving"); n != 1 || !strings.Contains(logged.String(), "boom") {
		t.Errorf("log has %d panics: %q", n, logged.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestIdleTimeout: a kept-alive connection idle for IdleTimeout is closed.
func TestIdleTimeout(t *testing.T) {
	_, addr, _ := start(t, &http.Server{Handler: echo(), IdleTimeout: 200 * time.Millisecond})
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
	readBody(t, br, "GET")
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("idle connection: %v, want EOF", err)
	}
}

// TestBypass: a server with settings the fast lane does not honour is
// net/http's alone.
func TestBypass(t *testing.T) {
	s, addr, _ := start(t, &http.Server{Handler: echo(), WriteTimeout: time.Minute})
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, body := readBody(t, br, "GET"); body != "GET /x " || s.served.Load() != 0 {
		t.Errorf("got %q, %d served on the fast lane", body, s.served.Load())
	}
}
