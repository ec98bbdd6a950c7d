// Package proxy is the HTTP face of matrix-auth-proxy: it answers
// GET /account/whoami from the token cache, forwards everything else to the
// homeserver with an httputil.ReverseProxy (or, for a body-less GET or HEAD,
// forward.go's equivalent that costs less), drops cache entries when a
// forwarded call revoked tokens, and counts it all in Prometheus metrics.
// ForwardAuth (forwardauth.go) answers ingresses' forward-auth requests for
// other services from the same cache.
//
// routes.go is the one table of which routes are answered, which revoke what
// and what passes through. The package does not decide what "recently
// answered" means for readiness, parse configuration or own listeners: that
// is cmd/matrix-auth-proxy's wiring.
package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/semaphore"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// Config holds what a Proxy is built from.
type Config struct {
	// Upstream is the homeserver's base URL. Required.
	Upstream *url.URL
	// Transport carries every request to the homeserver, proxied ones and
	// the proxy's own whoami lookups. Required; upstream.NewTransport makes
	// a suitable one. It must report httptrace's WroteRequest for revoking
	// calls (net/http's Transport does): a call without an answer counts as
	// performed only once it was written whole.
	Transport http.RoundTripper
	// Hasher derives cache keys from tokens. Nil means a random key, which
	// is right for a single replica.
	Hasher *tokencache.Hasher
	// Cache sizes the token cache. OnDrop is set by New (metrics).
	Cache tokencache.Config
	// Logger receives warnings and, at debug level, one line per request.
	// Tokens never reach it. Nil means no logging.
	Logger *zap.Logger
	// Registerer receives the proxy's metrics. Required: pass the proxy's
	// own registry, not the global one.
	Registerer prometheus.Registerer
	// TrustedProxies are the peers (an ingress controller, a load
	// balancer) whose X-Forwarded-For is believed; see clientAddr. Empty:
	// the connection's peer is the client.
	TrustedProxies []netip.Prefix
	// RateLimit limits clients at the edge; the zero value disables it.
	RateLimit RateLimitConfig
	// RevokeTimeout bounds a call that may revoke tokens. Such a call is
	// detached from its client, so that a client hanging up cannot keep
	// the proxy from learning what the homeserver did; past the bound
	// the outcome is unknown and counted as a success. 0 means 60s.
	RevokeTimeout time.Duration
	// BodyReadTimeout bounds the time a revoking call's body may take to
	// arrive before it is forwarded (the proxy reads it to learn what it
	// revokes); past it the client gets a 408. 0 means 10s.
	BodyReadTimeout time.Duration
	// BodyMemory bounds the bytes of all revoking calls' bodies held at
	// once; a body that does not fit is forwarded unread, and its call
	// then invalidates more (the caller's whole user). 0 means 16 MiB.
	BodyMemory int64

	// ServerName is the homeserver's name, which the Matrix Authentication
	// Service's calls leave out (they name localparts). Empty: learned
	// from the first positive whoami answer.
	ServerName string
	// MASSecret is the secret the Matrix Authentication Service and
	// Synapse share. Requests carrying it as their bearer token are not
	// rate-limited. Never logged.
	MASSecret string
	// Introspector, if set, is asked for the expiry of a MAS token at its
	// first lookup (see mas.go); nil: answers live CACHE_TTL.
	Introspector Introspector
	// MaxLockedUsers bounds the users MAS locked that the proxy
	// remembers; 0 means 10000.
	MaxLockedUsers int
}

// Proxy is an http.Handler for the client-facing listener.
type Proxy struct {
	target  *url.URL
	lookups *upstream.Client
	cache   *tokencache.Cache
	hasher  *tokencache.Hasher
	rp      *httputil.ReverseProxy
	// direct is the Transport when forward may be used instead of rp
	// (forward.go): an *upstream.Transport to an http:// homeserver.
	direct  *upstream.Transport
	buffers *bufferPool // rp's and forward's copy buffers
	log     *zap.Logger
	m       *metrics
	replays replayInterner
	now     func() time.Time
	writers sync.Pool // of *statusWriter
	trusted []netip.Prefix
	limiter *limiter // nil: no rate limiting
	mas     *mas
	// policies are the forward-auth policies seen (forwardauth.go).
	policies policyCache
	// warnedXFF is set once the misconfiguration warning of allow was
	// logged.
	warnedXFF atomic.Bool
	// warnedPolicy is set once an invalid forward-auth URL was logged at
	// error level.
	warnedPolicy atomic.Bool

	revokeTimeout   time.Duration
	bodyReadTimeout time.Duration
	bodyBudget      *semaphore.Weighted
}

