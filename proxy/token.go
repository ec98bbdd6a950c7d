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
// request: no token, both a header and a query token, more than one of
// either, a header that is not exactly "Bearer <token>", or an odd masquerade
// parameter.
//
// It mirrors Synapse, which takes the header only when it starts with the
// case-sensitive "Bearer " and rejects mixing both forms; being stricter than
// the homeserver costs a cache miss, being looser would answer a request the
// homeserver rejects.
func extractCredentials(r *http.Request) (credentials, bool) {
	var c credentials
	hdr := r.Header["Authorization"]
	if len(hdr) > 1 {
		return c, false
	}
	var q url.Values
	if r.URL.RawQuery != "" {
		var err error
		if q, err = url.ParseQuery(r.URL.RawQuery); err != nil {
			return c, false
		}
	}
	qtok, hasQ := q[paramAccessToken]
	switch {
	case len(hdr) == 1 && hasQ:
		return c, false
	case len(hdr) == 1:
		tok, found := strings.CutPrefix(hdr[0], "Bearer ")
		if !found || !validToken(tok) {
			return c, false
		}
		c.token = tok
	case len(qtok) == 1 && validToken(qtok[0]):
		c.token = qtok[0]
	default:
		return c, false
	}
	for _, p := range [...]struct {
		name string
		dst  *string
	}{
		{paramUserID, &c.masq.UserID},
		{paramDeviceID, &c.masq.DeviceID},
		{paramMSC3202DeviceID, &c.masq.MSC3202DeviceID},
	} {
		v, ok := q[p.name]
		if !ok {
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
	hdr := r.Header["Authorization"]
	if len(hdr) == 1 {
		if tok, ok := strings.CutPrefix(hdr[0], "Bearer "); ok && validToken(tok) {
			return tok
		}
		return ""
	}
	if len(hdr) > 1 || !strings.Contains(r.URL.RawQuery, paramAccessToken) {
		return ""
	}
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil || len(q[paramAccessToken]) != 1 || !validToken(q[paramAccessToken][0]) {
		return ""
	}
	return q[paramAccessToken][0]
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
