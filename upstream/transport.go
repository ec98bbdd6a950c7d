package upstream

import (
	"bufio"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"sync"
	"time"
)

// Transport is the RoundTripper for the homeserver.
//
// A GET or HEAD without a body to an http:// homeserver (nearly all Matrix
// client traffic, and every lookup the proxy makes itself) is sent directly:
// written and answered on the caller's goroutine, over a pool of kept-alive
// connections. http.Transport hands every request to two goroutines of its
// own (a writer and a reader per connection) and back; on the sidecar's one
// core those hand-offs cost about a third of a passthrough request (make
// bench, issue 6). Everything else (request bodies, upgrades, https,
// credentials in the URL) goes through an http.Transport unchanged.
//
// The direct path writes the request head itself (head.go, the bytes
// Request.Write would write) and reads the common answer, an HTTP/1.1 head
// with a Content-Length, itself (response.go); every other answer's framing
// is http.ReadResponse's and the body readers it returns. A
// connection goes back to the pool only once its response body has been read
// to the end with nothing left over; one closed early, cancelled, or answered
// with Connection: close is closed. Before an idle connection is reused it is
// probed without blocking, and dropped if the homeserver closed it or sent
// anything while it was idle: such bytes must never be read as another
// client's answer. Answer heads are bounded as in http.Transport. 1xx
// answers other than 101 are read and dropped, so a client never sees a 103
// Early Hints from this path.
type Transport struct {
	fallback    *http.Transport
	dial        func(ctx context.Context, network, addr string) (net.Conn, error)
	idleTimeout time.Duration
	maxIdle     int   // per host
	maxHeader   int64 // bytes of answer heads, 1xx included, per request
	now         func() time.Time
	probe       func(*conn) idleState

	mu   sync.Mutex
	idle map[string][]*conn // by host:port; most recently used last
	reap *time.Timer        // armed while any connection is idle
}

// NewTransport returns the Transport for talking to one homeserver.
//
// It keeps many idle connections (Go's default of 2 per host would make a
// busy sidecar open and close connections constantly), bounds connecting by
// dialTimeout, never consults HTTP_PROXY (the homeserver is next door), and
// leaves compression to the client and homeserver. It sets no response
// timeout: /sync long-polls legitimately take minutes.
func NewTransport(dialTimeout time.Duration) *Transport {
	d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	const idleTimeout = 90 * time.Second
	return &Transport{
		fallback: &http.Transport{
			DialContext:           d.DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConns:          1024,
			MaxIdleConnsPerHost:   512,
			IdleConnTimeout:       idleTimeout,
			TLSHandshakeTimeout:   dialTimeout,
			ExpectContinueTimeout: time.Second,
			DisableCompression:    true,
			WriteBufferSize:       32 << 10,
			ReadBufferSize:        32 << 10,
		},
		dial:        d.DialContext,
		idleTimeout: idleTimeout,
		maxIdle:     512,
		maxHeader:   10 << 20, // as http.Transport
		now:         time.Now,
		probe:       probeIdle,
		idle:        make(map[string][]*conn),
	}
}

// CloseIdleConnections closes every connection not carrying a request.
func (t *Transport) CloseIdleConnections() {
	t.mu.Lock()
	var drop []*conn
	for host, cs := range t.idle {
		drop = append(drop, cs...)
		delete(t.idle, host)
	}
	if t.reap != nil {
		t.reap.Stop()
		t.reap = nil
	}
	t.mu.Unlock()
	for _, c := range drop {
		_ = c.nc.Close()
	}
	t.fallback.CloseIdleConnections()
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !direct(req) {
		return t.fallback.RoundTrip(req)
	}
	var h head
	if err := h.check(req); err != nil {
		return nil, err
	}
	ctx := req.Context()
	host := hostPort(req.URL.Host)
	c, err := t.get(ctx, host)
	if err != nil {
		return nil, contextError(ctx, err)
	}
	resp, retry, err := t.exchange(ctx, c, req, &h)
	if err == nil || !retry {
		return resp, contextError(ctx, err)
	}
	// A kept-alive connection the homeserver had closed (its idle timeout,
	// a restart): the request never reached it, and GET and HEAD are safe to
	// send again, once, on a new connection. Older idle connections are
	// likely dead too.
	t.dropIdleSince(host, c.idleSince)
	if c, err = t.dialConn(ctx, host); err != nil {
		return nil, contextError(ctx, err)
	}
	resp, _, err = t.exchange(ctx, c, req, &h)
	return resp, contextError(ctx, err)
}