// New returns a Proxy, or an error naming what is missing or wrong.
func New(cfg Config) (*Proxy, error) {
	if cfg.Transport == nil || cfg.Registerer == nil {
		return nil, errors.New("proxy: Transport and Registerer are required")
	}
	lookups, err := upstream.New(cfg.Upstream, cfg.Transport)
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: cfg.Upstream, lookups: lookups, hasher: cfg.Hasher, log: cfg.Logger, now: time.Now,
		trusted: cfg.TrustedProxies, revokeTimeout: cfg.RevokeTimeout, bodyReadTimeout: cfg.BodyReadTimeout}
	if cfg.RevokeTimeout < 0 || cfg.BodyReadTimeout < 0 || cfg.BodyMemory < 0 {
		return nil, errors.New("proxy: RevokeTimeout, BodyReadTimeout and BodyMemory must not be negative")
	}
	if p.revokeTimeout == 0 {
		p.revokeTimeout = defaultRevokeTimeout
	}
	if p.bodyReadTimeout == 0 {
		p.bodyReadTimeout = defaultBodyReadTimeout
	}
	if cfg.BodyMemory == 0 {
		cfg.BodyMemory = defaultBodyMemory
	}
	p.bodyBudget = semaphore.NewWeighted(cfg.BodyMemory)
	if p.log == nil {
		p.log = zap.NewNop()
	}
	if cfg.Cache.Now != nil {
		p.now = cfg.Cache.Now
	}
	if p.hasher == nil {
		if p.hasher, err = tokencache.NewHasher(nil); err != nil {
			return nil, err
		}
	}
	var cacheLen func() int
	if p.m, err = newMetrics(cfg.Registerer, func() int { return cacheLen() }); err != nil {
		return nil, err
	}
	cc := cfg.Cache
	cc.OnDrop = p.m.dropped
	if p.cache, err = tokencache.New(cc); err != nil {
		return nil, err
	}
	cacheLen = p.cache.Len
	if p.mas, err = newMAS(cfg, cfg.Registerer); err != nil {
		return nil, err
	}
	if p.limiter, err = newLimiter(cfg.RateLimit, p.now); err != nil {
		return nil, err
	}
	p.writers.New = func() any { return new(statusWriter) }
	if t, ok := cfg.Transport.(*upstream.Transport); ok && p.target.Scheme == "http" && p.target.Host != "" {
		p.direct = t
	}
	p.buffers = newBufferPool()
	p.rp = &httputil.ReverseProxy{
		Rewrite:        p.rewrite,
		Transport:      cfg.Transport,
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.proxyError,
		BufferPool:     p.buffers,
		ErrorLog:       zap.NewStdLog(p.log.Named("reverseproxy")),
	}
	return p, nil
}

// Cache returns the token cache, for wiring that must reach it (tests, a
// future invalidation bus).
func (p *Proxy) Cache() *tokencache.Cache { return p.cache }

// caller is what the proxy knows about who sent a request, worked out once
// per request: the client's address, its credentials as the homeserver
// reads them and, if the cache holds one, the answer for them.
type caller struct {
	r       *http.Request
	trusted []netip.Prefix
	addr    netip.Addr // as clientAddr finds it, once asked for (see clientAddr)
	hasAddr bool
	auth    requestAuth
	creds   credentials
	ok      bool // creds are usable for the cache
	key     tokencache.Key
	answer  tokencache.Answer
	result  tokencache.Result
}

