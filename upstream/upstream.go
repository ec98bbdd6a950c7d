// Package upstream talks to the homeserver: it builds the tuned Transport that
// every proxied request uses, asks the homeserver who a token belongs to, and
// probes whether the homeserver is up.
//
// It knows HTTP and the few Matrix endpoints it calls; it knows nothing about
// caching (package tokencache) or about what clients asked for (package
// proxy).
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
)

// Client makes the proxy's own calls to the homeserver.
type Client struct {
	base *url.URL
	rt   http.RoundTripper
}

// New returns a Client for the homeserver at base (scheme and host, and an
// optional path prefix), sending requests through rt.
func New(base *url.URL, rt http.RoundTripper) (*Client, error) {
	if base == nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, errors.New("upstream: base URL must be http:// or https:// with a host")
	}
	if rt == nil {
		return nil, errors.New("upstream: nil RoundTripper")
	}
	b := *base
	b.Path = strings.TrimSuffix(b.Path, "/")
	b.RawPath, b.RawQuery, b.Fragment = "", "", ""
	return &Client{base: &b, rt: rt}, nil
}

// Reply is a homeserver's answer, with its body read in full.
type Reply struct {
	Status int
	Header http.Header
	Body   []byte
}

// MaxReplyBody bounds the body of a whoami or versions reply; both are a few
// hundred bytes in practice.
const MaxReplyBody = 64 << 10

// ErrReplyTooLarge is returned for a reply body over MaxReplyBody.
var ErrReplyTooLarge = errors.New("upstream: reply body over 64 KiB")

// WhoamiRequest is one whoami lookup.
type WhoamiRequest struct {
	Token string
	// Query holds the appservice masquerade parameters to send (user_id,
	// device_id, org.matrix.msc3202.device_id), or nil.
	Query url.Values
	// Forward holds request headers to pass on, so the homeserver records
	// the real client: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host,
	// User-Agent.
	Forward http.Header
}

// Whoami asks the homeserver who a token belongs to
// (GET /_matrix/client/v3/account/whoami). Any HTTP answer is a Reply, not an
// error; errors mean the homeserver could not be asked or did not answer.
func (c *Client) Whoami(ctx context.Context, wr WhoamiRequest) (*Reply, error) {
	u := c.url("/_matrix/client/v3/account/whoami")
	if len(wr.Query) > 0 {
		u.RawQuery = wr.Query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	for k, v := range wr.Forward {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+wr.Token)
	return c.do(req)
}

// AdminStatus asks whether a token's own user is a homeserver admin, with
// that token (GET /_synapse/admin/v1/users/{userID}/admin): Synapse answers
// 200 {"admin": true} only to an admin, 403 to everyone else, so no admin
// token is needed. forward is as WhoamiRequest.Forward. Any HTTP answer is a
// Reply, not an error.
func (c *Client) AdminStatus(ctx context.Context, token, userID string, forward http.Header) (*Reply, error) {
	u := c.url("")
	esc := u.EscapedPath() + "/_synapse/admin/v1/users/" + url.PathEscape(userID) + "/admin"
	u.Path += "/_synapse/admin/v1/users/" + userID + "/admin"
	u.RawPath = esc
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	for k, v := range forward {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+token)
	return c.do(req)
}

// Versions asks for /_matrix/client/versions, which every homeserver serves
// without authentication; an error means it did not answer 200.
func (c *Client) Versions(ctx context.Context) error {
	u := c.url("/_matrix/client/versions")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	r, err := c.do(req)
	if err != nil {
		return err
	}
	if r.Status != http.StatusOK {
		return fmt.Errorf("upstream: /_matrix/client/versions answered %d", r.Status)
	}
	return nil
}

func (c *Client) url(path string) *url.URL {
	u := *c.base
	u.Path += path
	return &u
}

func (c *Client) do(req *http.Request) (*Reply, error) {
	resp, err := c.rt.RoundTrip(req)
	if err != nil {
		return nil, scrub(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxReplyBody+1))
	if err != nil {
		return nil, scrub(err)
	}
	if len(body) > MaxReplyBody {
		return nil, ErrReplyTooLarge
	}
	// Keep the body at its exact size: a cached answer holds on to it.
	return &Reply{Status: resp.StatusCode, Header: resp.Header, Body: body}, nil
}

// scrub drops the request URL from a *url.Error, since a URL may carry
// masquerade parameters and has no place in a log line.
func scrub(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Error kinds, for metrics and for choosing between 502 and 504.
const (
	KindTimeout  = "timeout"
	KindRefused  = "refused"
	KindOther    = "other"
	KindCanceled = "canceled" // the caller gave up: not the homeserver's fault
)

// ErrorKind classifies an error from talking to the homeserver.
func ErrorKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.Canceled):
		return KindCanceled
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return KindTimeout
	case errors.Is(err, syscall.ECONNREFUSED):
		return KindRefused
	default:
		return KindOther
	}
}
