package upstream

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countingServer is an httptest.Server that counts the connections it
// accepted.
func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &conns
}

func newTransport(t *testing.T) *Transport {
	t.Helper()
	tr := NewTransport(time.Second)
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

// get sends a GET through tr and returns the status and body.
func get(t *testing.T, tr http.RoundTripper, url string, hdr http.Header) (int, string, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func TestTransportKeepsConnectionsAlive(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			w.Header().Set("Content-Length", "1000")
			return
		}
		fmt.Fprintf(w, "%s %s", r.URL.Path, r.Header.Get("X-Seq"))
	})
	tr := newTransport(t)
	for i := range 50 {
		code, body, err := get(t, tr, srv.URL+"/p", http.Header{"X-Seq": {strconv.Itoa(i)}})
		if err != nil || code != 200 || body != fmt.Sprintf("/p %d", i) {
			t.Fatalf("request %d: %d %q %v", i, code, body, err)
		}
	}
	// HEAD has no body to read, whatever Content-Length says.
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodHead, srv.URL+"/h", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); len(b) != 0 || resp.ContentLength != 1000 {
		t.Errorf("HEAD: %d bytes, Content-Length %d", len(b), resp.ContentLength)
	}
	resp.Body.Close()
	if _, body, err := get(t, tr, srv.URL+"/after-head", nil); err != nil || body != "/after-head " {
		t.Errorf("after HEAD: %q %v", body, err)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 52 sequential requests, want 1", n)
	}
}

func TestTransportChunkedAndTrailers(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		for i := range 3 {
			fmt.Fprintf(w, "part%d;", i)
			w.(http.Flusher).Flush()
		}
		w.Header().Set("X-Sum", "3")
	})
	tr := newTransport(t)
	for range 3 {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(b) != "part0;part1;part2;" || resp.Trailer.Get("X-Sum") != "3" {
			t.Fatalf("chunked: %q %v trailer %v", b, err, resp.Trailer)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

func TestTransportClosesWhatItCannotReuse(t *testing.T) {
	big := strings.Repeat("x", 256<<10)
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/big":
			_, _ = io.WriteString(w, big)
		case "/close":
			w.Header().Set("Connection", "close")
			_, _ = io.WriteString(w, "bye")
		default:
			_, _ = io.WriteString(w, "ok "+r.URL.Path)
		}
	})
	tr := newTransport(t)
	step := func(name string, want int64, do func()) {
		t.Helper()
		before := conns.Load()
		do()
		if _, body, err := get(t, tr, srv.URL+"/next", nil); err != nil || body != "ok /next" {
			t.Fatalf("%s: next request got %q %v", name, body, err)
		}
		if got := conns.Load() - before; got != want {
			t.Errorf("%s: %d new connections, want %d", name, got, want)
		}
	}
	step("warm", 1, func() {})
	step("body closed half read", 1, func() {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+"/big", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(resp.Body, make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if _, err := resp.Body.Read(make([]byte, 1)); !errors.Is(err, errBodyClosed) {
			t.Errorf("read after close: %v", err)
		}
	})
	step("Connection: close", 1, func() {
		if _, body, err := get(t, tr, srv.URL+"/close", nil); err != nil || body != "bye" {
			t.Fatalf("%q %v", body, err)
		}
		idle := tr.idleConns()
		if idle != 0 {
			t.Errorf("%d idle connections after Connection: close, want 0", idle)
		}
	})
	step("body read to the end", 0, func() {
		if _, body, err := get(t, tr, srv.URL+"/big", nil); err != nil || body != big {
			t.Fatalf("%d bytes, %v", len(body), err)
		}
	})
}

// rawServer answers each connection with serve, for answers net/http would
// not send.
func rawServer(t *testing.T, serve func(c net.Conn, br *bufio.Reader)) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int64
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			wg.Go(func() {
				defer c.Close()
				serve(c, bufio.NewReader(c))
			})
		}
	})
	return "http://" + ln.Addr().String(), &conns
}

func TestTransportRetriesAConnectionTheHomeserverClosed(t *testing.T) {
	// Like a homeserver whose keep-alive timeout is shorter than ours: it
	// answers one request per connection without saying so, then hangs up.
	url, conns := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body := "hello " + req.URL.Path
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	})
	for _, c := range []struct {
		name  string
		probe func(*conn) idleState
	}{
		// The probe finds the closed connection before it is used.
		{"probed", probeIdle},
		// A close the probe cannot see (one racing with the request, or a
		// platform without the probe): the request is sent again.
		{"unprobed", func(*conn) idleState { return idleQuiet }},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := conns.Load()
			tr := newTransport(t)
			tr.probe = c.probe
			for i := range 5 {
				path := "/r" + strconv.Itoa(i)
				if code, body, err := get(t, tr, url+path, nil); err != nil || code != 200 || body != "hello "+path {
					t.Fatalf("request %d: %d %q %v", i, code, body, err)
				}
			}
			// Each request but the first finds the previous connection
			// closed: one new connection per request, plus any sent again.
			if n := conns.Load() - before; n < 5 || n > 9 {
				t.Errorf("%d connections for 5 requests, want 5 to 9 (one retry each at most)", n)
			}
		})
	}
}