// direct says whether req can take the direct path.
func direct(req *http.Request) bool {
	return (req.Method == http.MethodGet || req.Method == http.MethodHead) &&
		(req.Body == nil || req.Body == http.NoBody) && req.ContentLength == 0 && len(req.Trailer) == 0 &&
		req.URL.Scheme == "http" && req.URL.Host != "" && req.URL.User == nil &&
		len(req.Header["Upgrade"]) == 0 && len(req.TransferEncoding) == 0
}

// exchange sends req on c and reads the answer's head. retry says that the
// request failed on a reused connection before any answer arrived.
func (t *Transport) exchange(ctx context.Context, c *conn, req *http.Request, h *head) (*http.Response, bool, error) {
	stop := noStop
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, c.cancel)
	}
	err := h.write(c.bw)
	if err == nil {
		err = c.bw.Flush()
	}
	if trace := httptrace.ContextClientTrace(ctx); trace != nil && trace.WroteRequest != nil {
		trace.WroteRequest(httptrace.WroteRequestInfo{Err: err})
	}
	c.lr.n = t.maxHeader
	if err == nil {
		_, err = c.br.Peek(1)
	}
	if err != nil {
		return nil, c.reused && ctx.Err() == nil, c.fail(stop, err)
	}
	for range 1 + max1xx {
		resp, ok := readPlainResponse(c.br, req)
		if !ok {
			if resp, err = http.ReadResponse(c.br, req); err != nil {
				return nil, false, c.fail(stop, err)
			}
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return nil, false, c.fail(stop, errors.New("upstream: 101 Switching Protocols to a request that asked for no upgrade"))
		case resp.StatusCode < 200:
			continue // 100 Continue, 102, 103 Early Hints: the answer follows
		}
		c.lr.n = math.MaxInt64 // the body is the caller's to bound
		resp.Body = &body{
			rc:       resp.Body,
			c:        c,
			t:        t,
			stop:     stop,
			reusable: !resp.Close && !req.Close,
		}
		return resp, false, nil
	}
	return nil, false, c.fail(stop, errors.New("upstream: too many 1xx answers"))
}

// noStop is exchange's stop for a request that cannot be cancelled.
func noStop() bool { return true }

// fail closes c after a failed exchange, whose cancellation stop stops.
func (c *conn) fail(stop func() bool, err error) error {
	stop()
	_ = c.nc.Close()
	return err
}

// max1xx is how many 1xx answers may come before the answer, as in
// http.Transport.
const max1xx = 5

var (
	longAgo           = time.Unix(1, 0)
	errHeaderTooLarge = errors.New("upstream: answer head over the size limit")
)

// limitReader bounds what http.ReadResponse may read for an answer's head,
// which it does not bound itself.
type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errHeaderTooLarge
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

