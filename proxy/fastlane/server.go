// Package fastlane serves the commonest HTTP/1.1 requests (a GET or HEAD
// without a body) of an http.Server itself, and hands every other
// connection, bytes already read included, to that unchanged http.Server.
//
// net/http's server spends, per request, a context, a header clone, a
// goroutine that reads in the background to notice a client hanging up, and
// a general request parser: on the sidecar's one core that is about as much
// CPU as the proxying itself (make bench, issue 15). The fast lane parses a
// strict subset of requests (parse.go), writes net/http's bytes
// (response.go), and watches for hung-up clients only during requests that
// last: one goroutine per Server looks at the connections every
// DisconnectDelay/2 and starts net/http's background read for a request
// older than DisconnectDelay (a /sync long-poll), so a client that goes away
// still cancels its request's context.
//
// What the fast lane does not serve goes to net/http from its first byte: a
// request outside the subset (POST, bodies, upgrades, HTTP/1.0, odd
// syntax, a bare-LF head, a head over 4 KiB), and then the rest of that
// connection; a TLS connection goes to net/http unread. A server with
// TLSConfig, ReadTimeout, WriteTimeout, ConnState, ConnContext,
// BaseContext or Protocols without HTTP/1 is served by net/http alone. Limits: on the fast lane
// the ResponseWriter offers no Hijack and http.ResponseController cannot
// set deadlines (no request there has a body or an upgrade), and
// SetKeepAlivesEnabled must be called on the Server, not on the
// http.Server (the fast lane cannot see that). A request's
// header values and URL share one copy of its head (at most 4 KiB): a
// handler that keeps one for long should copy it (strings.Clone).
package fastlane

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// DisconnectDelay is how long a request runs on the fast lane before the
// server starts watching its connection for the client hanging up.
const DisconnectDelay = 50 * time.Millisecond

// headBuffer bounds a request head served on the fast lane; a longer one
// goes to net/http, whose own limit (MaxHeaderBytes + 4 KiB) is larger.
const headBuffer = 4096

// Server serves an http.Server's connections, the common requests itself.
type Server struct {
	srv    *http.Server
	bypass bool
	delay  time.Duration

	handoff  *handoffListener
	httpErr  chan error // srv.Serve(handoff)'s result
	shutting atomic.Bool
	// noKeepAlives: SetKeepAlivesEnabled(false).
	noKeepAlives atomic.Bool
	// served and handed count requests served on the fast lane and
	// connections handed to net/http (tests look).
	served, handed atomic.Int64

	mu        sync.Mutex
	started   bool
	listeners map[*net.Listener]struct{}
	conns     map[*conn]struct{}
	stop      chan struct{} // closed when the watcher should end
	stopped   bool
}

// New returns a Server for srv. srv must not be used directly afterwards:
// Serve, Shutdown and Close go through the Server.
func New(srv *http.Server) *Server {
	return &Server{
		srv: srv,
		bypass: srv.TLSConfig != nil || srv.ReadTimeout != 0 || srv.WriteTimeout != 0 ||
			srv.ConnState != nil || srv.ConnContext != nil || srv.BaseContext != nil ||
			srv.Protocols != nil && !srv.Protocols.HTTP1(),
		delay:     DisconnectDelay,
		listeners: map[*net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		stop:      make(chan struct{}),
	}
}

// Serve accepts connections on ln until Shutdown or Close, and returns
// http.ErrServerClosed then, as http.Server.Serve.
func (s *Server) Serve(ln net.Listener) error {
	if s.bypass {
		return s.srv.Serve(ln)
	}
	s.mu.Lock()
	if s.shutting.Load() {
		s.mu.Unlock()
		return http.ErrServerClosed
	}
	if !s.started {
		s.started = true
		s.handoff = newHandoffListener(ln.Addr())
		s.httpErr = make(chan error, 1)
		go func() { s.httpErr <- s.srv.Serve(s.handoff) }()
		go s.watch()
	}
	s.listeners[&ln] = struct{}{}
	s.mu.Unlock()
	defer ln.Close() // as net/http
	defer func() {
		s.mu.Lock()
		delete(s.listeners, &ln)
		s.mu.Unlock()
	}()

	base := context.WithValue(context.Background(), http.ServerContextKey, s.srv)
	var tempDelay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.shutting.Load() {
				return http.ErrServerClosed
			}
			if ne, ok := err.(interface{ Temporary() bool }); ok && ne.Temporary() {
				// As net/http: back off on temporary errors (too
				// many open files).
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.logf("http: Accept error: %v; retrying in %v", err, tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			return err
		}
		tempDelay = 0
		c := &conn{s: s, nc: nc, created: time.Now()}
		if !s.track(c) {
			_ = nc.Close()
			return http.ErrServerClosed
		}
		go c.serve(context.WithValue(base, http.LocalAddrContextKey, nc.LocalAddr()))
	}
}

func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutting.Load() {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Shutdown stops accepting, closes idle connections, and waits for the
// others to finish their requests, or for ctx, as http.Server.Shutdown;
// the connections handed to net/http are its Shutdown's.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.bypass {
		return s.srv.Shutdown(ctx)
	}
	s.beginClose()
	httpDone := make(chan error, 1)
	go func() { httpDone <- s.srv.Shutdown(ctx) }()
	wait := time.Millisecond
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for !s.closeIdle() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			wait = min(2*wait, 100*time.Millisecond)
			timer.Reset(wait)
		}
	}
	s.stopWatch()
	return <-httpDone
}

