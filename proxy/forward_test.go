package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// rawUpstream is a homeserver on 127.0.0.1 that records the bytes of each
// request head it receives and answers each with the canned bytes of
// answer, then closes the connection.
type rawUpstream struct {
	ln net.Listener
	wg sync.WaitGroup

	mu     sync.Mutex
	answer string
	heads  []string
}

func newRawUpstream(t testing.TB) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{ln: ln}
	u.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.wg.Go(func() { u.serve(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		u.wg.Wait()
	})
	return u
}

func (u *rawUpstream) serve(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	var head []byte
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		line, err := br.ReadSlice('\n')
		head = append(head, line...)
		if err != nil || len(head) > 1<<20 {
			return // the transport gave up on the request (a client gone)
		}
	}
	u.mu.Lock()
	u.heads = append(u.heads, string(head))
	answer := u.answer
	u.mu.Unlock()
	_, _ = io.WriteString(c, answer)
}

// take returns the request heads received since the last call.
func (u *rawUpstream) take() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	h := u.heads
	u.heads = nil
	return h
}

// forwardPair is two proxies in front of one rawUpstream, alike but for
// the way they pass requests through: rp only, and forward where it may.
type forwardPair struct {
	up          *rawUpstream
	rp, fwd     *Proxy
	rpURL, fURL string
	transports  []*upstream.Transport
}

func newForwardPair(t testing.TB, basePath string) *forwardPair {
	t.Helper()
	fp := &forwardPair{up: newRawUpstream(t)}
	target := mustParseURL(t, "http://"+fp.up.ln.Addr().String()+basePath)
	for _, forced := range []bool{true, false} {
		tr := upstream.NewTransport(time.Second)
		t.Cleanup(tr.CloseIdleConnections)
		fp.transports = append(fp.transports, tr)
		p, err := New(Config{Upstream: target, Transport: tr, Registerer: prometheus.NewRegistry(),
			Cache: testCacheConfig})
		if err != nil {
			t.Fatal(err)
		}
		front := httptest.NewServer(p)
		t.Cleanup(front.Close)
		if forced {
			p.direct = nil // rp for everything
			fp.rp, fp.rpURL = p, front.Listener.Addr().String()
		} else {
			if p.direct == nil {
				t.Fatal("the proxy would never forward")
			}
			fp.fwd, fp.fURL = p, front.Listener.Addr().String()
		}
	}
	return fp
}

var testCacheConfig = tokencache.Config{Size: 100, TTL: time.Minute, NegativeTTL: time.Second, LookupTimeout: time.Second}

// seen is what one request through one proxy came to: the request heads
// the homeserver received and what the client saw.
type seen struct {
	heads  []string
	client string
}

// do sends the raw request through one proxy of the pair, with answer as
// the homeserver's.
func (fp *forwardPair) do(t testing.TB, viaForward bool, request, answer string) seen {
	t.Helper()
	addr := fp.rpURL
	if viaForward {
		addr = fp.fURL
	}
	fp.up.mu.Lock()
	fp.up.answer = answer
	fp.up.mu.Unlock()
	fp.up.take()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(request, " ")
	// ReverseProxy flushes the head of an answer of unknown length from a
	// timer, racing the first write of its body: if the write wins, the
	// server sniffs a missing Content-Type from it. forward keeps that race.
	sniffRace := !strings.Contains(answer, "Content-Type:") && !strings.Contains(answer, "Content-Length:")
	got := seen{client: readClientResponse(bufio.NewReader(c), method, sniffRace)}
	got.heads = fp.up.take()
	for _, tr := range fp.transports {
		tr.CloseIdleConnections()
	}
	return got
}

