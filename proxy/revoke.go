package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// Reasons for invalidation, the values of the reason label.
const (
	reasonLogout       tokencache.Reason = "logout"
	reasonLogoutAll    tokencache.Reason = "logout_all"
	reasonDevice       tokencache.Reason = "device"
	reasonPassword     tokencache.Reason = "password"
	reasonDeactivate   tokencache.Reason = "deactivate"
	reasonLogin        tokencache.Reason = "login"
	reasonUnknownToken tokencache.Reason = "unknown_token"
)

// maxBody bounds the request and response bodies the proxy reads to learn
// what a call revoked. Bodies are still forwarded whole; one over the bound
// is treated as unreadable, which invalidates more, never less.
const maxBody = 64 << 10

// plan is what a revoking request will invalidate if the homeserver says
// yes. It travels to modifyResponse in the request's context.
type plan struct {
	route route
	start time.Time // for expires_in_ms: the token cannot outlive start+expiry
	// The caller, resolved before forwarding (afterwards a revoked token no
	// longer resolves).
	token    tokencache.TokenID
	hasToken bool
	user     string // empty: unknown
	device   string
	// known is false when the caller could not be resolved (no token, an
	// odd request, the homeserver failing the lookup): a 2xx then flushes
	// the whole cache, since whose entries it revoked cannot be told.
	known bool
	// The request body, for routes whose body says what is revoked.
	body         []byte
	bodyComplete bool
}

type planKey struct{}

// needsCaller says which actions must know the caller's user and device.
func needsCaller(a action) bool {
	switch a {
	case actLogout, actLogoutAll, actDeleteDevice, actDeleteDevices, actPassword, actDeactivate:
		return true
	}
	return false
}

func (p *Proxy) serveRevoking(w http.ResponseWriter, r *http.Request, rt route, c *caller) {
	pl := &plan{route: rt, start: p.now()}
	if needsCaller(rt.action) {
		p.resolveCaller(r, c, pl)
	}
	switch rt.action {
	case actDeleteDevices, actPassword, actAdminDeleteDevices, actAdminResetPassword, actAdminPutUser:
		pl.body, pl.bodyComplete = readBody(r)
	}
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), planKey{}, pl)))
}

// resolveCaller fills in who is making a revoking request: from the cache, or
// with a whoami lookup (which also caches the answer).
func (p *Proxy) resolveCaller(r *http.Request, c *caller, pl *plan) {
	if !c.ok {
		if tok := tokenOnly(r); tok != "" {
			pl.token, pl.hasToken = p.hasher.Token(tok), true
		}
		return
	}
	pl.token, pl.hasToken = c.key.Token, true
	a, res := c.answer, c.result
	if res == tokencache.Miss {
		var err error
		if a, res, err = p.resolve(r, c.key, c.creds); err != nil {
			return
		}
	}
	p.m.lookupsByResult[res].Inc()
	if a.Kind == tokencache.Positive {
		pl.user, pl.device, pl.known = a.UserID, a.DeviceID, true
	}
}

// readBody reads up to maxBody bytes of a request body and puts them back in
// front of the rest, so the homeserver receives the body byte for byte.
func readBody(r *http.Request) ([]byte, bool) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, true
	}
	return peek(&r.Body)
}

// peekResponse does the same for a response body.
func peekResponse(resp *http.Response) ([]byte, bool) { return peek(&resp.Body) }

// peek reads up to maxBody bytes of *body, replaces *body with a reader that
// yields them again followed by the rest, and says whether that was all.
func peek(body *io.ReadCloser) ([]byte, bool) {
	rc := *body
	buf, err := io.ReadAll(io.LimitReader(rc, maxBody+1))
	*body = readCloser{io.MultiReader(bytes.NewReader(buf), rc), rc}
	return buf, err == nil && len(buf) <= maxBody
}

type readCloser struct {
	io.Reader
	io.Closer
}