// SetKeepAlivesEnabled is http.Server's, for both lanes: with false,
// answers say Connection: close and idle connections are closed. Call it
// here: the fast lane cannot see a call on the http.Server.
func (s *Server) SetKeepAlivesEnabled(v bool) {
	s.noKeepAlives.Store(!v)
	s.srv.SetKeepAlivesEnabled(v)
	if !v && !s.bypass {
		s.closeIdle()
	}
}

// keepAlives says whether a connection may carry another request.
func (s *Server) keepAlives() bool { return !s.shutting.Load() && !s.noKeepAlives.Load() }

// Close closes the listeners and every connection at once, as
// http.Server.Close.
func (s *Server) Close() error {
	if s.bypass {
		return s.srv.Close()
	}
	s.beginClose()
	s.mu.Lock()
	for c := range s.conns {
		c.state.Store(stateClosed)
		_ = c.nc.Close()
		// As net/http, whose background reads fail now: requests under
		// way learn at once.
		c.mu.Lock()
		if c.cancel != nil {
			c.cancel()
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	s.stopWatch()
	return s.srv.Close()
}

func (s *Server) beginClose() {
	s.mu.Lock()
	s.shutting.Store(true)
	for ln := range s.listeners {
		_ = (*ln).Close()
	}
	s.mu.Unlock()
}

func (s *Server) stopWatch() {
	s.mu.Lock()
	if !s.stopped {
		s.stopped = true
		close(s.stop)
	}
	s.mu.Unlock()
}

// closeIdle closes the connections waiting for a request (new ones after 5
// seconds, as net/http), and says whether none are left.
func (s *Server) closeIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		st := c.state.Load()
		if (st == stateIdle || st == stateNew && time.Since(c.created) > 5*time.Second) &&
			c.state.CompareAndSwap(st, stateClosed) {
			_ = c.nc.Close()
		}
	}
	return len(s.conns) == 0
}

// watch starts the background read of connections whose request has run
// longer than the delay.
func (s *Server) watch() {
	t := time.NewTicker(s.delay / 2)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			s.mu.Lock()
			for c := range s.conns {
				c.watch(now)
			}
			s.mu.Unlock()
		}
	}
}

func (s *Server) logf(format string, args ...any) {
	if s.srv.ErrorLog != nil {
		s.srv.ErrorLog.Printf(format, args...)
	} else {
		log.Printf(format, args...)
	}
}

// Connection states, for Shutdown.
const (
	stateNew int32 = iota
	stateActive
	stateIdle
	stateClosed
)

// conn is one client connection on the fast lane.
type conn struct {
	s       *Server
	nc      net.Conn
	cr      connReader
	br      *bufio.Reader
	bw      *bufio.Writer
	werr    error
	created time.Time
	state   atomic.Int32

	// Under mu: the request being served and the background read.
	mu       sync.Mutex
	inReq    bool
	reqStart time.Time
	cancel   context.CancelFunc
	bgDone   chan struct{} // non-nil while a background read runs
	aborting bool          // endRequest stops the background read
	gone     bool          // the background read saw the client go
	notifyCh chan bool     // the request's CloseNotify, if asked for
}

var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, headBuffer) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// aLongTimeAgo is a deadline that ends a blocked read at once.
var aLongTimeAgo = time.Unix(1, 0)

