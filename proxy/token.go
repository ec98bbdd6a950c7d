package proxy

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// Query parameters of the Client-Server API that carry credentials or
// appservice identity assertion ("Identity assertion", "Using access tokens").
const (
	paramAccessToken     = "access_token"
	paramUserID          = "user_id"
	paramDeviceID        = "device_id"
	paramMSC3202DeviceID = "org.matrix.msc3202.device_id"
)

// authState is what Synapse makes of a request's credentials
// (synapse/api/auth/base.py, get_access_token_from_request).
type authState uint8

const (
	// authNone: no Authorization header and no access_token parameter.
	authNone authState = iota
	// authToken: one token, read as Synapse reads it.
	authToken
	// authInvalid: credentials Synapse rejects with a 401 before looking
	// at any token (both forms, several headers, a header that is not
	// "Bearer <token>"), or a token the proxy will not judge (over 1 KiB,
	// control characters). token is then the best guess, possibly "".
	authInvalid
)

// requestAuth is a request's credentials as Synapse reads them.
type requestAuth struct {
	state authState
	token string
	// query is the request's arguments as Synapse parses them (the query;
	// see withForm for form bodies); nil when empty.
	query url.Values
	// header is the Authorization header the homeserver will receive.
	header []string
}

// readAuth reads a request's credentials the way Synapse does: the one
// Authorization header if there is any ("Bearer", one space, the token;
// never together with access_token), else the first access_token value of
// the query as Twisted parses it (synapseQuery). Being stricter than the
// homeserver costs a cache miss; being looser would answer a request the
// homeserver rejects, or let a client make the proxy name the wrong token.
func readAuth(r *http.Request) requestAuth {
	var q url.Values
	if r.URL.RawQuery != "" {
		q = synapseQuery(r.URL.RawQuery)
	}
	return authOf(r.Header["Authorization"], q)
}

// forwarded is a: the credentials of r as the homeserver will see them
// once forwarded. An Authorization header that Connection names is
// hop-by-hop: the proxy removes it before forwarding, so the homeserver
// judges the request without it. (Whoami, which the proxy answers itself,
// needs no such care.)
func (a requestAuth) forwarded(r *http.Request) requestAuth {
	if len(a.header) > 0 && connectionNames(r.Header, "Authorization") {
		return authOf(nil, a.query)
	}
	return a
}

// connectionNames reports whether the Connection header names field.
func connectionNames(h http.Header, field string) bool {
	for _, v := range h["Connection"] {
		for f := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), field) {
				return true
			}
		}
	}
	return false
}

// withForm returns the credentials of a request whose body is a form
// Synapse reads (Twisted merges an application/x-www-form-urlencoded POST
// body into the request's arguments, each key replacing the query's).
func (a *requestAuth) withForm(body []byte) requestAuth {
	q := url.Values{}
	for k, v := range a.query {
		q[k] = v
	}
	for k, v := range synapseQuery(string(body)) {
		q[k] = v
	}
	return authOf(a.header, q)
}

// authOf reads the credentials of a request with Authorization header hdr
// and arguments q.
func authOf(hdr []string, q url.Values) requestAuth {
	a := requestAuth{query: q, header: hdr}
	qtok, hasQ := a.query[paramAccessToken]
	switch {
	case len(hdr) == 0 && !hasQ:
		a.state = authNone
		return a
	case len(hdr) == 0:
		a.token = qtok[0]
	default:
		tok, found := strings.CutPrefix(hdr[0], "Bearer ")
		a.token = tok
		if !found || hasQ || len(hdr) > 1 {
			a.state = authInvalid
			return a
		}
	}
	a.state = authToken
	if !validToken(a.token) {
		a.state = authInvalid
	}
	return a
}

// masquerade returns the appservice identity assertion of the request: the
// first value of each parameter, as Synapse takes it (get_appservice_user).
// odd is set when a parameter is present with an empty first value: Synapse
// then answers an appservice token differently from a request without it
// (an error), and an ordinary token the same.
func (a *requestAuth) masquerade() (m tokencache.Masquerade, odd bool) {
	for _, p := range [...]struct {
		name string
		dst  *string
	}{
		{paramUserID, &m.UserID},
		{paramDeviceID, &m.DeviceID},
		{paramMSC3202DeviceID, &m.MSC3202DeviceID},
	} {
		if v, has := a.query[p.name]; has {
			if v[0] == "" {
				odd = true
			}
			*p.dst = v[0]
		}
	}
	return m, odd
}

// credentials are what a request authenticates with.
type credentials struct {
	token string
	masq  tokencache.Masquerade
}

// extractCredentials returns the request's access token and masquerade
// parameters, and ok=false whenever the homeserver itself should judge the
// request: no usable token (see readAuth) or an empty masquerade parameter.
func extractCredentials(r *http.Request) (credentials, bool) {
	a := readAuth(r)
	return a.credentials()
}

// credentials are the cache's view of a: see extractCredentials.
func (a *requestAuth) credentials() (credentials, bool) {
	if a.state != authToken {
		return credentials{}, false
	}
	m, odd := a.masquerade()
	if odd {
		return credentials{}, false
	}
	return credentials{token: a.token, masq: m}, true
}

// validToken accepts what a homeserver can have issued: non-empty printable
// ASCII without spaces, at most 1 KiB. Synapse's tokens are
// "syt_<base64>_<random>_<crc>", Dendrite's and Conduit's are base64 too.
func validToken(tok string) bool {
	if tok == "" || len(tok) > 1024 {
		return false
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] <= ' ' || tok[i] > '~' {
			return false
		}
	}
	return true
}

// masqueradeQuery returns the masquerade parameters as query values for the
// homeserver, or nil.
func masqueradeQuery(m tokencache.Masquerade) url.Values {
	if m.IsZero() {
		return nil
	}
	q := url.Values{}
	if m.UserID != "" {
		q.Set(paramUserID, m.UserID)
	}
	if m.DeviceID != "" {
		q.Set(paramDeviceID, m.DeviceID)
	}
	if m.MSC3202DeviceID != "" {
		q.Set(paramMSC3202DeviceID, m.MSC3202DeviceID)
	}
	return q
}