// readClientResponse reads one answer as a client sees it: status, header
// fields (but Date), body, trailers, or how reading it failed.
// sniffed leaves out a Content-Type the server may have sniffed.
func readClientResponse(br *bufio.Reader, method string, sniffed bool) string {
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		return "no answer"
	}
	body, err := io.ReadAll(resp.Body)
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n", resp.Status)
	h := resp.Header.Clone()
	h.Del("Date")
	if sniffed {
		h.Del("Content-Type")
	}
	if len(body) == 0 && err == nil {
		// ReverseProxy flushes the head of an answer of unknown length
		// from a timer; with an empty body whether it fires before the
		// handler returns decides between chunked and Content-Length: 0.
		h.Del("Content-Length")
		resp.TransferEncoding = nil
	}
	if tr := h["Trailer"]; len(tr) > 0 {
		h["Trailer"] = sortedList(tr) // announced in map order
	}
	_ = h.WriteSubset(&b, nil)
	fmt.Fprintf(&b, "TE %q\nbody %q\n", resp.TransferEncoding, body)
	if err != nil {
		fmt.Fprintf(&b, "body error\n")
	}
	fmt.Fprintf(&b, "trailers %v\n", resp.Trailer)
	return b.String()
}

func sortedList(vs []string) []string {
	var names []string
	for _, v := range vs {
		for n := range strings.SplitSeq(v, ",") {
			names = append(names, strings.TrimSpace(n))
		}
	}
	slices.Sort(names)
	return []string{strings.Join(names, ", ")}
}

// compare sends request through both proxies and fails the test when
// anything the homeserver or the client sees differs.
func (fp *forwardPair) compare(t testing.TB, request, answer string) {
	t.Helper()
	if method, _, _ := strings.Cut(request, " "); method != "GET" && method != "HEAD" {
		t.Fatalf("not a forwardable request: %q", request)
	}
	viaRP := fp.do(t, false, request, answer)
	viaFwd := fp.do(t, true, request, answer)
	if !slices.Equal(viaRP.heads, viaFwd.heads) {
		t.Errorf("request %q: the homeserver received\nvia rp:      %q\nvia forward: %q", request, viaRP.heads, viaFwd.heads)
	}
	if viaRP.client != viaFwd.client {
		t.Errorf("request %q, answer %q: the client saw\nvia rp:\n%s\nvia forward:\n%s", request, answer, viaRP.client, viaFwd.client)
	}
}

// forwardRequests are client requests, raw, with odd heads.
var forwardRequests = []string{
	"GET /_matrix/client/v3/sync?since=s1&timeout=30000 HTTP/1.1\r\nHost: hs.example\r\nAuthorization: Bearer syt_a\r\nUser-Agent: Element/1.0\r\n\r\n",
	"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: hs.example\r\n\r\n",                // no User-Agent
	"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: hs.example\r\nUser-Agent:\r\n\r\n", // empty User-Agent
	"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: hs.example\r\nUser-Agent:  \t\r\n\r\n",
	"HEAD /_matrix/media/v3/download/hs/abc HTTP/1.1\r\nHost: hs.example\r\nUser-Agent: curl\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nConnection: keep-alive, X-Secret,  x-other-thing ,,\r\nX-Secret: 1\r\nX-Other-Thing: 2\r\nKeep-Alive: 300\r\nX-Kept: 3\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nConnection: Authorization\r\nAuthorization: Bearer syt_a\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nConnection: User-Agent, X-Forwarded-For, te\r\nUser-Agent: ua\r\nTe: trailers\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nTe: trailers, deflate\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nTE: gzip\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nProxy-Authenticate: x\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nX-Dup: 1\r\nX-Dup: 2\r\nx-dup: 3\r\nAccept: a\r\nAccept: b\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nX-Forwarded-For: 203.0.113.66\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.66\r\nX-Real-IP: 203.0.113.66\r\n\r\n",
	"GET /a?access_token=syt_b&x=%zz&y=a;b&z=%2F&&=&q=%E2%82%AC#frag HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /a?;;; HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /a? HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /_matrix/media/v3/download/hs%2Fx/a%20b/%E2%82%AC HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /rooms/!r%3Ahs/state/m.room.name/%2F HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET //double//slash/ HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /a%2f%2F HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example:8448\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: [::1]:8008\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: \r\n\r\n",
	"GET /a HTTP/1.0\r\n\r\n",
	"GET http://other.example/abs?q=1 HTTP/1.1\r\nHost: hs.example\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nConnection: close\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nUpgrade: websocket\r\n\r\n", // not an upgrade: no Connection: upgrade
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nX-Space:   padded value  \r\nX-Tab: \ttab\t\r\nX-Empty:\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nContent-Length: 0\r\n\r\n",
	"GET /a HTTP/1.1\r\nHost: hs.example\r\nX-1: 1\r\nX-2: 2\r\nX-3: 3\r\nX-4: 4\r\nX-5: 5\r\nX-6: 6\r\nX-7: 7\r\nX-8: 8\r\nX-9: 9\r\nX-10: 10\r\nX-11: 11\r\nX-12: 12\r\nX-13: 13\r\nX-14: 14\r\nX-15: 15\r\nX-16: 16\r\nX-17: 17\r\n\r\n",
}