func (c *conn) serve(ctx context.Context) {
	if _, ok := c.nc.(*tls.Conn); ok {
		// A TLS listener: net/http's alone, unwrapped, so that it sees
		// the TLS state.
		c.s.untrack(c)
		if !c.s.handoff.give(c.nc) {
			_ = c.nc.Close()
		}
		return
	}
	c.cr.c = c
	c.br = readers.Get().(*bufio.Reader)
	c.br.Reset(&c.cr)
	c.bw = writers.Get().(*bufio.Writer)
	c.bw.Reset(connWriter{c})
	handed := false
	defer func() {
		c.s.untrack(c)
		c.br.Reset(nil)
		readers.Put(c.br)
		c.bw.Reset(nil)
		writers.Put(c.bw)
		if !handed {
			c.state.Store(stateClosed)
			_ = c.nc.Close()
		}
	}()
	var remote string
	if ra := c.nc.RemoteAddr(); ra != nil {
		remote = ra.String()
	}
	srv := c.s.srv
	for first := true; ; first = false {
		if !first {
			c.state.Store(stateIdle)
			if !c.s.keepAlives() {
				return
			}
			idle := srv.IdleTimeout
			if idle > 0 {
				_ = c.nc.SetReadDeadline(time.Now().Add(idle))
			} else {
				_ = c.nc.SetReadDeadline(time.Time{})
			}
			if _, err := c.br.Peek(1); err != nil {
				return
			}
		}
		var deadline time.Time
		if d := srv.ReadHeaderTimeout; d > 0 {
			deadline = time.Now().Add(d)
		}
		_ = c.nc.SetReadDeadline(deadline)
		// Idle (or new) until the head is in, as net/http: Shutdown
		// closes a connection whose next head is still coming.
		head, err := c.readHead()
		from := stateIdle
		if first {
			from = stateNew
		}
		if !c.state.CompareAndSwap(from, stateActive) {
			return // closed by Shutdown
		}
		if err != nil {
			var ne net.Error
			if c.br.Buffered() == 0 || errors.As(err, &ne) && ne.Timeout() {
				return // as net/http: nothing to answer, or too slow
			}
		}
		var parsed http.Request
		if head == nil || !parseHead(head, &parsed) {
			handed = c.handOff(deadline)
			return
		}
		_, _ = c.br.Discard(len(head))
		_ = c.nc.SetReadDeadline(time.Time{})
		if !c.serveRequest(ctx, &parsed, remote) {
			return
		}
	}
}

// readHead returns the request head at the start of the buffer, blank line
// included, or nil when it does not fit the buffer, the read failed, or it
// ends in a bare LF (net/http's reading: a line ends at LF, a CR before it
// dropped), which the fast lane does not serve.
func (c *conn) readHead() ([]byte, error) {
	from := 0
	for {
		n := c.br.Buffered()
		if n > 0 {
			buf, _ := c.br.Peek(n)
			lf := bytes.Index(buf[from:], []byte("\n\n"))
			crlf := bytes.Index(buf[from:], []byte("\n\r\n"))
			switch {
			case lf >= 0 && (crlf < 0 || lf < crlf):
				return nil, nil
			case crlf >= 0:
				return buf[:from+crlf+3], nil
			}
			from = max(0, n-2)
			if n == c.br.Size() {
				return nil, nil
			}
		}
		if _, err := c.br.Peek(n + 1); err != nil {
			return nil, err
		}
	}
}

// handOff gives the connection to net/http, the bytes read so far first.
func (c *conn) handOff(deadline time.Time) bool {
	if c.s.shutting.Load() {
		return false
	}
	buf, _ := c.br.Peek(c.br.Buffered())
	replay := append([]byte(nil), buf...)
	if c.cr.hasPending {
		// A background read's byte the buffer had no room for yet.
		replay = append(replay, c.cr.pending[0])
	}
	hc := &handedConn{Conn: c.nc, replay: replay, headDeadline: deadline}
	c.state.Store(stateClosed)
	c.s.handed.Add(1)
	return c.s.handoff.give(hc)
}

// serveRequest runs the handler for req and says whether the connection
// may carry another request.
func (c *conn) serveRequest(ctx context.Context, parsed *http.Request, remote string) bool {
	c.s.served.Add(1)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req := parsed.WithContext(ctx)
	req.RemoteAddr = remote
	c.mu.Lock()
	c.inReq, c.reqStart, c.cancel = true, time.Now(), cancel
	c.mu.Unlock()

	w := &response{c: c, req: req, header: make(http.Header), contentLength: -1,
		isHEAD: req.Method == http.MethodHead, wantsClose: req.Close}
	w.w = bodyWriters.Get().(*bufio.Writer)
	w.w.Reset(chunkWriter{w})
	handler := c.s.srv.Handler
	if handler == nil {
		handler = http.DefaultServeMux
	}
	if !c.run(handler, w, req) {
		c.endRequest()
		_ = c.bw.Flush() // as net/http: what reached the connection's buffer
		return false
	}
	w.finish()
	gone := c.endRequest()
	return w.reusable() && !gone && c.s.keepAlives()
}

// run calls the handler, and recovers and logs a panic as net/http does.
func (c *conn) run(h http.Handler, w *response, req *http.Request) (ok bool) {
	defer func() {
		if err := recover(); err != nil {
			if err != http.ErrAbortHandler {
				const size = 64 << 10
				buf := make([]byte, size)
				buf = buf[:runtime.Stack(buf, false)]
				c.s.logf("http: panic serving %v: %v\n%s", req.RemoteAddr, err, buf)
			}
			ok = false
		}
	}()
	h.ServeHTTP(w, req)
	return true
}

