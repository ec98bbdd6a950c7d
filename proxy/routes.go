package proxy

import (
	"net/http"
	"slices"
	"strings"
	"unicode/utf8"
)

// This file is the one place that says which requests the proxy answers
// itself, which ones revoke tokens and what each revokes, and, by omission,
// that everything else passes through untouched. revokingRoutes is the
// invalidation matrix: a row is a method, a path and what the proxy drops
// when the homeserver performed the call (see effects.go). Adding a
// revoking route is adding a row.
//
// Besides the rows: GET …/account/whoami is answered from the token cache,
// and any 401 for a request that carries a token, other than a
// user-interactive-auth challenge, drops that token (passiveInvalidation).
//
// whoami is matched on the raw, still-encoded path, exactly: anything odd
// goes to the homeserver, which knows best. Revoking routes are matched
// leniently: percent-decoded literal segments, empty segments ignored, any
// version prefix (r0, v3, unstable, api/v1, unstable/org.matrix.mscNNNN).
// A false match only costs an extra invalidation; a missed one would keep
// a revoked token alive. Path parameters are taken as Synapse takes them:
// it matches its patterns against the raw path and unquotes each parameter,
// with no dot-segment resolution, so DELETE /devices/%2E%2E deletes the
// device named "..", and Python's unquote, so %FF names "\uFFFD".
//
// How lenient a row may be depends on whose entries it drops. Rows that
// only drop the caller's own entries (own) are matched in every reading a
// server could give the path: dot segments resolved (an intermediary may do
// it), invalid UTF-8 replaced, and any number of version segments (Synapse's
// unstable patterns are regexes whose dots also match '/'). Rows that name
// a user in the path, or flush, are matched on the raw path alone, with
// known version prefixes only: a lenient match there would let one client
// drop another user's entries with a path the homeserver routes elsewhere.

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
	routeLock
	routeSSOLogout
	routeMAS
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
	routeLock:       "lock",
	routeSSOLogout:  "sso_logout",
	routeMAS:        "mas",
}

func (n routeName) String() string { return routeLabels[n] }

// api is the prefix a route lives under, and how many version segments may
// follow it.
type api uint8

const (
	apiClient        api = iota // /_matrix/client/{version…}/
	apiSynapseAdmin             // /_synapse/admin/{v1,v2}/
	apiSynapseClient            // /_synapse/client/ (no version)
	apiSynapseMAS               // /_synapse/mas/ (no version)
)

var apiPrefixes = [...]struct {
	segs                     [2]string
	minVersions, maxVersions int
}{
	apiClient:        {[2]string{"_matrix", "client"}, 1, 2},
	apiSynapseAdmin:  {[2]string{"_synapse", "admin"}, 1, 1},
	apiSynapseClient: {[2]string{"_synapse", "client"}, 0, 0},
	apiSynapseMAS:    {[2]string{"_synapse", "mas"}, 0, 0},
}

// needs says what a revoking route's effect must know, found before the
// request is forwarded.
type needs uint8

const (
	// needCaller: the caller's user and device, resolved from the token
	// before forwarding (afterwards a revoked token no longer resolves).
	needCaller needs = 1 << iota
	// needBody: the request body (bounded, see readBody).
	needBody
	// needResponse: the response body, on success (new tokens).
	needResponse
)

// revokingRoute is a row of the invalidation matrix.
type revokingRoute struct {
	method string
	api    api
	// path is the path after the version, "*" a parameter.
	path string
	// leaf: the homeserver serves the path with anything after it too (a
	// Twisted leaf resource).
	leaf   bool
	name   routeName
	needs  needs
	effect effect
	segs   []string // path, split; set by init
	// own: the effect drops only the caller's own entries (it needs the
	// caller); set by init. See the comment at the top on leniency.
	own bool
}

var revokingRoutes = []*revokingRoute{
	// Client-Server API.
	{method: "POST", api: apiClient, path: "logout", name: routeLogout, needs: needCaller, effect: dropCallerSession},
	{method: "POST", api: apiClient, path: "logout/all", name: routeLogoutAll, needs: needCaller, effect: dropCallerUser},
	{method: "DELETE", api: apiClient, path: "devices/*", name: routeDevices, needs: needCaller, effect: dropCallerDeviceInPath},
	{method: "POST", api: apiClient, path: "delete_devices", name: routeDevices, needs: needCaller | needBody, effect: dropCallerDevicesInBody},
	{method: "POST", api: apiClient, path: "account/password", name: routePassword, needs: needCaller | needBody, effect: dropCallerOtherTokensOnPasswordChange},
	{method: "POST", api: apiClient, path: "account/deactivate", name: routeDeactivate, needs: needCaller, effect: dropCallerUser},
	// MSC3814: replacing or deleting the dehydrated device deletes a
	// device of the caller whose ID the request does not name.
	{method: "PUT", api: apiClient, path: "dehydrated_device", name: routeDevices, needs: needCaller, effect: dropCallerUser},
	{method: "DELETE", api: apiClient, path: "dehydrated_device", name: routeDevices, needs: needCaller, effect: dropCallerUser},
	// Account locking (spec v1.18, MSC4323; unstable
	// uk.timedout.msc4323): {"locked": true} ends the user's sessions.
	{method: "PUT", api: apiClient, path: "admin/lock/*", name: routeLock, needs: needBody, effect: dropPathUserIfLocked},
	{method: "POST", api: apiClient, path: "login", name: routeLogin, needs: needResponse, effect: observeLogin},
	{method: "POST", api: apiClient, path: "register", name: routeOther, needs: needResponse, effect: observeNewToken},
	{method: "POST", api: apiClient, path: "refresh", name: routeOther, needs: needResponse, effect: observeNewToken},

	// Synapse admin API: the user is in the path.
	{method: "DELETE", api: apiSynapseAdmin, path: "users/*/devices/*", name: routeDevices, effect: dropPathDevice},
	{method: "POST", api: apiSynapseAdmin, path: "users/*/delete_devices", name: routeDevices, needs: needBody, effect: dropPathUserDevicesInBody},
	{method: "POST", api: apiSynapseAdmin, path: "deactivate/*", name: routeDeactivate, effect: dropPathUser},
	{method: "POST", api: apiSynapseAdmin, path: "reset_password/*", name: routePassword, needs: needBody, effect: dropPathUserOnPasswordReset},
	{method: "PUT", api: apiSynapseAdmin, path: "users/*", name: routeOther, needs: needBody, effect: dropPathUserIfUpdateRevokes},
	// Setting admin status changes what forward-auth's admin=true answers.
	{method: "PUT", api: apiSynapseAdmin, path: "users/*/admin", name: routeOther, effect: dropPathUserAdminChange},

	// Synapse's own client endpoints. OIDC back-channel logout ends the
	// sessions of an upstream identity, which only the homeserver can map
	// to devices: a success flushes (rare, and only an identity provider
	// can make one succeed).
	{method: "POST", api: apiSynapseClient, path: "oidc/backchannel_logout", leaf: true, name: routeSSOLogout, effect: flushAll},

	// The Matrix Authentication Service's calls to Synapse (MSC3861
	// delegation; synapse/rest/synapse/mas/): the user is named by
	// localpart in the body (see mas.go). upsert_device,
	// update_device_display_name, set_displayname, unset_displayname,
	// allow_cross_signing_reset and the GETs revoke nothing.
	{method: "POST", api: apiSynapseMAS, path: "delete_device", name: routeMAS, needs: needBody, effect: masDeleteDevice},
	{method: "POST", api: apiSynapseMAS, path: "sync_devices", name: routeMAS, needs: needBody, effect: masSyncDevices},
	{method: "POST", api: apiSynapseMAS, path: "delete_user", name: routeMAS, needs: needBody, effect: masDeleteUser},
	{method: "POST", api: apiSynapseMAS, path: "provision_user", name: routeMAS, needs: needBody, effect: masProvisionUser},
	{method: "POST", api: apiSynapseMAS, path: "reactivate_user", name: routeMAS, needs: needBody, effect: masReactivateUser},
}

func init() {
	for _, rt := range revokingRoutes {
		rt.segs = strings.Split(rt.path, "/")
		rt.own = rt.needs&needCaller != 0 || rt.needs&needResponse != 0
	}
}

// maxOwnVersions bounds the version segments of an own row: enough for
// unstable/org/matrix/msc3814/v1.
const maxOwnVersions = 6

const (
	whoamiR0 = "/_matrix/client/r0/account/whoami"
	whoamiV3 = "/_matrix/client/v3/account/whoami"
)

// match is a revoking route matched by a request, with its parameters.
type match struct {
	route  *revokingRoute
	params [2]string // in path order: {deviceId}, or {userId} and {deviceId}
}

// route is the outcome of classifying a request.
type route struct {
	name    routeName
	whoami  bool
	matches []match // revoking routes; usually one, two for a path whose readings differ
}

var (
	routeWhoamiV = route{name: routeWhoami, whoami: true}
	routePass    = route{name: routeOther}
)

// classify matches a request against the table.
func classify(r *http.Request) route {
	switch r.Method {
	case http.MethodGet:
		if p := r.URL.EscapedPath(); p == whoamiV3 || p == whoamiR0 {
			return routeWhoamiV
		}
		return routePass
	case http.MethodPost, http.MethodDelete:
		return classifyRevoking(r.Method, r.URL.EscapedPath())
	case http.MethodPut:
		// Client PUTs (sending events: most of the traffic after /sync)
		// need no parsing. The revoking ones have "admin" or
		// "dehydrated_device" as a literal segment: Synapse matches its
		// patterns on the raw path, so an encoded literal never routes.
		if p := r.URL.EscapedPath(); strings.Contains(p, "admin") || strings.Contains(p, "dehydrated") {
			return classifyRevoking(r.Method, p)
		}
		return routePass
	default:
		return routePass
	}
}

