package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// The forward-auth endpoint answers an ingress's question "may this request
// to another service pass, and as whom?" from the token cache: the same
// keys, lookups, singleflight, invalidation and negative cache as whoami.
// It is served on its own listener (AUTH_ADDR), never on the client
// listener, so a client cannot reach it except through an ingress that asks
// it about the client's own request. Every request is charged to the rate
// limiter like a client request, keyed on the original client as a trusted
// ingress reports it (X-Forwarded-For from a TRUSTED_PROXIES peer).
//
// The token is read from the original request as Synapse reads it
// (readAuth's rules): the Authorization header the ingress copies to the
// auth request, or access_token in the original URI's query, never both.
// Masquerade parameters (user_id, device_id) are ignored: in the original
// URI they belong to the protected service, and the identity is the
// token's own. An appservice token thus passes as the appservice's sender.
//
// Answers: 200 with X-Matrix-User-ID, X-Matrix-Device-ID (empty when there
// is none) and X-Matrix-Is-Guest; 401 with a Matrix error and WWW-Authenticate for a
// missing or unknown token; 403 when the policy refuses a valid token; 429
// when the client's bucket is empty; 502/504 when the homeserver did not
// answer, never 401; 500 for an auth URL whose policy is invalid.

// Paths of the forward-auth listener.
const (
	// authPath takes the policy in its query; the original request comes
	// in headers (originHeaders).
	authPath = "/auth"
	// envoyPrefix is for Envoy's ext_authz, which appends the original
	// path and query to its path_prefix: /envoy/{policy}/{original path}.
	// {policy} is one segment, a query string ("-" for the default).
	envoyPrefix = "/envoy/"
)

// originHeaders are the headers by which ingresses report the original
// request's URI. Only its query matters (access_token); when several are
// present they must agree, or the request is refused as ambiguous.
var originHeaders = [...]struct {
	header, method string
	proxies        string // who sends it, for the reader
}{
	{"X-Original-Uri", "X-Original-Method", "nginx auth_request (by the usual proxy_set_header)"},
	{"X-Original-Url", "X-Original-Method", "ingress-nginx auth-url (an absolute URL)"},
	{"X-Forwarded-Uri", "X-Forwarded-Method", "Traefik ForwardAuth, Caddy forward_auth"},
}

// origin is the original request as an ingress reports it.
type origin struct {
	query     string // the original URI's raw query
	method    string // for the log only
	policy    string // the policy's raw query
	ambiguous bool   // origin headers disagree
	// leaked: the auth URL's query is the original request's, so the
	// ingress let the client choose the policy (Caddy's forward_auth keeps
	// the original query when its uri has none).
	leaked bool
}

// readOrigin finds the original request and the policy of an auth
// request; ok is false for a path the listener does not serve.
func readOrigin(r *http.Request) (o origin, ok bool) {
	path := r.URL.EscapedPath()
	switch {
	case path == authPath:
		o.policy = r.URL.RawQuery
		found := false
		for _, row := range originHeaders {
			vals := r.Header[row.header]
			if len(vals) == 0 {
				continue
			}
			q := uriQuery(vals[0])
			if len(vals) > 1 || (found && q != o.query) {
				o.ambiguous = true
			}
			if !found {
				o.query, o.method, found = q, r.Header.Get(row.method), true
			}
		}
		o.leaked = found && o.policy != "" && o.policy == o.query
		return o, true
	case strings.HasPrefix(path, envoyPrefix):
		seg, _, _ := strings.Cut(path[len(envoyPrefix):], "/")
		if seg != "-" {
			o.policy = seg
		}
		o.query, o.method = r.URL.RawQuery, r.Method
		return o, true
	}
	return o, false
}

// mayCarryToken says whether a query may hold access_token as Synapse
// reads it (its name may be percent-encoded), so that most original URIs
// are not parsed.
func mayCarryToken(query string) bool {
	return strings.Contains(query, paramAccessToken) || strings.IndexByte(query, '%') >= 0
}

// uriQuery is the query of a request URI, relative or absolute.
func uriQuery(uri string) string {
	uri, _, _ = strings.Cut(uri, "#")
	_, q, _ := strings.Cut(uri, "?")
	return q
}

// authResult is the result label of matrix_auth_proxy_auth_requests_total.
type authResult uint8

const (
	authAllowed authResult = iota
	authUnauthenticated
	authForbidden
	authError
	authRateLimited
	numAuthResults
)

var authResultLabels = [numAuthResults]string{
	authAllowed:         "allowed",
	authUnauthenticated: "unauthenticated",
	authForbidden:       "forbidden",
	authError:           "error",
	authRateLimited:     "rate_limited",
}

// Answers of the forward-auth endpoint other than the policy's refusals
// (authpolicy.go).
var (
	errAuthMissing   = matrixError{http.StatusUnauthorized, "M_MISSING_TOKEN", "Missing access token"}
	errAuthUnknown   = matrixError{http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "Invalid access token passed."}
	errAuthPolicy    = matrixError{http.StatusInternalServerError, "M_UNKNOWN", "The auth URL's policy is not valid; see the proxy's log"}
	errAuthForbidden = matrixError{http.StatusForbidden, "M_FORBIDDEN", "The homeserver refuses this token"}
	errAuthPath      = matrixError{http.StatusNotFound, "M_UNRECOGNIZED", "Use /auth?{policy} or /envoy/{policy}/"}
)