// watch starts the background read when the request has run long enough.
// s.mu is held.
func (c *conn) watch(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.inReq || c.bgDone != nil || now.Sub(c.reqStart) < c.s.delay {
		return
	}
	c.startBackgroundRead()
}

// startBackgroundRead: c.mu is held. Bytes already buffered (a pipelined
// request) stay first: the byte read lands after them (connReader).
func (c *conn) startBackgroundRead() {
	c.bgDone = make(chan struct{})
	go c.backgroundRead(c.bgDone)
}

// closeNotify returns the request's CloseNotify channel and starts the
// background read if it has not started.
func (c *conn) closeNotify() <-chan bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.notifyCh == nil {
		c.notifyCh = make(chan bool, 1)
		if c.gone {
			c.notifyCh <- true
		}
	}
	if c.inReq && c.bgDone == nil {
		c.startBackgroundRead()
	}
	return c.notifyCh
}

// backgroundRead waits for the client to hang up while the handler runs,
// as net/http's: an error cancels the request; a byte (the next request,
// pipelined) is kept for the next head.
func (c *conn) backgroundRead(done chan struct{}) {
	defer close(done)
	n, err := c.nc.Read(c.cr.pending[:])
	c.mu.Lock()
	defer c.mu.Unlock()
	if n == 1 {
		c.cr.hasPending = true
	}
	if err != nil && !c.aborting {
		c.gone = true
		c.cancel()
		if c.notifyCh != nil {
			c.notifyCh <- true
		}
	}
}

// endRequest stops the background read, if any, and says whether the
// client went away.
func (c *conn) endRequest() bool {
	c.mu.Lock()
	c.inReq, c.notifyCh = false, nil
	done := c.bgDone
	c.aborting = done != nil
	c.mu.Unlock()
	if done != nil {
		_ = c.nc.SetReadDeadline(aLongTimeAgo)
		<-done
		_ = c.nc.SetReadDeadline(time.Time{})
		c.mu.Lock()
		c.bgDone, c.aborting = nil, false
		c.mu.Unlock()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gone
}

func (c *conn) flush() error { return c.bw.Flush() }

func (c *conn) abort() { _ = c.nc.Close() }

// connReader reads the connection, the byte a background read took first.
type connReader struct {
	c          *conn
	pending    [1]byte
	hasPending bool
}

func (r *connReader) Read(p []byte) (int, error) {
	if r.hasPending && len(p) > 0 {
		p[0], r.hasPending = r.pending[0], false
		return 1, nil
	}
	return r.c.nc.Read(p)
}

// connWriter notes the first write error and cancels the request, as
// net/http's checkConnErrorWriter.
type connWriter struct{ c *conn }

func (w connWriter) Write(p []byte) (int, error) {
	n, err := w.c.nc.Write(p)
	if err != nil {
		w.c.noteWriteError(err)
	}
	return n, err
}

func (c *conn) noteWriteError(err error) {
	if c.werr != nil {
		return
	}
	c.werr = err
	c.mu.Lock()
	if c.cancel != nil {
		c.cancel()
	}
	c.mu.Unlock()
}

// handedConn is a connection given to net/http: it reads the bytes the fast
// lane had read first, and keeps net/http's first read deadline (its
// request head's) within the fast lane's, so a slow head gets one
// ReadHeaderTimeout, not two.
type handedConn struct {
	net.Conn
	replay       []byte
	headDeadline time.Time
	setOnce      bool
}

func (h *handedConn) Read(p []byte) (int, error) {
	if len(h.replay) > 0 {
		n := copy(p, h.replay)
		h.replay = h.replay[n:]
		if len(h.replay) == 0 {
			h.replay = nil
		}
		return n, nil
	}
	return h.Conn.Read(p)
}

// CloseWrite lets net/http half-close before it closes (after a 431, or a
// request body left unread), as it does on its own connections.
func (h *handedConn) CloseWrite() error {
	if cw, ok := h.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("fastlane: no CloseWrite")
}

// ReadFrom keeps the connection's own (sendfile on TCP) for net/http's
// response.ReadFrom.
func (h *handedConn) ReadFrom(r io.Reader) (int64, error) { return io.Copy(h.Conn, r) }

func (h *handedConn) SetReadDeadline(t time.Time) error {
	if !h.setOnce {
		h.setOnce = true
		if !h.headDeadline.IsZero() && (t.IsZero() || t.After(h.headDeadline)) {
			t = h.headDeadline
		}
	}
	return h.Conn.SetReadDeadline(t)
}

// handoffListener is the listener net/http serves: it yields the
// connections the fast lane hands over.
type handoffListener struct {
	addr   net.Addr
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newHandoffListener(addr net.Addr) *handoffListener {
	return &handoffListener{addr: addr, conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *handoffListener) give(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.closed:
		return false
	}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }
