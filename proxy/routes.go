package proxy

import (
	"net/http"
	"net/url"
	"strings"
)

// This file is the one place that says which requests the proxy answers
// itself, which ones revoke tokens (and what), and, by omission, that
// everything else passes through untouched.
//
//	GET    /_matrix/client/{r0,v3}/account/whoami  answered from the token cache
//	POST   …/logout                  2xx: drop the token and its device
//	POST   …/logout/all              2xx: drop the whole user (resolved before forwarding)
//	DELETE …/devices/{deviceId}      2xx: drop that device of the caller's user
//	POST   …/delete_devices          2xx: drop the devices listed in the body
//	POST   …/account/password        2xx: drop the user's other tokens, unless "logout_devices": false
//	POST   …/account/deactivate      2xx: drop the whole user
//	POST   …/login                   200: drop the user+device of the response (device reuse
//	                                      may revoke older tokens on some homeservers);
//	                                      cap the new token's lifetime at expires_in_ms
//	POST   …/register, …/refresh     200: cap the new token's lifetime at expires_in_ms
//	Synapse admin API (/_synapse/admin/v1 or v2), 2xx:
//	DELETE …/users/{userId}/devices/{deviceId}   drop that device
//	POST   …/users/{userId}/delete_devices       drop the devices listed in the body
//	POST   …/deactivate/{userId}                 drop the whole user
//	POST   …/reset_password/{userId}             drop the whole user, unless "logout_devices": false
//	PUT    …/users/{userId}                      drop the whole user if the body deactivates or
//	                                             locks it, or sets a password without
//	                                             "logout_devices": false
//	any                              401 M_UNKNOWN_TOKEN: drop the request's token
//	anything else                    passes through
//
// whoami is matched on the raw, still-encoded path, exactly: anything odd
// goes to the homeserver, which knows best. Revoking routes are matched
// leniently (percent-decoded, dot segments resolved, any version prefix such
// as r0, v3, unstable or api/v1): a false match only ever costs an extra
// invalidation, a missed one would keep a revoked token alive.

// routeName is the route label of the metrics.
type routeName uint8

const (
	routeOther routeName = iota
	routeWhoami
	routeLogout
	routeLogoutAll
	routeDevices
	routePassword
	routeDeactivate
	routeLogin
	numRoutes
)

var routeLabels = [numRoutes]string{
	routeOther:      "other",
	routeWhoami:     "whoami",
	routeLogout:     "logout",
	routeLogoutAll:  "logout_all",
	routeDevices:    "devices",
	routePassword:   "password",
	routeDeactivate: "deactivate",
	routeLogin:      "login",
}

func (n routeName) String() string { return routeLabels[n] }

// action is what the proxy does around a request.
type action uint8

const (
	actPass          action = iota // forward untouched
	actWhoami                      // answer from the cache
	actLogout                      // POST /logout
	actLogoutAll                   // POST /logout/all
	actDeleteDevice                // DELETE /devices/{deviceId}
	actDeleteDevices               // POST /delete_devices
	actPassword                    // POST /account/password
	actDeactivate                  // POST /account/deactivate
	actLogin                       // POST /login
	actNewToken                    // POST /register, POST /refresh

	// The Synapse admin API names the user in the path.
	actAdminDeleteDevice  // DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}
	actAdminDeleteDevices // POST /_synapse/admin/v2/users/{userId}/delete_devices
	actAdminDeactivate    // POST /_synapse/admin/v1/deactivate/{userId}
	actAdminResetPassword // POST /_synapse/admin/v1/reset_password/{userId}
	actAdminPutUser       // PUT /_synapse/admin/v2/users/{userId}
)

// route is the outcome of matching a request.
type route struct {
	name   routeName
	action action
	// params are the path parameters, in order: {deviceId} of the client
	// API, {userId} and {deviceId} of the admin API.
	params [2]string
}

type routeSpec struct {
	method string
	suffix []string // path segments after the version; "*" is a parameter
	route  route
}