// Identity headers of an allowed answer, for the ingress to copy to the
// protected service.
const (
	headerUserID   = "X-Matrix-User-Id"
	headerDeviceID = "X-Matrix-Device-Id"
	headerIsGuest  = "X-Matrix-Is-Guest"
)

var (
	isGuestTrue  = []string{"true"}
	isGuestFalse = []string{"false"}
	noStore      = []string{"no-store"}
)

// ForwardAuth returns the handler of the forward-auth listener (AUTH_ADDR).
// Serve it on a listener of its own that only the ingress reaches, never
// on the client listener.
func (p *Proxy) ForwardAuth() http.Handler { return http.HandlerFunc(p.serveForwardAuth) }

func (p *Proxy) serveForwardAuth(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	res := authError
	var c caller
	defer func() {
		p.m.authRequests[res].Inc()
		if ce := p.log.Check(zap.DebugLevel, "forward-auth"); ce != nil {
			ce.Write(zap.String("result", authResultLabels[res]), zap.String("method", r.Method),
				zap.Duration("duration", time.Since(start)), zap.String("client", c.addr.String()))
		}
	}()
	o, ok := readOrigin(r)
	if !ok {
		errAuthPath.write(w)
		return
	}
	if o.leaked {
		p.misconfigured(w, errors.New("the auth URL's query is the original request's, so a client could choose its policy: "+
			"give the auth URL a query of its own (Caddy: uri /auth?guests=deny, not uri /auth)"))
		return
	}
	pl, err := p.policies.get(o.policy)
	if err != nil {
		p.misconfigured(w, err)
		return
	}
	c.r, c.trusted = r, p.trusted
	c.addr, c.hasAddr = clientAddr(r, p.trusted), true
	if o.ambiguous {
		c.auth.state = authInvalid
	} else {
		var q url.Values
		if mayCarryToken(o.query) {
			q = synapseQuery(o.query)
		}
		c.auth = authOf(r.Header["Authorization"], q)
	}
	if c.auth.state == authToken && p.mas.isSecret(c.auth.token) {
		// MAS's secret is no user's token.
		c.auth.state = authInvalid
	}
	if c.auth.state == authToken {
		c.creds, c.ok = credentials{token: c.auth.token}, true
		c.key = p.hasher.Key(c.creds.token, tokencache.Masquerade{})
		c.answer, c.result = p.cached(&c, c.key, c.creds)
	}
	if p.limiter != nil && !p.allow(w, r, &c) {
		res = authRateLimited
		return
	}
	res = p.decide(w, r, &c, pl)
}

// misconfigured refuses a request to an auth URL that is configured wrong,
// and says so in the log: at error level the first time, then at debug
// level (every request to it would otherwise log a line).
func (p *Proxy) misconfigured(w http.ResponseWriter, err error) {
	lvl := zap.DebugLevel
	if p.warnedPolicy.CompareAndSwap(false, true) {
		lvl = zap.ErrorLevel
	}
	if ce := p.log.Check(lvl, "forward-auth: the auth URL is not valid; every request to it is refused"); ce != nil {
		ce.Write(zap.Error(err))
	}
	errAuthPolicy.write(w)
}

// decide answers an auth request whose credentials and cached answer are
// known, and returns its result.
func (p *Proxy) decide(w http.ResponseWriter, r *http.Request, c *caller, pl *authPolicy) authResult {
	switch c.auth.state {
	case authNone:
		w.Header().Set("WWW-Authenticate", `Bearer realm="matrix"`)
		errAuthMissing.write(w)
		return authUnauthenticated
	case authInvalid:
		return unauthenticated(w)
	}
	a, res := c.answer, c.result
	if res == tokencache.Miss {
		var err error
		if a, res, err = p.resolve(r, c.addr, c.key, c.creds); err != nil {
			p.lookupFailed(w, r, err)
			return authError
		}
	}
	p.m.lookupsByResult[res].Inc()
	switch a.Kind {
	case tokencache.Negative:
		return unauthenticated(w)
	case tokencache.Uncacheable:
		switch st := a.Meta.(*replay).status; st {
		case http.StatusOK:
			if a.UserID != "" {
				// A user MAS locked, or a token MAS calls inactive
				// (mas.go): about to be revoked.
				return unauthenticated(w)
			}
			p.upstreamFailed(w, r, upstream.KindOther, errors.New("whoami answered 200 without a user"))
			return authError
		case http.StatusUnauthorized: // soft-logged-out: no good here either
			return unauthenticated(w)
		case http.StatusForbidden:
			errAuthForbidden.write(w)
			return authForbidden
		default:
			p.upstreamFailed(w, r, upstream.KindOther, fmt.Errorf("whoami answered %d", st))
			return authError
		}
	}
	guest := a.Meta.(*replay).guest
	if why := pl.refusal(a.UserID, guest); why != nil {
		why.write(w)
		return authForbidden
	}
	if pl.admins {
		admin, err := p.isAdmin(r, c, a)
		switch {
		case err == errTokenGone:
			return unauthenticated(w)
		case err != nil:
			p.lookupFailed(w, r, err)
			return authError
		case !admin:
			errAuthNotAdmin.write(w)
			return authForbidden
		}
	}
	h := w.Header()
	// One allocation for both values. The device is always sent, empty
	// without one (an appservice's sender): an ingress that copies only
	// the headers an answer has (Envoy, Caddy) would otherwise let a
	// client's own X-Matrix-Device-ID through.
	ids := []string{a.UserID, a.DeviceID}
	h[headerUserID] = ids[0:1:1]
	h[headerDeviceID] = ids[1:2:2]
	if guest {
		h[headerIsGuest] = isGuestTrue
	} else {
		h[headerIsGuest] = isGuestFalse
	}
	h["Cache-Control"] = noStore
	w.WriteHeader(http.StatusOK)
	return authAllowed
}

