package proxy

import (
	"encoding/json"
	"time"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// Reasons for invalidation, the values of the reason label.
const (
	reasonLogout     tokencache.Reason = "logout"
	reasonLogoutAll  tokencache.Reason = "logout_all"
	reasonDevice     tokencache.Reason = "device"
	reasonPassword   tokencache.Reason = "password"
	reasonDeactivate tokencache.Reason = "deactivate"
	reasonLogin      tokencache.Reason = "login"
	reasonLock       tokencache.Reason = "lock"
	reasonSSOLogout  tokencache.Reason = "sso_logout"
	// reasonAdmin: a user's admin status was set, which the forward-auth
	// endpoint's admin=true policy caches beside the whoami answers.
	reasonAdmin        tokencache.Reason = "admin"
	reasonUnknownToken                   = tokencache.ReasonUnknownToken
)

// routeReasons is the reason each route's invalidations are counted under.
var routeReasons = [numRoutes]tokencache.Reason{
	routeLogout:     reasonLogout,
	routeLogoutAll:  reasonLogoutAll,
	routeDevices:    reasonDevice,
	routePassword:   reasonPassword,
	routeDeactivate: reasonDeactivate,
	routeLogin:      reasonLogin,
	routeLock:       reasonLock,
	routeSSOLogout:  reasonSSOLogout,
}

// result is what the proxy learned of a revoking call's fate.
type result uint8

const (
	// refused: the homeserver answered, and not with a success (a 4xx,
	// the first round of user-interactive auth), or the client's own
	// body broke off, so the homeserver never had the whole request.
	refused result = iota
	// performed: a 2xx.
	performed
	// unknown: the homeserver may have done it (no answer: a timeout, a
	// dropped connection; or a 5xx, possibly half-way). Counted as
	// performed: a false invalidation costs one lookup, a missed one
	// keeps a dead token alive.
	unknown
)

func resultOf(status int) result {
	switch {
	case status >= 200 && status <= 299:
		return performed
	case status >= 500:
		return unknown
	default:
		return refused
	}
}

// callerState is how far the proxy got in identifying the caller of a
// revoking call, the way Synapse does (token.go).
type callerState uint8

const (
	// callerNone: the request carries no token at all (a password reset
	// by email). Nobody can be named: a success flushes.
	callerNone callerState = iota
	// callerToken: a token the homeserver did not resolve to a user (an
	// expired or unknown one, a refused masquerade, malformed
	// credentials): its own answers can be dropped, nothing more.
	callerToken
	// callerKnown: the homeserver said whose token it is.
	callerKnown
)

// outcome is what an effect is decided from.
type outcome struct {
	result result
	reason tokencache.Reason
	// The caller, resolved before forwarding.
	caller         callerState
	token          tokencache.TokenID // callerToken, callerKnown
	user, device   string             // callerKnown; device empty for appservice users
	params         [2]string          // path parameters of the matched row
	body           []byte             // the request body, for needBody rows
	bodyOK         bool               // body was read whole (false: unread, oversized)
	response       []byte             // the response body, for needResponse rows on success
	responseOK     bool
	start          time.Time // when the call was sent: new tokens expire no earlier than start+expires_in_ms
	newTokenHasher *tokencache.Hasher
	serverName     string // the homeserver's name, "" while unknown (MAS calls name localparts)
	fromMAS        bool   // the call carried MAS's shared secret
}

// decision collects what an effect drops; the proxy applies it.
type decision struct {
	drops  []tokencache.Invalidation
	limits []lifetimeLimit
	// locks and unlocks are localparts MAS locked or unlocked (mas.go).
	locks, unlocks []string
}

type lifetimeLimit struct {
	token    tokencache.TokenID
	notAfter time.Time
}

func (d *decision) dropToken(id tokencache.TokenID, r tokencache.Reason) {
	d.drops = append(d.drops, tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: id, Reason: r})
}