var revokingRoutes = [...]routeSpec{
	{http.MethodPost, []string{"logout"}, route{name: routeLogout, action: actLogout}},
	{http.MethodPost, []string{"logout", "all"}, route{name: routeLogoutAll, action: actLogoutAll}},
	{http.MethodDelete, []string{"devices", "*"}, route{name: routeDevices, action: actDeleteDevice}},
	{http.MethodPost, []string{"delete_devices"}, route{name: routeDevices, action: actDeleteDevices}},
	{http.MethodPost, []string{"account", "password"}, route{name: routePassword, action: actPassword}},
	{http.MethodPost, []string{"account", "deactivate"}, route{name: routeDeactivate, action: actDeactivate}},
	{http.MethodPost, []string{"login"}, route{name: routeLogin, action: actLogin}},
	{http.MethodPost, []string{"register"}, route{name: routeOther, action: actNewToken}},
	{http.MethodPost, []string{"refresh"}, route{name: routeOther, action: actNewToken}},
}

var adminRoutes = [...]routeSpec{
	{http.MethodDelete, []string{"users", "*", "devices", "*"}, route{name: routeDevices, action: actAdminDeleteDevice}},
	{http.MethodPost, []string{"users", "*", "delete_devices"}, route{name: routeDevices, action: actAdminDeleteDevices}},
	{http.MethodPost, []string{"deactivate", "*"}, route{name: routeDeactivate, action: actAdminDeactivate}},
	{http.MethodPost, []string{"reset_password", "*"}, route{name: routePassword, action: actAdminResetPassword}},
	{http.MethodPut, []string{"users", "*"}, route{name: routeOther, action: actAdminPutUser}},
}

const (
	whoamiR0 = "/_matrix/client/r0/account/whoami"
	whoamiV3 = "/_matrix/client/v3/account/whoami"
)

// classify matches a request against the table above.
func classify(r *http.Request) route {
	switch r.Method {
	case http.MethodGet:
		if p := r.URL.EscapedPath(); p == whoamiV3 || p == whoamiR0 {
			return route{name: routeWhoami, action: actWhoami}
		}
		return route{}
	case http.MethodPost, http.MethodDelete:
		return classifyRevoking(r.Method, r.URL.EscapedPath())
	case http.MethodPut:
		// The only revoking PUT is the admin API's; client PUTs (sending
		// events, most of the traffic after /sync) need no parsing.
		if p := r.URL.EscapedPath(); strings.HasPrefix(p, "/_synapse/") || strings.Contains(p, "admin") {
			return classifyRevoking(r.Method, p)
		}
		return route{}
	default:
		return route{}
	}
}

func classifyRevoking(method, escapedPath string) route {
	segs := segments(escapedPath)
	switch {
	case len(segs) >= 3 && segs[0] == "_matrix" && segs[1] == "client":
		// One or two version segments: v3, r0, unstable; api/v1,
		// unstable/org.matrix.mscNNNN.
		return matchRoutes(revokingRoutes[:], method, segs[2:], 1, 2)
	case len(segs) >= 3 && segs[0] == "_synapse" && segs[1] == "admin":
		return matchRoutes(adminRoutes[:], method, segs[2:], 1, 1)
	}
	return route{}
}

// matchRoutes matches rest (the path after the API prefix) against specs,
// allowing between minVersions and maxVersions version segments first.
func matchRoutes(specs []routeSpec, method string, rest []string, minVersions, maxVersions int) route {
	for _, spec := range specs {
		if spec.method != method {
			continue
		}
		versions := len(rest) - len(spec.suffix)
		if versions < minVersions || versions > maxVersions {
			continue
		}
		rt, ok, n := spec.route, true, 0
		for i, want := range spec.suffix {
			got := rest[versions+i]
			switch {
			case want == "*":
				rt.params[n] = got
				n++
			case got != want:
				ok = false
			}
		}
		if ok {
			return rt
		}
	}
	return route{}
}

// segments splits an escaped path into decoded segments, dropping empty and
// "." segments and resolving "..", the way a lenient server would route it.
func segments(escapedPath string) []string {
	var out []string
	for s := range strings.SplitSeq(escapedPath, "/") {
		if u, err := url.PathUnescape(s); err == nil {
			s = u
		}
		switch s {
		case "", ".":
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, s)
		}
	}
	return out
}