// forwardAnswers are the homeserver's answers, raw.
var forwardAnswers = []string{
	"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
	"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTrailer: X-Sum, X-Other\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: abc\r\nX-Other: 1\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Unannounced: abc\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end",
	"HTTP/1.0 200 OK\r\n\r\nold style",
	unknownTokenAnswer,
	"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\n{\"flows\":[]}",
	"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
	"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Type: image/png\r\n\r\n", // a HEAD's answer; a GET's body never comes
	"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: x\r\nUpgrade: h2c\r\nX-Kept: 2\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nContent-Length: 12\r\n\r\ndata: hi\n\n\n\n",
	"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nX-Dup: 1\r\nX-Dup: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
	"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad",
	"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short", // the homeserver hangs up mid-body
	"not HTTP at all\r\n\r\n",
	"",
}

const unknownTokenAnswer = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 53\r\n\r\n" +
	`{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}`

func TestForwardSameAsReverseProxy(t *testing.T) {
	for _, base := range []string{"", "/base/", "/b%2Fse"} {
		t.Run("base="+base, func(t *testing.T) {
			fp := newForwardPair(t, base)
			for i, req := range forwardRequests {
				for j, ans := range forwardAnswers {
					t.Run(fmt.Sprintf("req%d/ans%d", i, j), func(t *testing.T) { fp.compare(t, req, ans) })
				}
			}
		})
	}
}

// Both paths hand a 401 to passiveInvalidation before the client sees it,
// HEAD included; user-interactive auth's 401 drops nothing.
func TestForwardPassiveInvalidation(t *testing.T) {
	fp := newForwardPair(t, "")
	uia := "HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\n{\"flows\":[]}"
	for _, tc := range []struct {
		name, method, answer string
		dropped              bool
	}{
		{"GET 401", "GET", unknownTokenAnswer, true},
		{"HEAD 401", "HEAD", "HTTP/1.1 401 Unauthorized\r\nContent-Length: 53\r\n\r\n", true},
		{"GET UIA 401", "GET", uia, false},
		{"GET 200", "GET", forwardAnswers[0], false},
	} {
		for _, viaForward := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/forward=%v", tc.name, viaForward), func(t *testing.T) {
				p := fp.rp
				if viaForward {
					p = fp.fwd
				}
				key := p.hasher.Key("syt_gone", tokencache.Masquerade{})
				_, _, err := p.cache.Resolve(t.Context(), key, func(context.Context) (tokencache.Answer, error) {
					return tokencache.Answer{Kind: tokencache.Positive, UserID: "@a:hs", DeviceID: "D",
						Body: `{"user_id":"@a:hs","device_id":"D"}`}, nil
				})
				if err != nil {
					t.Fatal(err)
				}
				got := fp.do(t, viaForward, tc.method+" /_matrix/client/v3/sync HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer syt_gone\r\n\r\n", tc.answer)
				if !strings.HasPrefix(got.client, "401") && tc.dropped {
					t.Fatalf("the client saw %s", got.client)
				}
				if _, res := p.cache.Get(key); (res != tokencache.Hit) != tc.dropped {
					t.Errorf("cache: %v, want dropped=%v", res, tc.dropped)
				}
			})
		}
	}
}

