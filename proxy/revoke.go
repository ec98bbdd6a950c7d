package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// maxBody bounds the request and response bodies the proxy reads to learn
// what a call revoked. Bodies are still forwarded whole; one over the bound
// is treated as unreadable, which invalidates more, never less.
const maxBody = 64 << 10

// Defaults of the bounds on revoking calls (Config).
const (
	defaultRevokeTimeout   = 60 * time.Second
	defaultBodyReadTimeout = 10 * time.Second
	defaultBodyMemory      = 16 << 20
)

// plan is what the proxy knows of a revoking call while it is under way. It
// travels to modifyResponse or proxyError in the request's context, and is
// settled exactly once.
type plan struct {
	route   route
	needs   needs
	start   time.Time
	auth    authState
	fromMAS bool
	caller  callerState
	token   tokencache.TokenID
	user    string
	device  string
	body    []byte
	bodyOK  bool
	settled atomic.Bool
	// written is set once the whole request was written to the homeserver
	// (httptrace's WroteRequest): before that it cannot have performed it.
	written atomic.Bool
	// clientBodyFailed is set when reading the client's body failed while
	// it was being forwarded (the client went away).
	clientBodyFailed atomic.Bool
}

type planKey struct{}

// serveRevoking forwards a call the table says may revoke tokens. The call
// goes on to its end even if the client hangs up (bounded by RevokeTimeout):
// the proxy must learn what the homeserver did.
func (p *Proxy) serveRevoking(w http.ResponseWriter, r *http.Request, rt route, c *caller) {
	c.auth = c.auth.forwarded(r)
	pl := &plan{route: rt, start: p.now(), fromMAS: p.mas.fromMAS(r)}
	for _, m := range rt.matches {
		pl.needs |= m.route.needs
	}
	form := formBody(r)
	if form != formNone {
		pl.needs |= needBody
	}
	if pl.needs&needBody != 0 {
		release, ok := p.readBody(w, r, pl)
		defer release()
		if !ok {
			return
		}
	}
	if form != formNone {
		// Synapse takes credentials from a form body too: read them
		// there, or refuse what cannot be read.
		if form != formURLEncoded || !pl.bodyOK {
			errFormBody.write(w)
			return
		}
		c.auth = c.auth.withForm(pl.body)
		c.ok = false // what identify found was for the query alone
	}
	pl.auth = c.auth.state
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), p.revokeTimeout)
	defer cancel()
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteRequest: func(i httptrace.WroteRequestInfo) {
		if i.Err == nil {
			pl.written.Store(true)
		}
	}})
	r = r.WithContext(context.WithValue(ctx, planKey{}, pl))

	if a := &c.auth; a.token != "" {
		pl.token, pl.caller = p.hasher.Token(a.token), callerToken
	}
	if pl.needs&needCaller != 0 && c.auth.state == authToken && !p.resolveCaller(w, r, c, pl) {
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &watchedBody{ReadCloser: r.Body, failed: &pl.clientBodyFailed}
	}
	p.rp.ServeHTTP(w, r)
}

// resolveCaller finds whose token makes a revoking call: from the cache, or
// with a whoami lookup carrying the same masquerade the homeserver will
// see. It returns false, having answered the client, when the homeserver
// cannot say: the call is then not forwarded, since what it would revoke
// could not be named.
func (p *Proxy) resolveCaller(w http.ResponseWriter, r *http.Request, c *caller, pl *plan) bool {
	a := &c.auth
	m, _ := a.masquerade()
	// An empty masquerade parameter is dropped: an ordinary token's
	// call is the same without it, an appservice's fails (no revocation).
	creds := credentials{token: a.token, masq: m}
	if creds.masq.UserID == "" && creds.masq.DeviceID == "" && creds.masq.MSC3202DeviceID == "" {
		creds.masq = tokencache.Masquerade{}
	}
	key := p.hasher.Key(creds.token, creds.masq)
	ans, res := c.answer, c.result
	if !c.ok || c.key != key {
		ans, res = p.cached(c, key, creds)
	}
	if res == tokencache.Miss {
		var err error
		if ans, res, err = p.resolve(r, c.clientAddr(), key, creds); err != nil {
			p.lookupFailed(w, r, err)
			return false
		}
	}
	p.m.lookupsByResult[res].Inc()
	switch ans.Kind {
	case tokencache.Positive:
		pl.user, pl.device, pl.caller = ans.UserID, ans.DeviceID, callerKnown
	case tokencache.Uncacheable:
		rp, _ := ans.Meta.(*replay)
		switch {
		case rp != nil && rp.status >= 500:
			writeAnswer(w, ans) // the homeserver's own trouble
			return false
		case ans.UserID != "":
			// A 200 the cache does not keep still names the caller: an
			// ordinary token with a masquerade Synapse ignored (the
			// call is then the token's own), or a user MAS locked.
			pl.user, pl.device, pl.caller = ans.UserID, ans.DeviceID, callerKnown
		}
	}
	// Otherwise an unknown or expired token (Synapse lets a soft-logged-out
	// token log out), or a refused masquerade: only that token's answers
	// can be named.
	return true
}