func unauthenticated(w http.ResponseWriter) authResult {
	w.Header().Set("WWW-Authenticate", `Bearer realm="matrix", error="invalid_token"`)
	errAuthUnknown.write(w)
	return authUnauthenticated
}

// isGuest reads is_guest from a whoami body (Synapse sends it with every
// answer; a homeserver that does not has no guests to report). It is read
// once per answer, when the answer is made (answerFor).
func isGuest(body []byte) bool {
	var v struct {
		IsGuest bool `json:"is_guest"`
	}
	return json.Unmarshal(body, &v) == nil && v.IsGuest
}

// adminVerdict is the Meta of a cached admin answer.
type adminVerdict struct{ admin bool }

var (
	verdictAdmin    = &adminVerdict{true}
	verdictNotAdmin = &adminVerdict{false}
)

// errTokenGone: the homeserver called the token unknown while the admin
// status was asked (it was revoked since whoami answered).
var errTokenGone = errors.New("token revoked during the admin check")

// isAdmin says whether the user of whoami answer who (for c's token) is a
// homeserver admin, asking the homeserver with the token itself. The answer
// is cached beside the whoami answer, under the token's admin aspect key:
// the same singleflight, lifetime and invalidations (the token's, its
// user's, its device's), and bound to the client when the whoami answer is.
func (p *Proxy) isAdmin(r *http.Request, c *caller, who tokencache.Answer) (bool, error) {
	key := p.hasher.Aspect(c.key, tokencache.AspectAdmin)
	bound := p.hasher.Bind(key, c.addr)
	// A hit is looked up before the lookup's closure is made: made, it
	// escapes, and would cost an allocation on every request.
	for _, k := range [...]tokencache.Key{key, bound} {
		if a, res := p.cache.Get(k); res != tokencache.Miss {
			return adminOf(a)
		}
	}
	token := c.creds.token // not c: the closure would move every caller to the heap
	a, _, err := p.cache.ResolveBound(r.Context(), key, bound, func(ctx context.Context) (tokencache.Answer, error) {
		fwd := http.Header{}
		p.setForwarded(fwd, r)
		reply, err := p.lookups.AdminStatus(ctx, token, who.UserID, fwd)
		if err != nil {
			return tokencache.Answer{}, err
		}
		verdict := verdictNotAdmin
		switch reply.Status {
		case http.StatusOK:
			// Synapse answers this endpoint only for an admin caller, and
			// the user asked about is the caller: a 200 is the verdict,
			// whatever "admin" says. (With MAS, Synapse decides who is
			// an admin by the token's scope, urn:synapse:admin:*, while
			// the body reports the users table's flag, which MAS never
			// sets: an admin reads {"admin": false} there.)
			verdict = verdictAdmin
		case http.StatusForbidden: // "You are not a server admin"
		case http.StatusUnauthorized:
			p.cache.InvalidateToken(key.Token, reasonUnknownToken)
			return tokencache.Answer{Kind: tokencache.Uncacheable, Meta: errTokenGone}, nil
		default:
			return tokencache.Answer{}, fmt.Errorf("admin status: homeserver answered %d", reply.Status)
		}
		// The body holds user and device so the cache indexes the answer
		// by them (see tokencache.Answer.Body).
		body, _ := json.Marshal(struct {
			User   string `json:"user_id"`
			Device string `json:"device_id"`
			Admin  bool   `json:"admin"`
		}{who.UserID, who.DeviceID, verdict.admin})
		return tokencache.Answer{Kind: tokencache.Positive, UserID: who.UserID, DeviceID: who.DeviceID,
			Body: string(body), Meta: verdict, Bound: who.DeviceID == ""}, nil
	})
	if err != nil {
		return false, err
	}
	return adminOf(a)
}

// adminOf reads an admin answer.
func adminOf(a tokencache.Answer) (bool, error) {
	if a.Kind != tokencache.Positive {
		return false, errTokenGone
	}
	v, ok := a.Meta.(*adminVerdict)
	return ok && v.admin, nil
}