// identify works out who sends a request and looks its credentials up in
// the cache, without asking the homeserver.
func (p *Proxy) identify(r *http.Request, c *caller) {
	c.r, c.trusted = r, p.trusted
	c.auth = readAuth(r)
	if c.creds, c.ok = c.auth.credentials(); c.ok {
		c.key = p.hasher.Key(c.creds.token, c.creds.masq)
		c.answer, c.result = p.cached(c, c.key, c.creds)
	}
}

// clientAddr is the client's address (see the function of that name),
// worked out on first use: an ordinary user's cache hit without rate
// limiting needs none.
func (c *caller) clientAddr() netip.Addr {
	if !c.hasAddr {
		c.addr, c.hasAddr = clientAddr(c.r, c.trusted), true
	}
	return c.addr
}

// ServeHTTP routes a client request (see routes.go).
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rt := classify(r)
	var c caller
	if rt.whoami || len(rt.matches) > 0 || p.limiter != nil {
		p.identify(r, &c)
	}
	sw := p.writers.Get().(*statusWriter)
	sw.ResponseWriter, sw.code = w, 0
	defer func() {
		code := sw.code
		if code == 0 {
			code = 499 // nothing was written: the client went away
		}
		elapsed := time.Since(start)
		p.m.observe(rt.name, code, elapsed.Seconds())
		if ce := p.log.Check(zap.DebugLevel, "request"); ce != nil {
			ce.Write(zap.String("route", rt.name.String()), zap.String("method", r.Method),
				zap.String("path", logPath(r.URL.EscapedPath())), zap.String("query", logQuery(r.URL.RawQuery)),
				zap.Int("status", code), zap.Duration("duration", elapsed), zap.String("client", p.clientIP(r)))
		}
		sw.ResponseWriter = nil
		p.writers.Put(sw)
	}()
	if p.limiter != nil && !p.allow(sw, r, &c) {
		return
	}
	switch {
	case rt.whoami:
		p.serveWhoami(sw, r, &c)
	case len(rt.matches) > 0:
		p.serveRevoking(sw, r, rt, &c)
	case p.forwardable(r):
		p.forward(sw, r)
	default:
		p.rp.ServeHTTP(sw, r)
	}
}

// allow charges a request to its bucket, and answers 429 itself when the
// bucket is empty: a limited request never reaches the homeserver.
func (p *Proxy) allow(w http.ResponseWriter, r *http.Request, c *caller) bool {
	addr := c.clientAddr()
	if inAny(addr, p.limiter.exemptCIDRs) || p.mas.fromMAS(r) {
		return true
	}
	key, kind := ipKey(addr), limitedByIP
	if c.result == tokencache.Hit {
		if _, exempt := p.limiter.exemptUsers[c.answer.UserID]; exempt {
			return true
		}
		key, kind = bucketKey{user: c.answer.UserID, device: c.answer.DeviceID}, limitedByUser
	}
	ok, wait := p.limiter.allow(key)
	if !ok {
		p.m.rateLimited[kind].Inc()
		writeRateLimited(w, wait)
		if kind == limitedByIP && len(r.Header["X-Forwarded-For"]) > 0 && addr == parseAddr(r.RemoteAddr) &&
			p.warnedXFF.CompareAndSwap(false, true) {
			// Most likely an ingress whose clients now share one bucket.
			p.log.Warn("rate-limited a peer that sends X-Forwarded-For but is not in TRUSTED_PROXIES: "+
				"if it is your ingress or load balancer, add its range to TRUSTED_PROXIES, or all its clients share one bucket",
				zap.String("peer", addr.String()))
		}
	}
	return ok
}

// rewrite is the ReverseProxy's Rewrite. ReverseProxy has already removed
// hop-by-hop headers and the client's own X-Forwarded-*/Forwarded headers
// from pr.Out, and setForwarded writes the client address found by
// clientAddr: a client cannot choose the address the homeserver records
// (Synapse takes the first X-Forwarded-For entry, so appending would not do).
func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	pr.SetURL(p.target)
	// ReverseProxy re-encodes a query it cannot parse, dropping the odd
	// parts; the homeserver should see what the client sent. The proxy
	// never acts on a query it cannot parse, so there is nothing to smuggle.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	p.setForwarded(pr.Out.Header, pr.In)
}