func FuzzForwardSameAsReverseProxy(f *testing.F) {
	for i, req := range forwardRequests {
		method, rest, _ := strings.Cut(req, " ")
		target, rest, _ := strings.Cut(rest, " ")
		path, query, _ := strings.Cut(target, "?")
		lines := strings.Split(strings.TrimSuffix(rest, "\r\n\r\n"), "\r\n")
		name, value, _ := strings.Cut(lines[len(lines)-1], ":") // the last field, seldom Host
		f.Add(method == "HEAD", path, query, name, value, "keep-alive", uint8(i))
	}
	// Fields the client's Connection names.
	f.Add(false, "/a", "", "X-Secret", "1", "x-secret, close", uint8(0))
	f.Add(false, "/a", "x=1", "Authorization", "Bearer syt_a", "authorization", uint8(6))
	f.Add(true, "/a", "", "Te", "trailers", "TE", uint8(2))
	f.Add(false, "/a", "", "User-Agent", "ua", " user-agent ,", uint8(2))
	f.Add(false, "/a", "", "X-Forwarded-For", "1.2.3.4", "X-Forwarded-For", uint8(13))
	fp := newForwardPair(f, "/base")
	f.Fuzz(func(t *testing.T, head bool, path, query, name, value, connection string, answer uint8) {
		method := "GET"
		if head {
			method = "HEAD"
		}
		target := path
		if query != "" {
			target += "?" + query
		}
		for _, s := range []string{target, name, value, connection} {
			if strings.ContainsAny(s, "\r\n") {
				return // another request, or no request: the front server's business
			}
		}
		if strings.ContainsAny(target, " \t") {
			return
		}
		if k := textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(name)); k == "Content-Length" || k == "Transfer-Encoding" {
			return // a body, which the client would have to send: not forward's
		}
		req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: hs.example\r\n%s:%s\r\nConnection: %s\r\n\r\n", method, target, name, value, connection)
		fp.compare(t, req, forwardAnswers[int(answer)%len(forwardAnswers)])
	})
}

// A homeserver that cannot be reached is a 502 Matrix error on the forward
// path too, as on rp's.
func TestForwardUpstreamDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	tr := upstream.NewTransport(time.Second)
	defer tr.CloseIdleConnections()
	p, err := New(Config{Upstream: mustParseURL(t, "http://"+addr), Transport: tr, Registerer: prometheus.NewRegistry(), Cache: testCacheConfig})
	if err != nil {
		t.Fatal(err)
	}
	var bodies [2]string
	for i, viaForward := range []bool{false, true} {
		saved := p.direct
		if !viaForward {
			p.direct = nil
		}
		req := httptest.NewRequest("GET", "/_matrix/client/v3/sync?timeout=0", nil)
		if p.forwardable(req) != viaForward {
			t.Fatalf("forwardable: %v, want %v", !viaForward, viaForward)
		}
		rec := httptest.NewRecorder()
		p.ServeHTTP(rec, req)
		p.direct = saved
		if rec.Code != http.StatusBadGateway || !strings.Contains(rec.Body.String(), `"errcode":"M_UNKNOWN"`) {
			t.Errorf("forward=%v: %d %s", viaForward, rec.Code, rec.Body)
		}
		bodies[i] = fmt.Sprint(rec.Header(), rec.Body)
	}
	if bodies[0] != bodies[1] {
		t.Errorf("rp answered %s, forward %s", bodies[0], bodies[1])
	}
}