func classifyRevoking(method, escapedPath string) route {
	raw := segments(escapedPath)
	rt := route{name: routeOther}
	rt.matches = appendMatches(rt.matches, method, raw, false)
	rt.matches = appendMatches(rt.matches, method, raw, true)
	if hasDotSegment(raw) {
		rt.matches = appendMatches(rt.matches, method, resolveDots(raw), true)
	}
	if replaced, ok := pythonReading(raw); ok {
		rt.matches = appendMatches(rt.matches, method, replaced, true)
	}
	if len(rt.matches) > 0 {
		rt.name = rt.matches[0].route.name
	}
	return rt
}

// appendMatches adds the rows that segs (decoded path segments) match:
// with lenient, the own rows under any version prefix, else every row
// under the prefixes its API knows.
func appendMatches(ms []match, method string, segs []string, lenient bool) []match {
	for _, rt := range revokingRoutes {
		if rt.method != method || (lenient && !rt.own) {
			continue
		}
		pre := apiPrefixes[rt.api]
		if len(segs) < 2 || segs[0] != pre.segs[0] || segs[1] != pre.segs[1] {
			continue
		}
		rest := segs[2:]
		versions := len(rest) - len(rt.segs)
		if rt.leaf && versions > pre.maxVersions {
			// A leaf: take the shortest version prefix that fits.
			versions = max(pre.minVersions, min(versions, pre.maxVersions))
			if len(rest) < versions+len(rt.segs) {
				continue
			}
			rest = rest[:versions+len(rt.segs)]
		}
		switch {
		case versions < pre.minVersions:
			continue
		case lenient && (versions > maxOwnVersions || !ownVersion(rt.api, rest[:versions])):
			continue
		case !lenient && (versions > pre.maxVersions || !knownVersion(rt.api, rest[:versions])):
			continue
		}
		m, ok, n := match{route: rt}, true, 0
		for i, want := range rt.segs {
			got := rest[versions+i]
			switch {
			case want == "*":
				m.params[n] = got
				n++
			case got != want:
				ok = false
			}
		}
		if ok && !containsMatch(ms, m) {
			ms = append(ms, m)
		}
	}
	return ms
}

// knownVersion says whether v are version segments the API serves: for the
// client API one of r0, v1, v3, unstable, or unstable/<namespace> and
// api/v1; for the admin API v1 or v2.
func knownVersion(a api, v []string) bool {
	switch a {
	case apiClient:
		switch {
		case len(v) == 1:
			return v[0] == "r0" || v[0] == "v1" || v[0] == "v3" || v[0] == "unstable"
		case len(v) == 2:
			return v[0] == "unstable" || (v[0] == "api" && v[1] == "v1")
		}
		return false
	case apiSynapseAdmin:
		return len(v) == 1 && (v[0] == "v1" || v[0] == "v2")
	default:
		return len(v) == 0
	}
}

// ownVersion is knownVersion loosened for own rows: an unstable prefix of
// any length (Synapse's unstable patterns are regexes whose dots also match
// '/': unstable/org/matrix/msc3814/v1 routes like
// unstable/org.matrix.msc3814.v1).
func ownVersion(a api, v []string) bool {
	return knownVersion(a, v) || (a == apiClient && len(v) > 2 && v[0] == "unstable")
}

func containsMatch(ms []match, m match) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// segments splits an escaped path into segments, each percent-decoded the
// way Synapse unquotes a parameter (a bad escape stays as it is), dropping
// empty ones. "." and ".." are kept: Synapse does not resolve them.
func segments(escapedPath string) []string {
	var out []string
	for s := range strings.SplitSeq(escapedPath, "/") {
		if s == "" {
			continue
		}
		if strings.IndexByte(s, '%') >= 0 {
			s = unquote(s, false)
		}
		out = append(out, s)
	}
	return out
}

// pythonReading is segs as Synapse reads a parameter that is not valid
// UTF-8 once unquoted: Python's unquote replaces what does not decode with
// U+FFFD. ok is false when every segment is valid (the same reading).
func pythonReading(segs []string) ([]string, bool) {
	var out []string
	for i, s := range segs {
		if utf8.ValidString(s) {
			continue
		}
		if out == nil {
			out = slices.Clone(segs)
		}
		out[i] = replaceInvalidUTF8(s)
	}
	return out, out != nil
}

func hasDotSegment(segs []string) bool {
	for _, s := range segs {
		if s == "." || s == ".." {
			return true
		}
	}
	return false
}

// resolveDots is the reading of an intermediary that resolves dot segments
// (RFC 3986 section 5.2.4) before the homeserver sees the path.
func resolveDots(segs []string) []string {
	out := make([]string, 0, len(segs))
	for _, s := range segs {
		switch s {
		case ".":
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