func TestTransportDropsAConnectionWithUnaskedBytes(t *testing.T) {
	// A homeserver (or something in between) that sends a second, well-formed
	// answer after the first has been read, while the connection sits idle.
	answered, sent := make(chan struct{}), make(chan struct{})
	url, conns := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			body := "for " + req.URL.Path
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			if req.URL.Path == "/a" {
				<-answered
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!")
				close(sent)
			}
		}
	})
	tr := newTransport(t)
	_, body, err := get(t, tr, url+"/a", nil)
	close(answered)
	if err != nil || body != "for /a" {
		t.Fatalf("/a: %q %v", body, err)
	}
	<-sent
	if _, body, err := get(t, tr, url+"/b", nil); err != nil || body != "for /b" {
		t.Errorf("/b got %q %v: bytes that arrived on an idle connection were read as its answer", body, err)
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

func TestTransportEarlyCloseDoesNotWaitForTheHomeserver(t *testing.T) {
	release := make(chan struct{})
	url, _ := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		// 3 bytes of 100, then nothing until the test ends.
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
		<-release
	})
	t.Cleanup(func() { close(release) }) // before rawServer's, which waits for its handlers
	tr := newTransport(t)
	roundTrip := func() *http.Response {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(resp.Body, make([]byte, 3)); err != nil {
			t.Fatal(err)
		}
		return resp
	}
	// within fails the test if f has not returned after a while: it only
	// returns at all if it does not wait for the homeserver.
	within := func(what string, f func()) {
		t.Helper()
		done := make(chan struct{})
		go func() { f(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s waits for the homeserver to send the rest", what)
		}
	}
	resp := roundTrip()
	within("Close", func() { resp.Body.Close() })

	resp = roundTrip()
	readErr := make(chan error, 1)
	go func() {
		_, err := resp.Body.Read(make([]byte, 10))
		readErr <- err
	}()
	time.Sleep(10 * time.Millisecond) // let the Read block (if it has not yet, it fails at once)
	within("Close during a blocked Read", func() {
		resp.Body.Close()
		if err := <-readErr; err == nil {
			t.Error("the blocked Read returned no error")
		}
	})
}

func TestTransportReusesAnswersWithoutABody(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/204" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		_, _ = io.WriteString(w, "body")
	})
	tr := newTransport(t)
	for _, c := range []struct{ method, path string }{{"HEAD", "/"}, {"GET", "/204"}, {"HEAD", "/"}, {"GET", "/204"}} {
		req, _ := http.NewRequestWithContext(t.Context(), c.method, srv.URL+c.path, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close() // unread, as ReverseProxy does for these
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 4 answers without a body closed unread, want 1", n)
	}
}

func TestTransportBoundsAnswerHeads(t *testing.T) {
	url, _ := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			pad := ""
			if req.URL.Path == "/huge" {
				pad = "X-Pad: " + strings.Repeat("p", 4096) + "\r\n"
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok", pad)
		}
	})
	tr := newTransport(t)
	tr.maxHeader = 2048
	if _, _, err := get(t, tr, url+"/huge", nil); !errors.Is(err, errHeaderTooLarge) {
		t.Errorf("4 KiB head with a 2 KiB limit: %v", err)
	}
	// The limit is on heads only: a body may be larger.
	if _, body, err := get(t, tr, url+"/small", nil); err != nil || body != "ok" {
		t.Errorf("after: %q %v", body, err)
	}
}

func TestTransportDoesNotRetryAFreshConnection(t *testing.T) {
	url, conns := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		_, _ = http.ReadRequest(br) // and hang up without an answer
	})
	tr := newTransport(t)
	if _, _, err := get(t, tr, url, nil); err == nil {
		t.Fatal("no error from a homeserver that hung up")
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1: a request that reached a fresh connection is not sent again", n)
	}
}