// A client that hangs up mid-body ends the forward path's homeserver call:
// the connection is closed, not pooled for another client, and nothing is
// left running.
func TestForwardClientGoneMidBody(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	// Of unknown length, so that the proxy passes "first" on at once.
	hs := startStallingHomeserver(t, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
	defer hs.stop()
	front := httptest.NewServer(hs.proxy(t))
	defer front.Close()
	hs.clientGoneMidBody(t, front.Listener.Addr().String())
}

// stallingHomeserver answers every request with one canned answer, then
// reads until the proxy hangs up, and reports each hang-up on closed.
type stallingHomeserver struct {
	ln       net.Listener
	tr       *upstream.Transport
	accepted sync.WaitGroup
	conns    atomic.Int32
	closed   chan struct{}
}

func startStallingHomeserver(t *testing.T, answer string) *stallingHomeserver {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &stallingHomeserver{ln: ln, tr: upstream.NewTransport(time.Second), closed: make(chan struct{}, 16)}
	hs.accepted.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			hs.conns.Add(1)
			hs.accepted.Go(func() {
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
				_, _ = io.Copy(io.Discard, br) // until the proxy hangs up
				hs.closed <- struct{}{}
			})
		}
	})
	return hs
}

// stop ends the homeserver and the proxy's connections to it; deferred
// before goleak's check runs.
func (hs *stallingHomeserver) stop() {
	hs.tr.CloseIdleConnections()
	_ = hs.ln.Close()
	hs.accepted.Wait()
}

// proxy is a Proxy in front of the homeserver that forwards.
func (hs *stallingHomeserver) proxy(t *testing.T) *Proxy {
	t.Helper()
	p, err := New(Config{Upstream: mustParseURL(t, "http://"+hs.ln.Addr().String()), Transport: hs.tr,
		Registerer: prometheus.NewRegistry(), Cache: testCacheConfig})
	if err != nil {
		t.Fatal(err)
	}
	if p.direct == nil {
		t.Fatal("the proxy would never forward")
	}
	return p
}

func (hs *stallingHomeserver) waitClosed(t *testing.T) {
	t.Helper()
	select {
	case <-hs.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the homeserver connection stayed open after the client left")
	}
}

// clientGoneMidBody: twice, a client of front reads the start of the body
// and hangs up; each time the homeserver connection is closed, not pooled.
func (hs *stallingHomeserver) clientGoneMidBody(t *testing.T, front string) {
	t.Helper()
	for range 2 {
		c, err := net.Dial("tcp", front)
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
		hs.waitClosed(t)
	}
	if n := hs.conns.Load(); n != 2 {
		t.Errorf("%d homeserver connections for two requests: one was reused after its client left", n)
	}
}

// Upgrades (WebSocket) are not forward's: they go through rp, which splices
// the two connections after a 101.
func TestForwardLeavesUpgradesToReverseProxy(t *testing.T) {
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "no upgrade", 400)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		_ = brw.Flush()
		buf := make([]byte, 4)
		if _, err := io.ReadFull(brw, buf); err == nil {
			_, _ = c.Write(buf) // echo
		}
	}))
	defer hs.Close()
	tr := upstream.NewTransport(time.Second)
	defer tr.CloseIdleConnections()
	p, err := New(Config{Upstream: mustParseURL(t, hs.URL), Transport: tr, Registerer: prometheus.NewRegistry(), Cache: testCacheConfig})
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewServer(p)
	defer front.Close()
	for _, connection := range []string{"Upgrade", "keep-alive, upgrade"} {
		req := httptest.NewRequest("GET", "/_matrix/client/v3/ws", nil)
		req.Header.Set("Connection", connection)
		req.Header.Set("Upgrade", "websocket")
		if p.forwardable(req) {
			t.Errorf("Connection: %s: an upgrade took forward", connection)
		}
		c, err := net.Dial("tcp", front.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, "GET /_matrix/client/v3/ws HTTP/1.1\r\nHost: hs\r\nConnection: "+connection+"\r\nUpgrade: websocket\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("Connection: %s: %v %v", connection, resp, err)
		}
		_, _ = io.WriteString(c, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
			t.Errorf("Connection: %s: echo %q %v", connection, buf, err)
		}
		c.Close()
	}
}