// readBody reads the body of a revoking call (up to maxBody) before it is
// forwarded, within BodyReadTimeout and the shared BodyMemory budget. A body
// that does not fit the budget or the bound is forwarded unread (the effect
// then invalidates more); one that does not arrive in time gets a 408 and
// is not forwarded. It returns false when it answered the client.
func (p *Proxy) readBody(w http.ResponseWriter, r *http.Request, pl *plan) (release func(), ok bool) {
	release = func() {}
	if r.Body == nil || r.Body == http.NoBody {
		pl.bodyOK = true
		return release, true
	}
	n := int64(maxBody + 1)
	if r.ContentLength > maxBody {
		return release, true // over the bound: unread
	}
	if r.ContentLength >= 0 {
		n = r.ContentLength
	}
	switch {
	case pl.fromMAS:
		// MAS's calls are read whatever clients hold: their bodies are
		// small, bounded by maxBody, and MAS sends few at once; read
		// unread, they would name no user and flush.
	case !p.bodyBudget.TryAcquire(n):
		p.m.bodiesUnread.Inc()
		return release, true
	default:
		release = func() { p.bodyBudget.Release(n) }
	}
	rc := http.NewResponseController(w)
	deadline := rc.SetReadDeadline(time.Now().Add(p.bodyReadTimeout)) == nil
	body, complete, err := peek(&r.Body, r.ContentLength)
	if err != nil {
		// The deadline stays: the server must not wait for the rest of
		// the body before it answers and closes.
		release()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			w.Header().Set("Connection", "close")
			errBodyTimeout.write(w)
		}
		// Otherwise the client went away; nothing was forwarded.
		return func() {}, false
	}
	if deadline {
		_ = rc.SetReadDeadline(time.Time{})
	}
	pl.body, pl.bodyOK = body, complete
	return release, true
}

// formKind is how Synapse reads a POST body's arguments.
type formKind uint8

const (
	formNone       formKind = iota
	formURLEncoded          // merged into the arguments
	formOther               // multipart, or a form type the proxy cannot tell apart
)

// formBody says whether Twisted would merge r's body into the request's
// arguments: a POST with a body whose first Content-Type is a form.
func formBody(r *http.Request) formKind {
	ct := r.Header["Content-Type"]
	if r.Method != http.MethodPost || len(ct) == 0 || r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return formNone
	}
	mt, _, err := mime.ParseMediaType(ct[0])
	switch {
	case err == nil && mt == "application/x-www-form-urlencoded":
		return formURLEncoded
	case err == nil && mt != "multipart/form-data":
		return formNone
	case err != nil && !strings.Contains(strings.ToLower(ct[0]), "form"):
		return formNone
	}
	return formOther
}

// peek reads a body of length n (-1: unknown) up to maxBody bytes, replaces
// *body with a reader that yields them again followed by the rest, and says
// whether that was all. The homeserver receives the body byte for byte.
func peek(body *io.ReadCloser, n int64) ([]byte, bool, error) {
	rc := *body
	var buf []byte
	var err error
	if n >= 0 && n <= maxBody {
		buf = make([]byte, n)
		_, err = io.ReadFull(rc, buf)
	} else {
		buf, err = io.ReadAll(io.LimitReader(rc, maxBody+1))
	}
	*body = readCloser{io.MultiReader(bytes.NewReader(buf), rc), rc}
	return buf, err == nil && len(buf) <= maxBody, err
}

