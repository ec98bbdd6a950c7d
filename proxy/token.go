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

// credentials are what a request authenticates with.
type credentials struct {
	token string
	masq  tokencache.Masquerade
}

// extractCredentials returns the request's access token and masquerade
// parameters, and ok=false whenever the homeserver itself should judge the
// request: no token (see requestToken) or an odd masquerade parameter.
func extractCredentials(r *http.Request) (credentials, bool) {
	var c credentials
	tok, q, ok := requestToken(r)
	if !ok {
		return c, false
	}
	c.token = tok
	for _, p := range [...]struct {
		name string
		dst  *string
	}{
		{paramUserID, &c.masq.UserID},
		{paramDeviceID, &c.masq.DeviceID},
		{paramMSC3202DeviceID, &c.masq.MSC3202DeviceID},
	} {
		v, has := q[p.name]
		if !has {
			continue
		}
		if len(v) != 1 || v[0] == "" {
			return c, false
		}
		*p.dst = v[0]
	}
	return c, true
}

// tokenOnly returns the access token of a request, or "" if it has none or an
// ambiguous one. Unlike extractCredentials it ignores masquerade parameters:
// it serves invalidation, which drops every variant of a token anyway.
func tokenOnly(r *http.Request) string {
	tok, _, _ := requestToken(r)
	return tok
}

// requestToken returns the request's access token and its parsed query, and
// ok=false (with no token) for no token, both a header and a query token,
// more than one of either, a header that is not exactly "Bearer <token>", or
// a query that does not parse.
//
// It mirrors Synapse, which takes the header only when it starts with the
// case-sensitive "Bearer " and rejects mixing both forms; being stricter than
// the homeserver costs a cache miss, being looser would answer a request the
// homeserver rejects.
func requestToken(r *http.Request) (string, url.Values, bool) {
	hdr := r.Header["Authorization"]
	if len(hdr) > 1 {
		return "", nil, false
	}
	var q url.Values
	if r.URL.RawQuery != "" {
		var err error
		if q, err = url.ParseQuery(r.URL.RawQuery); err != nil {
			return "", nil, false
		}
	}
	qtok, hasQ := q[paramAccessToken]
	switch {
	case len(hdr) == 1 && hasQ:
		return "", nil, false
	case len(hdr) == 1:
		if tok, found := strings.CutPrefix(hdr[0], "Bearer "); found && validToken(tok) {
			return tok, q, true
		}
	case len(qtok) == 1 && validToken(qtok[0]):
		return qtok[0], q, true
	}
	return "", nil, false
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
