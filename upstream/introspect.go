package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Introspector asks the Matrix Authentication Service (MAS) about an access
// token at its OAuth 2.0 introspection endpoint (RFC 7662), authenticating
// with the shared secret Synapse uses for the same call
// (matrix_authentication_service.secret; synapse/api/auth/mas.py). The proxy
// only wants to know until when a token lives: a whoami answer carries no
// expiry.
type Introspector struct {
	endpoint string
	secret   string
	rt       http.RoundTripper
	now      func() time.Time
}

// NewIntrospector returns an Introspector for endpoint (MAS's
// …/oauth2/introspect), sending requests through rt. secret is never logged
// nor put in an error.
func NewIntrospector(endpoint *url.URL, secret string, rt http.RoundTripper, now func() time.Time) (*Introspector, error) {
	if endpoint == nil || (endpoint.Scheme != "http" && endpoint.Scheme != "https") || endpoint.Host == "" {
		return nil, errors.New("upstream: introspection URL must be http:// or https:// with a host")
	}
	if secret == "" || rt == nil {
		return nil, errors.New("upstream: introspection needs a secret and a RoundTripper")
	}
	if now == nil {
		now = time.Now
	}
	return &Introspector{endpoint: endpoint.String(), secret: secret, rt: rt, now: now}, nil
}

// Introspection is what MAS said about a token.
type Introspection struct {
	Active bool
	// Exp is when the token stops being valid; zero when MAS named no
	// expiry.
	Exp time.Time
}

// Introspect asks about token. An HTTP answer other than 200, or a body
// that is not an introspection response, is an error: the caller falls
// back to what it would do without MAS.
func (in *Introspector) Introspect(ctx context.Context, token string) (Introspection, error) {
	form := url.Values{"token": {token}, "token_type_hint": {"access_token"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, in.endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return Introspection{}, errors.New("upstream: bad introspection request")
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer "+in.secret)
	start := in.now()
	c := Client{rt: in.rt}
	r, err := c.do(req)
	if err != nil {
		return Introspection{}, err
	}
	if r.Status != http.StatusOK {
		return Introspection{}, fmt.Errorf("upstream: introspection answered %d", r.Status)
	}
	return ParseIntrospection(r.Body, start)
}

// ParseIntrospection reads an RFC 7662 response. "active" is required;
// the expiry is "exp" (seconds since the epoch, RFC 7662) or, failing it,
// "expires_in" (seconds, the field Synapse reads, counted from sent: the
// token's clock started no later). Keys are matched exactly.
func ParseIntrospection(body []byte, sent time.Time) (Introspection, error) {
	var m map[string]json.RawMessage
	var in Introspection
	bad := errors.New("upstream: not an introspection response")
	if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["active"], &in.Active) != nil || string(m["active"]) == "null" {
		return Introspection{}, bad
	}
	if !in.Active {
		return in, nil
	}
	var secs int64
	switch exp, rel := m["exp"], m["expires_in"]; {
	case exp != nil && string(exp) != "null":
		if json.Unmarshal(exp, &secs) != nil || secs <= 0 || secs > 1<<40 {
			return Introspection{}, bad
		}
		in.Exp = time.Unix(secs, 0)
	case rel != nil && string(rel) != "null":
		if json.Unmarshal(rel, &secs) != nil || secs < 0 || secs > 1<<40 {
			return Introspection{}, bad
		}
		in.Exp = sent.Add(time.Duration(secs) * time.Second)
	}
	return in, nil
}