// contextError prefers the context's error to the one a cancelled
// request's connection reported (a deadline set to cancel the read).
func contextError(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// conn is one kept-alive connection to the homeserver.
type conn struct {
	nc        net.Conn
	lr        *limitReader // under br
	prober    *prober
	br        *bufio.Reader
	bw        *bufio.Writer
	host      string
	reused    bool
	idleSince time.Time
	// cancel ends what is being read or written on the connection; made
	// once per connection for exchange's context.AfterFunc.
	cancel func()
}

// get returns the most recently used idle connection to host that is still
// open and quiet, or a new one.
func (t *Transport) get(ctx context.Context, host string) (*conn, error) {
	for {
		t.mu.Lock()
		cs := t.idle[host]
		n := len(cs)
		if n == 0 {
			t.mu.Unlock()
			return t.dialConn(ctx, host)
		}
		c := cs[n-1]
		cs[n-1] = nil
		t.idle[host] = cs[:n-1]
		t.mu.Unlock()
		expired := t.now().Sub(c.idleSince) >= t.idleTimeout
		state := idleClosed
		if !expired {
			state = t.probe(c)
		}
		if state == idleQuiet {
			c.reused = true
			return c, nil
		}
		_ = c.nc.Close()
		if state == idleClosed {
			// Expired or closed by the homeserver (its idle timeout, a
			// restart): the others have been idle longer, so most likely
			// they are too.
			t.dropIdleSince(host, c.idleSince)
		}
		// idleData: the homeserver sent bytes nobody asked for. Read as
		// the next answer, they would reach the wrong client; the
		// connection is closed and the next one tried.
	}
}

// probeIdle looks at an idle connection before it is reused.
func probeIdle(c *conn) idleState { return c.prober.idle() }

// What probeIdle finds on an idle connection.
type idleState int

const (
	idleQuiet  idleState = iota // open, nothing to read
	idleData                    // bytes arrived while it was idle
	idleClosed                  // closed by the other side, or broken
)

func (t *Transport) dialConn(ctx context.Context, host string) (*conn, error) {
	nc, err := t.dial(ctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	// 32 KiB to read, as the http.Transport; requests without a body are
	// a few hundred bytes.
	lr := &limitReader{r: nc, n: math.MaxInt64}
	return &conn{nc: nc, lr: lr, prober: newProber(nc), br: bufio.NewReaderSize(lr, 32<<10),
		bw: bufio.NewWriterSize(nc, 4<<10), host: host, cancel: func() { _ = nc.SetDeadline(longAgo) }}, nil
}

// put returns c to the pool, or closes it when the pool is full.
func (t *Transport) put(c *conn) {
	t.mu.Lock()
	c.idleSince = t.now() // under the lock: idle lists stay in age order
	if cs := t.idle[c.host]; len(cs) < t.maxIdle {
		t.idle[c.host] = append(cs, c)
		if t.reap == nil {
			t.reap = time.AfterFunc(t.idleTimeout, t.reapIdle)
		}
		t.mu.Unlock()
		return
	}
	t.mu.Unlock()
	_ = c.nc.Close()
}

// dropIdleSince closes the idle connections to host that have been idle
// since before, or at, since.
func (t *Transport) dropIdleSince(host string, since time.Time) {
	t.mu.Lock()
	cs := t.idle[host]
	i := 0
	for i < len(cs) && !cs[i].idleSince.After(since) {
		i++
	}
	drop := append([]*conn(nil), cs[:i]...)
	t.idle[host] = append(cs[:0], cs[i:]...)
	clear(cs[len(cs)-i:])
	t.mu.Unlock()
	for _, c := range drop {
		_ = c.nc.Close()
	}
}

// reapIdle closes connections idle longer than idleTimeout, so that a quiet
// sidecar does not hold on to them.
func (t *Transport) reapIdle() {
	expired := t.now().Add(-t.idleTimeout)
	t.mu.Lock()
	hosts := make([]string, 0, len(t.idle))
	for host := range t.idle {
		hosts = append(hosts, host)
	}
	t.mu.Unlock()
	for _, host := range hosts {
		t.dropIdleSince(host, expired)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.reap == nil {
		return // CloseIdleConnections ran meanwhile
	}
	if t.idleLocked() == 0 {
		t.reap = nil
		return
	}
	t.reap.Reset(t.idleTimeout / 2)
}

// idleLocked counts the idle connections to all hosts; t.mu is held.
func (t *Transport) idleLocked() int {
	n := 0
	for _, cs := range t.idle {
		n += len(cs)
	}
	return n
}

// body is the body of an answer on the direct path. The connection goes
// back to the pool when the body has been read to its end with nothing
// after it; any other end closes the connection.
type body struct {
	rc       io.ReadCloser
	c        *conn
	t        *Transport
	stop     func() bool // stops the cancellation of the connection
	reusable bool

	mu   sync.Mutex
	done bool  // the connection has been returned or closed
	err  error // what Read returns once done: io.EOF, what ended the body, or errBodyClosed
}

var errBodyClosed = errors.New("upstream: read on closed response body")

func (b *body) Read(p []byte) (int, error) {
	b.mu.Lock()
	done, err := b.done, b.err
	b.mu.Unlock()
	if done {
		return 0, err
	}
	n, err := b.rc.Read(p)
	if err != nil {
		b.finish(err == io.EOF, err)
	}
	return n, err
}

// Close implements io.Closer. Closing before the end closes the connection:
// reading out what is left could take as long as the homeserver likes. An
// answer without a body (HEAD, 204, 304) is at its end already.
func (b *body) Close() error {
	b.finish(b.rc == http.NoBody, errBodyClosed)
	b.mu.Lock()
	b.err = errBodyClosed
	b.mu.Unlock()
	return nil
}

// finish returns the connection to the pool or closes it, once; err is what
// Read returns from then on.
func (b *body) finish(atEOF bool, err error) {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return
	}
	b.done, b.err = true, err
	b.mu.Unlock()
	// stop() is false when the request's context ended: the connection's
	// deadline is being or has been set in the past.
	stopped := b.stop()
	if stopped && atEOF && b.reusable && b.c.br.Buffered() == 0 {
		_ = b.rc.Close() // at its end: nothing to read
		b.t.put(b.c)
		return
	}
	// The connection first: the body reader's Close reads out the rest, and
	// a Read blocked on the connection holds the body reader's lock.
	_ = b.c.nc.Close()
	_ = b.rc.Close()
}

// hostPort adds HTTP's default port to a host without one.
func hostPort(host string) string {
	if _, port, err := net.SplitHostPort(host); err == nil && port != "" {
		return host
	}
	return net.JoinHostPort(trimBrackets(host), "80")
}

func trimBrackets(h string) string {
	if len(h) > 1 && h[0] == '[' && h[len(h)-1] == ']' {
		return h[1 : len(h)-1]
	}
	return h
}