func TestTransportAnswersWithGarbageAfterThem(t *testing.T) {
	url, conns := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			switch req.URL.Path {
			case "/early-hints":
				_, _ = io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"+
					"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
			case "/extra":
				// Two more bytes than Content-Length says.
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokXX")
			case "/malformed":
				_, _ = io.WriteString(c, "HTTP/1.1 two hundred\r\nContent-Length: 2\r\n\r\nok")
				return
			case "/switch":
				_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
			default:
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
			}
		}
	})
	tr := newTransport(t)
	if code, body, err := get(t, tr, url+"/early-hints", nil); err != nil || code != 200 || body != "final" {
		t.Errorf("after 103: %d %q %v", code, body, err)
	}
	before := conns.Load()
	if _, body, err := get(t, tr, url+"/extra", nil); err != nil || body != "ok" {
		t.Errorf("extra: %q %v", body, err)
	}
	// The leftover bytes must not be read as the next answer.
	if _, body, err := get(t, tr, url+"/next", nil); err != nil || body != "next" {
		t.Errorf("after extra bytes: %q %v", body, err)
	}
	if n := conns.Load() - before; n != 1 {
		t.Errorf("%d new connections, want 1: a connection with bytes left over is not reused", n)
	}
	if _, _, err := get(t, tr, url+"/malformed", nil); err == nil {
		t.Error("malformed status line: no error")
	}
	if _, body, err := get(t, tr, url+"/next", nil); err != nil || body != "next" {
		t.Errorf("after a malformed answer: %q %v", body, err)
	}
	if _, _, err := get(t, tr, url+"/switch", nil); err == nil {
		t.Error("101 to a request without Upgrade: no error")
	}
}

func TestTransportCancellation(t *testing.T) {
	release := make(chan struct{})
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/body" {
			_, _ = io.WriteString(w, "head start")
			w.(http.Flusher).Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	tr := newTransport(t)

	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/head", nil)
	time.AfterFunc(20*time.Millisecond, cancel)
	if _, err := tr.RoundTrip(req); !errors.Is(err, context.Canceled) || ErrorKind(err) != KindCanceled {
		t.Errorf("cancelled while waiting for the answer: %v (kind %s)", err, ErrorKind(err))
	}

	ctx, cancel2 := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel2()
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/head", nil)
	if _, err := tr.RoundTrip(req); !errors.Is(err, context.DeadlineExceeded) || ErrorKind(err) != KindTimeout {
		t.Errorf("deadline while waiting for the answer: %v (kind %s)", err, ErrorKind(err))
	}

	ctx, cancel3 := context.WithCancel(t.Context())
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/body", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "head start" {
		t.Fatalf("%q %v", buf, err)
	}
	time.AfterFunc(20*time.Millisecond, cancel3)
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("cancelled while reading the body: no error")
	}
	resp.Body.Close()
	idle := tr.idleConns()
	if idle != 0 {
		t.Errorf("%d idle connections after three cancelled requests, want 0", idle)
	}
}

func TestTransportSendsWhatHTTPTransportSends(t *testing.T) {
	// The raw bytes of each request head, as the homeserver reads them.
	heads := make(chan string, 16)
	url, _ := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			var head strings.Builder
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				head.WriteString(line)
				if line == "\r\n" {
					break
				}
			}
			heads <- head.String()
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	tr := newTransport(t)
	send := func(rt http.RoundTripper, method string) string {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), method, url+"/_matrix/client/v3/sync?since=s1&timeout=0", nil)
		req.Host = "matrix.example.org"
		req.Header = http.Header{
			"Authorization":     {"Bearer syt_x"},
			"User-Agent":        {"Element/1.11"},
			"X-Forwarded-For":   {"192.0.2.7"},
			"X-Forwarded-Proto": {"https"},
			"Accept":            {"application/json", "text/plain"},
		}
		resp, err := rt.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return <-heads
	}
	for _, method := range []string{"GET", "HEAD"} {
		direct, std := send(tr, method), send(tr.fallback, method)
		if direct != std {
			t.Errorf("%s: direct path sent\n%q\nhttp.Transport sent\n%q", method, direct, std)
		}
	}
	// A header value or name that would corrupt the request is refused
	// before anything is sent, as http.Transport does.
	for _, h := range []http.Header{{"Bad Name": {"v"}}, {"X-Nul": {"a\x00"}}, {"X-Bell": {"a\x07b"}}} {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, url+"/bad", nil)
		req.Header = h
		if _, err := tr.RoundTrip(req); err == nil {
			t.Errorf("header %q: no error", h)
		}
	}
	select {
	case head := <-heads:
		t.Errorf("the homeserver received a request with a bad header:\n%s", head)
	default:
	}
}