func (d *decision) dropDevice(user, device string, r tokencache.Reason) {
	d.drops = append(d.drops, tokencache.Invalidation{Scope: tokencache.ScopeDevice, UserID: user, DeviceID: device, Reason: r})
}

// dropUser drops every answer for user but those of the token spare (zero:
// none).
func (d *decision) dropUser(user string, spare tokencache.TokenID, r tokencache.Reason) {
	d.drops = append(d.drops, tokencache.Invalidation{Scope: tokencache.ScopeUser, UserID: user, Token: spare, Reason: r})
}

// dropDevicesExcept drops the user's devices but those in keep.
func (d *decision) dropDevicesExcept(user string, keep []string, r tokencache.Reason) {
	d.drops = append(d.drops, tokencache.Invalidation{Scope: tokencache.ScopeDevicesExcept, UserID: user, Keep: keep, Reason: r})
}

func (d *decision) flush(r tokencache.Reason) {
	d.drops = append(d.drops, tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: r})
}

// effect decides what a revoking call that may have been performed
// (o.result is performed or unknown) invalidated. Effects are pure: they
// only fill in d.
type effect func(o *outcome, d *decision)

// forCaller is the common shape of the caller's own revocations: with no
// token a success flushes (only a truly token-less call: see callerNone),
// with an unresolved token only its answers go, and a known caller gets
// known(…).
func forCaller(o *outcome, d *decision, known func()) {
	switch o.caller {
	case callerNone:
		// Only on a success the homeserver confirmed: a token-less
		// call with an unknown outcome is anyone's to make.
		if o.result == performed {
			d.flush(o.reason)
		}
	case callerToken:
		d.dropToken(o.token, o.reason)
	case callerKnown:
		known()
	}
}

// dropCallerSession: POST /logout. Synapse deletes the caller's device with
// its token (or just the token of a device-less appservice user), and a
// device can hold more than one token (refresh).
func dropCallerSession(o *outcome, d *decision) {
	forCaller(o, d, func() {
		d.dropToken(o.token, o.reason)
		if o.device != "" {
			d.dropDevice(o.user, o.device, o.reason)
		}
	})
}

// dropCallerUser: POST /logout/all, /account/deactivate, MSC3814's
// dehydrated device: every token of the caller's user.
func dropCallerUser(o *outcome, d *decision) {
	forCaller(o, d, func() {
		d.dropToken(o.token, o.reason)
		d.dropUser(o.user, tokencache.TokenID{}, o.reason)
	})
}

// dropCallerDeviceInPath: DELETE /devices/{deviceId}, a device of the
// caller's user.
func dropCallerDeviceInPath(o *outcome, d *decision) {
	forCaller(o, d, func() { d.dropDevice(o.user, o.params[0], o.reason) })
}

// dropCallerDevicesInBody: POST /delete_devices {"devices": […]}: the listed
// devices of the caller's user, or the whole user when the body cannot be
// read. An empty list revokes nothing.
func dropCallerDevicesInBody(o *outcome, d *decision) {
	forCaller(o, d, func() { dropDevicesInBody(o, d, o.user) })
}

// maxListedDevices is the longest list of devices a call's effect drops
// one by one; a longer one drops the whole user. Each device is an
// invalidation on the bus and in the cache's log: a client listing 5,000
// made-up devices must not overflow the bus (which makes every peer flush)
// nor fill the log.
const maxListedDevices = 32

func dropDevicesInBody(o *outcome, d *decision, user string) {
	devices, ok := parseDeleteDevices(o.body)
	if !ok || !o.bodyOK || len(devices) > maxListedDevices {
		d.dropUser(user, tokencache.TokenID{}, o.reason)
		return
	}
	for _, dev := range devices {
		d.dropDevice(user, dev, o.reason)
	}
}