// Shared, never modified: saves an allocation per request.
var (
	protoHTTP  = []string{"http"}
	protoHTTPS = []string{"https"}
)

// setForwarded sets X-Forwarded-For/Proto/Host for a request to the
// homeserver on behalf of in.
func (p *Proxy) setForwarded(h http.Header, in *http.Request) {
	if ip := p.clientIP(in); ip != "" {
		h["X-Forwarded-For"] = []string{ip}
	}
	if in.TLS != nil {
		h["X-Forwarded-Proto"] = protoHTTPS
	} else {
		h["X-Forwarded-Proto"] = protoHTTP
	}
	if in.Host != "" {
		h["X-Forwarded-Host"] = []string{in.Host}
	}
}

// clientIP is the address of the client, as clientAddr finds it.
func (p *Proxy) clientIP(r *http.Request) string {
	if a := clientAddr(r, p.trusted); a.IsValid() {
		return a.String()
	}
	return ""
}

// proxyError is the ReverseProxy's ErrorHandler: the homeserver gave no HTTP
// answer. A timeout is a 504, anything else a 502, both with a Matrix error;
// never a 401, which would log the client out. A client that went away gets
// nothing and makes no noise. A revoking call without an answer may still
// have been performed: its plan is settled as such (its context is detached
// from the client, so only its own deadline ends it).
func (p *Proxy) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	kind := upstream.ErrorKind(err)
	if pl, ok := r.Context().Value(planKey{}).(*plan); ok {
		p.settle(pl, 0, nil)
		if pl.clientBodyFailed.Load() {
			return // the client went away mid-body
		}
	} else if r.Context().Err() != nil || kind == upstream.KindCanceled {
		return
	}
	if kind == upstream.KindCanceled && r.Context().Err() == context.DeadlineExceeded {
		kind = upstream.KindTimeout
	}
	p.upstreamFailed(w, r, kind, err)
}

func (p *Proxy) upstreamFailed(w http.ResponseWriter, r *http.Request, kind string, err error) {
	p.m.upstreamError(kind)
	p.log.Warn("homeserver request failed", zap.String("method", r.Method),
		zap.String("path", logPath(r.URL.EscapedPath())), zap.String("kind", kind), zap.Error(err))
	if kind == upstream.KindTimeout {
		errGatewayTimeout.write(w)
		return
	}
	errBadGateway.write(w)
}

// modifyResponse is the ReverseProxy's ModifyResponse: it applies
// invalidations once the homeserver has answered, before the client sees the
// answer, so a client that logs out and asks whoami at once gets a 401.
func (p *Proxy) modifyResponse(resp *http.Response) error {
	if resp.StatusCode == http.StatusUnauthorized {
		p.passiveInvalidation(resp)
	}
	if pl, ok := resp.Request.Context().Value(planKey{}).(*plan); ok {
		p.settle(pl, resp.StatusCode, resp)
	}
	return nil
}

// statusWriter remembers the status code for metrics. It unwraps, so the
// ReverseProxy's http.ResponseController still reaches Flush and Hijack
// (WebSocket upgrades) of the real writer.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 && code >= 200 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// WriteString passes a string body on without copying it, when the writer
// underneath can take one (net/http's can).
func (w *statusWriter) WriteString(s string) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return io.WriteString(w.ResponseWriter, s)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// bufferPool recycles the ReverseProxy's copy buffers (32 KiB each) instead
// of allocating one per proxied body. A bounded free list rather than a
// sync.Pool: putting a slice into a sync.Pool allocates its header.
type bufferPool struct{ free chan []byte }

func newBufferPool() *bufferPool { return &bufferPool{free: make(chan []byte, 256)} }

func (b *bufferPool) Get() []byte {
	select {
	case buf := <-b.free:
		return buf
	default:
		return make([]byte, 32<<10)
	}
}

func (b *bufferPool) Put(buf []byte) {
	select {
	case b.free <- buf:
	default: // full: let the GC have it
	}
}