// passiveInvalidation drops the token of a request the homeserver answered
// with 401 M_UNKNOWN_TOKEN: it was revoked behind the proxy's back (the admin
// API, another replica, expiry). A 401 whose body cannot be read counts as
// one; a readable one with another errcode, or none (the first round of
// user-interactive auth asking for a password), does not.
func (p *Proxy) passiveInvalidation(resp *http.Response) {
	tok := tokenOnly(resp.Request)
	if tok == "" {
		return
	}
	body, complete := peekResponse(resp)
	var m map[string]json.RawMessage
	if complete && json.Unmarshal(body, &m) == nil {
		if errcode, _, _ := parseError(body); errcode != "M_UNKNOWN_TOKEN" {
			return
		}
	}
	p.cache.InvalidateToken(p.hasher.Token(tok), reasonUnknownToken)
}

// applyPlan invalidates what a revoking call revoked, on a 2xx only: the
// first round of user-interactive auth is a 401 and revokes nothing.
func (p *Proxy) applyPlan(pl *plan, resp *http.Response) {
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return
	}
	c := p.cache
	switch pl.route.action {
	case actLogout:
		// Synapse deletes the device with its token, and a device can hold
		// more than one token (refresh), so drop the device too.
		if pl.hasToken {
			c.InvalidateToken(pl.token, reasonLogout)
		}
		switch {
		case pl.known && pl.device != "":
			c.InvalidateDevice(pl.user, pl.device, reasonLogout)
		case !pl.known:
			p.flush(reasonLogout, pl)
		}
	case actLogoutAll:
		if !pl.known {
			p.flush(reasonLogoutAll, pl)
			return
		}
		c.InvalidateToken(pl.token, reasonLogoutAll)
		c.InvalidateUser(pl.user, tokencache.TokenID{}, reasonLogoutAll)
	case actDeleteDevice:
		if !pl.known {
			p.flush(reasonDevice, pl)
			return
		}
		c.InvalidateDevice(pl.user, pl.route.params[0], reasonDevice)
	case actDeleteDevices:
		if !pl.known {
			p.flush(reasonDevice, pl)
			return
		}
		p.dropDevices(pl.user, pl)
	case actPassword:
		logout, ok := parseLogoutDevices(pl.body)
		ok = ok && pl.bodyComplete
		switch {
		case ok && !logout:
			// "logout_devices": false: every token stays valid.
		case !pl.known:
			p.flush(reasonPassword, pl)
		case !ok:
			c.InvalidateUser(pl.user, tokencache.TokenID{}, reasonPassword)
		default:
			// The spec says the homeserver SHOULD NOT revoke the token
			// that made the request; Synapse does not.
			c.InvalidateUser(pl.user, pl.token, reasonPassword)
		}
	case actDeactivate:
		if !pl.known {
			p.flush(reasonDeactivate, pl)
			return
		}
		c.InvalidateToken(pl.token, reasonDeactivate)
		c.InvalidateUser(pl.user, tokencache.TokenID{}, reasonDeactivate)
	case actLogin, actNewToken:
		p.observeNewToken(pl, resp)
	default:
		p.applyAdmin(pl)
	}
}

// dropDevices drops the devices a delete_devices body lists, or the whole
// user when the body cannot be read.
func (p *Proxy) dropDevices(user string, pl *plan) {
	devices, ok := parseDeleteDevices(pl.body)
	if !ok || !pl.bodyComplete {
		p.cache.InvalidateUser(user, tokencache.TokenID{}, reasonDevice)
		return
	}
	for _, d := range devices {
		p.cache.InvalidateDevice(user, d, reasonDevice)
	}
}

// applyAdmin invalidates what a successful Synapse admin API call revoked.
// The user is in the path, so no caller needs resolving.
func (p *Proxy) applyAdmin(pl *plan) {
	c, user := p.cache, pl.route.params[0]
	switch pl.route.action {
	case actAdminDeleteDevice:
		c.InvalidateDevice(user, pl.route.params[1], reasonDevice)
	case actAdminDeleteDevices:
		p.dropDevices(user, pl)
	case actAdminDeactivate:
		c.InvalidateUser(user, tokencache.TokenID{}, reasonDeactivate)
	case actAdminResetPassword:
		if logout, ok := parseLogoutDevices(pl.body); !ok || !pl.bodyComplete || logout {
			c.InvalidateUser(user, tokencache.TokenID{}, reasonPassword)
		}
	case actAdminPutUser:
		if reason, revokes := parseAdminUserUpdate(pl.body); revokes || !pl.bodyComplete {
			c.InvalidateUser(user, tokencache.TokenID{}, reason)
		}
	}
}