// dropCallerOtherTokensOnPasswordChange: POST /account/password logs out
// every other token of the user unless "logout_devices": false. The spec
// says the homeserver SHOULD NOT revoke the token that made the request;
// Synapse does not. An unreadable body drops the caller's token too.
func dropCallerOtherTokensOnPasswordChange(o *outcome, d *decision) {
	logout, ok := parseLogoutDevices(o.body)
	ok = ok && o.bodyOK
	if ok && !logout {
		return
	}
	forCaller(o, d, func() {
		if ok {
			d.dropUser(o.user, o.token, o.reason)
			return
		}
		d.dropUser(o.user, tokencache.TokenID{}, o.reason)
	})
}

// The Synapse admin API and account locking name the user in the path.

func dropPathDevice(o *outcome, d *decision) { d.dropDevice(o.params[0], o.params[1], o.reason) }

func dropPathUser(o *outcome, d *decision) { d.dropUser(o.params[0], tokencache.TokenID{}, o.reason) }

func dropPathUserDevicesInBody(o *outcome, d *decision) { dropDevicesInBody(o, d, o.params[0]) }

func dropPathUserOnPasswordReset(o *outcome, d *decision) {
	if logout, ok := parseLogoutDevices(o.body); !ok || !o.bodyOK || logout {
		dropPathUser(o, d)
	}
}

func dropPathUserIfUpdateRevokes(o *outcome, d *decision) {
	if reason, revokes := parseAdminUserUpdate(o.body); revokes || !o.bodyOK {
		if reason == "" {
			reason = reasonDeactivate // an unread body
		}
		d.dropUser(o.params[0], tokencache.TokenID{}, reason)
	}
}

// dropPathUserAdminChange: PUT /_synapse/admin/v1/users/{userId}/admin set
// the user's admin status, which forward-auth's admin=true caches.
func dropPathUserAdminChange(o *outcome, d *decision) {
	d.dropUser(o.params[0], tokencache.TokenID{}, reasonAdmin)
}

// dropPathUserIfLocked: PUT …/admin/lock/{userId} {"locked": true}.
func dropPathUserIfLocked(o *outcome, d *decision) {
	if locked, ok := parseLocked(o.body); locked || !ok || !o.bodyOK {
		dropPathUser(o, d)
	}
}

// flushAll: a success revoked tokens nobody can name from the request.
func flushAll(o *outcome, d *decision) {
	if o.result == performed {
		d.flush(o.reason)
	}
}

// observeLogin reads a login response. Logging in with an existing
// device_id may revoke that device's older tokens (the spec leaves it open;
// Synapse 1.163 keeps them), so those are dropped too: at worst one extra
// lookup. A response it cannot read revokes nothing it could name; Synapse
// revokes nothing at login.
func observeLogin(o *outcome, d *decision) {
	lr, ok := observeNewTokenResponse(o, d)
	if ok && lr.userID != "" && lr.deviceID != "" {
		d.dropDevice(lr.userID, lr.deviceID, o.reason)
	}
}

// observeNewToken reads a registration or refresh response: a token with
// expires_in_ms must not be cached past its expiry.
func observeNewToken(o *outcome, d *decision) { observeNewTokenResponse(o, d) }

func observeNewTokenResponse(o *outcome, d *decision) (loginResponse, bool) {
	if o.result != performed || !o.responseOK {
		return loginResponse{}, false
	}
	lr, ok := parseLoginResponse(o.response)
	if !ok {
		return lr, false
	}
	if lr.accessToken != "" && lr.expiresInMS > 0 && o.newTokenHasher != nil {
		// Counted from before the request was sent: the homeserver's
		// clock started no earlier.
		d.limits = append(d.limits, lifetimeLimit{o.newTokenHasher.Token(lr.accessToken),
			o.start.Add(time.Duration(lr.expiresInMS) * time.Millisecond)})
	}
	return lr, true
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

// parseLocked reads {"locked": bool} (MSC4323).
func parseLocked(body []byte) (locked, ok bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return true, false
	}
	switch string(m["locked"]) {
	case "false":
		return false, true
	case "true":
		return true, true
	}
	return true, false // missing, null, not a boolean
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
	if _, has := m["admin"]; has {
		// Forward-auth's admin=true caches admin status per token.
		return reasonAdmin, true
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