func TestTransportFallsBackForBodies(t *testing.T) {
	var got []string
	var mu sync.Mutex
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, fmt.Sprintf("%s %s body=%q", r.Method, r.URL.RequestURI(), b))
		mu.Unlock()
	})
	tr := newTransport(t)
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/_matrix/client/v3/logout", "{}"},
		{"PUT", "/_matrix/client/v3/rooms/!r/send/m.room.message/1", `{"body":"hi"}`},
		{"DELETE", "/_matrix/client/v3/devices/PHONE", ""},
	} {
		var rd io.Reader
		if c.body != "" {
			rd = strings.NewReader(c.body)
		}
		req, _ := http.NewRequestWithContext(t.Context(), c.method, srv.URL+c.path, rd)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	want := []string{
		`POST /_matrix/client/v3/logout body="{}"`,
		`PUT /_matrix/client/v3/rooms/!r/send/m.room.message/1 body="{\"body\":\"hi\"}"`,
		`DELETE /_matrix/client/v3/devices/PHONE body=""`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("homeserver received:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestTransportIdleConnections(t *testing.T) {
	srv, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })
	tr := newTransport(t)
	now := time.Now()
	var mu sync.Mutex
	tr.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	idle := tr.idleConns

	for range 2 {
		if _, _, err := get(t, tr, srv.URL, nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := conns.Load(); n != 1 || idle() != 1 {
		t.Fatalf("%d connections, %d idle; want 1, 1", n, idle())
	}
	advance(tr.idleTimeout + time.Second)
	if _, _, err := get(t, tr, srv.URL, nil); err != nil {
		t.Fatal(err)
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("%d connections, want 2: one idle past IdleConnTimeout is not reused", n)
	}
	advance(tr.idleTimeout + time.Second)
	tr.reapIdle()
	if n := idle(); n != 0 {
		t.Errorf("%d idle connections after reaping, want 0", n)
	}
	tr.mu.Lock()
	armed := tr.reap != nil
	tr.mu.Unlock()
	if armed {
		t.Error("reaper still armed with nothing idle")
	}
}

// TestTransportNeverMixesUpAnswers sends concurrent requests, some
// abandoned half-way, some cancelled, against a homeserver that sometimes
// closes the connection, and checks that every answer read in full is the
// answer to its own request.
func TestTransportNeverMixesUpAnswers(t *testing.T) {
	srv, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("id")
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		if r.URL.Query().Get("close") == "1" {
			w.Header().Set("Connection", "close")
		}
		_, _ = io.WriteString(w, strings.Repeat(id+";", n))
	})
	tr := newTransport(t)
	var wg sync.WaitGroup
	var mixed, ok atomic.Int64
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for i := range 150 {
				id := fmt.Sprintf("g%di%d", g, i)
				n := 1 + rng.IntN(3000)
				url := fmt.Sprintf("%s/x?id=%s&n=%d&close=%d", srv.URL, id, n, rng.IntN(10)/9)
				ctx, cancel := context.WithCancel(t.Context())
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				mode := rng.IntN(10)
				if mode == 0 {
					time.AfterFunc(time.Duration(rng.IntN(200))*time.Microsecond, cancel)
				}
				resp, err := tr.RoundTrip(req)
				if err != nil {
					cancel()
					continue
				}
				if mode == 1 {
					_, _ = io.ReadFull(resp.Body, make([]byte, rng.IntN(len(id)*n)))
					resp.Body.Close()
					cancel()
					continue
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				cancel()
				if err != nil {
					continue
				}
				if string(b) != strings.Repeat(id+";", n) {
					mixed.Add(1)
				} else {
					ok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if mixed.Load() != 0 {
		t.Errorf("%d answers were not the answer to their request", mixed.Load())
	}
	if ok.Load() < 800 {
		t.Errorf("only %d of 1,200 requests answered in full", ok.Load())
	}
}

// BenchmarkRoundTrip compares the direct path with http.Transport for a
// passthrough GET: go test -run XXX -bench RoundTrip -benchmem ./upstream
func BenchmarkRoundTrip(b *testing.B) {
	body := strings.Repeat("x", 1024)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, body)
	}))
	defer srv.Close()
	tr := NewTransport(time.Second)
	defer tr.CloseIdleConnections()
	for _, c := range []struct {
		name string
		rt   http.RoundTripper
	}{{"direct", tr}, {"http.Transport", tr.fallback}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			buf := make([]byte, 2048)
			req, _ := http.NewRequestWithContext(b.Context(), http.MethodGet, srv.URL+"/_matrix/client/v3/pushrules/", nil)
			for b.Loop() {
				resp, err := c.rt.RoundTrip(req)
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.ReadFull(resp.Body, buf[:1024])
				if _, err := resp.Body.Read(buf); err != io.EOF || n != 1024 {
					b.Fatalf("body: %d bytes, then %v", n, err)
				}
				resp.Body.Close()
			}
		})
	}
}

func (t *Transport) idleConns() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.idleLocked()
}