// observeNewToken reads a login, registration or refresh response. A token
// with expires_in_ms must not be cached past its expiry. Logging in with an
// existing device_id may revoke that device's older tokens (the spec leaves
// it open; Synapse 1.163 keeps them), so those are dropped too: at worst one
// extra lookup.
func (p *Proxy) observeNewToken(pl *plan, resp *http.Response) {
	body, complete := peekResponse(resp)
	lr, ok := parseLoginResponse(body)
	if !ok || !complete {
		if pl.route.action == actLogin {
			p.flush(reasonLogin, pl)
		}
		return
	}
	if pl.route.action == actLogin && lr.userID != "" && lr.deviceID != "" {
		p.cache.InvalidateDevice(lr.userID, lr.deviceID, reasonLogin)
	}
	if lr.accessToken != "" && lr.expiresInMS > 0 {
		// Counted from before the request was sent: the homeserver's clock
		// started no earlier.
		p.cache.LimitLifetime(p.hasher.Token(lr.accessToken), pl.start.Add(time.Duration(lr.expiresInMS)*time.Millisecond))
	}
}

func (p *Proxy) flush(reason tokencache.Reason, pl *plan) {
	n := p.cache.Flush(reason)
	p.log.Warn("flushed the token cache: a revoking call succeeded for a caller the proxy could not identify",
		zap.String("route", pl.route.name.String()), zap.Int("entries", n))
}

// The body parsers match keys exactly, as the homeserver does: encoding/json
// alone would read {"Logout_Devices": false} as false, which Synapse ignores.

// parseDeleteDevices reads {"devices": ["ID", …]} (POST /delete_devices).
func parseDeleteDevices(body []byte) ([]string, bool) {
	var m map[string]json.RawMessage
	var devices []string
	if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["devices"], &devices) != nil || devices == nil {
		return nil, false
	}
	return devices, true
}

// parseLogoutDevices reads "logout_devices" (POST /account/password), which
// defaults to true.
func parseLogoutDevices(body []byte) (logout, ok bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return true, false
	}
	raw, has := m["logout_devices"]
	if !has {
		return true, true
	}
	if json.Unmarshal(raw, &logout) != nil || string(raw) == "null" {
		return true, false
	}
	return logout, true
}

// parseAdminUserUpdate reads a PUT /_synapse/admin/v2/users/{userId} body
// and says whether it revokes the user's tokens: "deactivated": true,
// "locked": true, or a "password" without "logout_devices": false (the
// default is to log out every device). Unreadable bodies revoke.
func parseAdminUserUpdate(body []byte) (tokencache.Reason, bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return reasonDeactivate, true
	}
	isTrue := func(k string) bool { return string(m[k]) == "true" }
	if isTrue("deactivated") || isTrue("locked") {
		return reasonDeactivate, true
	}
	if pw, has := m["password"]; has && string(pw) != "null" {
		if logout, ok := parseLogoutDevices(body); logout || !ok {
			return reasonPassword, true
		}
	}
	return "", false
}

type loginResponse struct {
	userID, deviceID, accessToken string
	expiresInMS                   int64
}

// parseLoginResponse reads a login, register or refresh response.
func parseLoginResponse(body []byte) (loginResponse, bool) {
	var m map[string]json.RawMessage
	var lr loginResponse
	if json.Unmarshal(body, &m) != nil {
		return lr, false
	}
	for k, dst := range map[string]any{"user_id": &lr.userID, "device_id": &lr.deviceID,
		"access_token": &lr.accessToken, "expires_in_ms": &lr.expiresInMS} {
		if raw, has := m[k]; has && string(raw) != "null" && json.Unmarshal(raw, dst) != nil {
			return lr, false
		}
	}
	return lr, true
}