// peekResponse reads up to maxBody bytes of a response body, as peek does.
func peekResponse(resp *http.Response) ([]byte, bool) {
	buf, complete, _ := peek(&resp.Body, -1)
	return buf, complete
}

type readCloser struct {
	io.Reader
	io.Closer
}

// watchedBody notes when the client's body breaks off while forwarded.
type watchedBody struct {
	io.ReadCloser
	failed *atomic.Bool
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.failed.Store(true)
	}
	return n, err
}

// settle applies what a revoking call invalidated, once: from
// modifyResponse with the homeserver's status, or from proxyError with
// none (status 0: the outcome is unknown, unless the client's own body
// broke off).
func (p *Proxy) settle(pl *plan, status int, resp *http.Response) {
	if !pl.settled.CompareAndSwap(false, true) {
		return
	}
	res := unknown
	switch {
	case status != 0:
		res = resultOf(status)
	case !pl.written.Load():
		res = refused // the homeserver never had the whole request
	}
	if res == unknown && pl.auth != authToken {
		// Without credentials the homeserver accepts (none, malformed,
		// non-ASCII: Synapse answers those 500) nothing was performed
		// that a token-less call could not have done on a success.
		res = refused
	}
	if res == refused {
		return
	}
	o := outcome{result: res, caller: pl.caller, token: pl.token, user: pl.user, device: pl.device,
		body: pl.body, bodyOK: pl.bodyOK, start: pl.start, newTokenHasher: p.hasher, serverName: p.mas.serverName(),
		fromMAS: pl.fromMAS}
	if pl.needs&needResponse != 0 && res == performed && resp != nil {
		o.response, o.responseOK = peekResponse(resp)
	}
	var d decision
	for _, m := range pl.route.matches {
		o.params, o.reason = m.params, routeReasons[m.route.name]
		m.route.effect(&o, &d)
	}
	p.apply(&d, pl.route.name)
}

// apply carries out a decision.
func (p *Proxy) apply(d *decision, rt routeName) {
	c := p.cache
	// Locks first: a lookup that checks after the lock stores nothing, one
	// that checked before is made stale by the drops below.
	for _, l := range d.locks {
		p.mas.locked.lock(l)
	}
	for _, l := range d.unlocks {
		p.mas.locked.unlock(l)
	}
	for _, inv := range d.drops {
		switch inv.Scope {
		case tokencache.ScopeToken:
			c.InvalidateToken(inv.Token, inv.Reason)
		case tokencache.ScopeDevice:
			c.InvalidateDevice(inv.UserID, inv.DeviceID, inv.Reason)
		case tokencache.ScopeUser:
			c.InvalidateUser(inv.UserID, inv.Token, inv.Reason)
		case tokencache.ScopeDevicesExcept:
			c.InvalidateDevicesExcept(inv.UserID, inv.Keep, inv.Reason)
		case tokencache.ScopeAll:
			n := c.Flush(inv.Reason)
			p.m.flushes[rt].Inc()
			p.log.Warn("flushed the token cache: a revoking call succeeded that names no token the proxy could resolve",
				zap.String("route", rt.String()), zap.Int("entries", n))
		}
	}
	for _, l := range d.limits {
		c.LimitLifetime(l.token, l.notAfter)
	}
}

// passiveInvalidation drops the token of a request the homeserver answered
// with 401: revoked behind the proxy's back (the admin API, another replica,
// expiry), or locked (M_USER_LOCKED). The one 401 that says nothing about
// the token is user-interactive auth asking for more (a body with "flows"
// or "session"); a 401 whose body cannot be read counts.
func (p *Proxy) passiveInvalidation(resp *http.Response) {
	a := readAuth(resp.Request)
	if a.state != authToken {
		return
	}
	body, complete := peekResponse(resp)
	var m map[string]json.RawMessage
	if complete && json.Unmarshal(body, &m) == nil {
		if _, uia := m["flows"]; uia {
			return
		}
		if _, uia := m["session"]; uia {
			return
		}
	}
	p.cache.InvalidateToken(p.hasher.Token(a.token), reasonUnknownToken)
}
