package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// modelHS is a homeserver model for the coherence check (coherence_test.go):
// users, devices, access tokens with and without expiry, refresh tokens, an
// appservice that masquerades, user-interactive auth, and the revoking calls
// of the route table in the classic and the MAS flavour, each with
// Synapse's rule for which token identifies the caller and what it revokes.
// Unlike fakeHS it keeps every token it ever issued (revoked ones too), so
// the check can ask about all of them, and it counts whoami calls per token,
// so the check can see which cache entries a step made vanish.
type modelHS struct {
	srv *httptest.Server
	now func() time.Time

	mu     sync.Mutex
	tokens []*modelToken          // every token ever issued, in order
	fence  *modelToken            // the fenced appservice's token
	byTok  map[string]*modelToken // access token → its record
	byRef  map[string]*modelToken // refresh token → the access token it came with
	next   int
	// hold, when set, holds the next call other than a whoami until
	// release is closed (a client hangs up meanwhile).
	hold *modelHold
	// onHold, if set, is told of each hold taken (tests of the check).
	onHold func(*modelHold)
	// whoamis counts the homeserver's whoami calls per access token,
	// masquerade user and client address ("tok|user|addr", and "|device"
	// with a device masquerade: an
	// appservice's answers are kept per client address, so a lookup
	// from another one is no sign of a dropped entry).
	whoamis map[string]int
	// locked: users the admin API or MSC4323 locked (Synapse answers
	// 401 M_USER_LOCKED, soft_logout, and keeps their tokens);
	// masLocked: users MAS locked (provision_user "locked": true: MAS
	// calls their tokens inactive, Synapse answers M_UNKNOWN_TOKEN);
	// deactivated: users who may not log in.
	locked, masLocked, deactivated map[string]bool
	// dehydrated is each user's dehydrated device (MSC3814).
	dehydrated map[string]string
	// admins are the server admins (modelAdmin at first).
	admins map[string]bool
}

type modelHold struct{ arrived, release chan struct{} }

// modelToken is an access token. Revoked tokens stay, with revoked set.
type modelToken struct {
	tok, user, device string
	refresh           string    // "" for a token that cannot be refreshed
	exp               time.Time // zero: no expiry
	prev              *modelToken
	revoked           bool
	appservice        bool
	// fenced: an appservice whose ip_range_whitelist admits only
	// modelFencedAddr; its users are @fenced_….
	fenced bool
	// guest: a guest account's token (is_guest in whoami).
	guest bool
	// mas: MAS issued the token; its expiry (exp) is only told by MAS's
	// introspection (expires_in), never announced to the proxy.
	mas bool
}

const (
	modelServer   = "hs"
	modelMASToken = "mas-shared-secret-for-the-model"
	modelASToken  = "as_token_of_the_bridge"
	modelASUser   = "@as_bot:hs"
	// The fenced appservice: ip_range_whitelist admits only
	// modelFencedAddr (a client connecting from there, see the rig).
	modelFenceToken = "as_token_of_the_fenced_bridge"
	modelFenceUser  = "@fence_bot:hs"
	modelFencedAddr = "127.0.0.3"
	// modelMASExpiry is the lifetime of a token MAS issues: shorter
	// than CACHE_TTL, so only introspection bounds it in the cache.
	modelMASExpiry = 50*time.Second + 500*time.Millisecond
	// modelAdmin is the server admin among the model's users.
	modelAdmin = "@u0:hs"
	// modelExpiry is what /login announces for refreshable tokens: half a
	// second off whole seconds, so that the check's clock, which moves in
	// whole seconds, never lands on an expiry (Synapse's and the proxy's
	// rules at that instant may differ by a millisecond).
	modelExpiry = 30*time.Second + 500*time.Millisecond
)

// modelUsers are the users operations name by index; bridge_ users are in
// the appservice's namespace.
var modelUsers = []string{"@u0:hs", "@u1:hs", "@u2:hs", "@bridge_a:hs", "@bridge_b:hs", "@fenced_a:hs"}

// newModelHS starts a model; the caller closes m.srv.
func newModelHS(now func() time.Time) *modelHS {
	m := &modelHS{now: now, byTok: map[string]*modelToken{}, byRef: map[string]*modelToken{}, whoamis: map[string]int{},
		locked: map[string]bool{}, masLocked: map[string]bool{}, deactivated: map[string]bool{}, dehydrated: map[string]string{},
		admins: map[string]bool{modelAdmin: true}}
	as := &modelToken{tok: modelASToken, user: modelASUser, appservice: true}
	m.tokens = append(m.tokens, as)
	m.byTok[as.tok] = as
	// The fenced appservice's token is kept apart from tokens, so that
	// the operands of sequences written before it name the same tokens.
	m.fence = &modelToken{tok: modelFenceToken, user: modelFenceUser, appservice: true, fenced: true}
	m.byTok[m.fence.tok] = m.fence
	m.srv = httptest.NewServer(http.HandlerFunc(m.serve))
	return m
}

// issue makes a token; the caller holds mu.
func (m *modelHS) issue(user, device string, refreshable bool) *modelToken {
	m.next++
	t := &modelToken{tok: fmt.Sprintf("syt_%s_%d", strings.Trim(strings.SplitN(user, ":", 2)[0], "@"), m.next), user: user, device: device}
	if refreshable {
		t.refresh = fmt.Sprintf("syr_%d", m.next)
		t.exp = m.now().Add(modelExpiry)
		m.byRef[t.refresh] = t
	}
	m.tokens = append(m.tokens, t)
	m.byTok[t.tok] = t
	return t
}

// revokeWhere revokes live tokens; the caller holds mu. The appservice's
// token is never revoked.
func (m *modelHS) revokeWhere(match func(*modelToken) bool) []*modelToken {
	var out []*modelToken
	for _, t := range m.tokens {
		if !t.revoked && !t.appservice && match(t) {
			t.revoked = true
			if t.refresh != "" {
				delete(m.byRef, t.refresh)
			}
			out = append(out, t)
		}
	}
	return out
}

// modelAsk is a request's credentials as Synapse reads them: the token,
// the masquerade parameters (user_id; device_id, MSC3202's stable name,
// which Synapse 1.163 reads; its unstable org.matrix.msc3202.device_id,
// which it ignores) and the client's address.
type modelAsk struct {
	tok, asUser, asDevice string
	hasUser, hasDevice    bool
	from                  string
}

// modelAnswer is what a whoami answers.
type modelAnswer struct {
	status       int
	user, device string
	guest        bool
	errcode      string
	soft         bool
}

func (a modelAnswer) String() string {
	if a.status != 200 {
		return fmt.Sprint(a.status)
	}
	return fmt.Sprintf("%d %s %s guest=%t", a.status, a.user, a.device, a.guest)
}

// answer is what a whoami for tok (with an optional masquerade user)
// answers, from the proxy's own address.
func (m *modelHS) answer(tok, asUser string) modelAnswer {
	return m.ask(modelAsk{tok: tok, asUser: asUser, hasUser: asUser != ""})
}

func (m *modelHS) ask(q modelAsk) modelAnswer {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.answerLocked(q)
}

// answerLocked follows Synapse's Auth.get_user_by_req
// (synapse/api/auth/internal.py, base.py get_appservice_user).
func (m *modelHS) answerLocked(q modelAsk) modelAnswer {
	unknown := modelAnswer{status: 401, errcode: "M_UNKNOWN_TOKEN"}
	t, ok := m.byTok[q.tok]
	if !ok || t.revoked {
		return unknown
	}
	if t.appservice {
		// Outside its ip_range_whitelist an appservice's token is no
		// appservice's, and no user's either.
		if t.fenced && q.from != modelFencedAddr {
			return unknown
		}
		user := t.user
		if q.hasUser {
			// validate_appservice_can_control_user_id: its sender or a
			// user in its namespace.
			prefix := "@bridge_"
			if t.fenced {
				prefix = "@fenced_"
			}
			if q.asUser != t.user && !strings.HasPrefix(q.asUser, prefix) {
				return modelAnswer{status: 403, errcode: "M_EXCLUSIVE"}
			}
			user = q.asUser
		}
		if q.hasDevice {
			// Any device_id, even an empty one, must name a device.
			if !m.deviceExists(user, q.asDevice) {
				return modelAnswer{status: 400, errcode: "M_UNKNOWN_DEVICE"}
			}
			return modelAnswer{status: 200, user: user, device: q.asDevice}
		}
		return modelAnswer{status: 200, user: user}
	}
	// An ordinary token ignores masquerade parameters.
	if !t.exp.IsZero() && m.now().After(t.exp) {
		// MAS calls an expired token inactive; Synapse's own
		// refreshable tokens expire softly.
		return modelAnswer{status: 401, errcode: "M_UNKNOWN_TOKEN", soft: !t.mas}
	}
	if m.locked[t.user] {
		return modelAnswer{status: 401, errcode: "M_USER_LOCKED", soft: true}
	}
	if m.masLocked[t.user] {
		return unknown
	}
	return modelAnswer{status: 200, user: t.user, device: t.device, guest: t.guest}
}

// deviceExists: a device exists while a token of it lives, or as the
// user's dehydrated device (a model: Synapse keeps a device after a
// refresh or a revocation made behind its back deleted its last token).
func (m *modelHS) deviceExists(user, device string) bool {
	if device == "" {
		return false
	}
	if m.dehydrated[user] == device {
		return true
	}
	for _, t := range m.tokens {
		if !t.revoked && t.user == user && t.device == device {
			return true
		}
	}
	return false
}

func (m *modelHS) whoamiCount(tok string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.whoamis[tok+"||127.0.0.1"]
}

func (m *modelHS) serve(w http.ResponseWriter, r *http.Request) {
	body := make([]byte, 0, 512)
	buf := make([]byte, 512)
	for {
		n, err := r.Body.Read(buf)
		body = append(body, buf[:n]...)
		if err != nil {
			break
		}
	}
	m.mu.Lock()
	if h := m.hold; h != nil && !strings.HasSuffix(r.URL.Path, "/account/whoami") {
		m.hold = nil
		if m.onHold != nil {
			m.onHold(h)
		}
		m.mu.Unlock()
		close(h.arrived)
		<-h.release
		m.mu.Lock()
	}
	defer m.mu.Unlock()
	path := r.URL.Path
	switch {
	case path == "/_matrix/client/versions":
		writeJSON(w, 200, `{"versions":["v1.11"]}`)
		return
	case r.Method == "POST" && strings.HasSuffix(path, "/login"):
		m.serveLogin(w, body)
		return
	case r.Method == "POST" && strings.HasSuffix(path, "/register") && r.URL.Query().Get("kind") == "guest":
		// A guest account: a numeric localpart, is_guest in whoami.
		t := m.issue(fmt.Sprintf("@%d:%s", m.next+1, modelServer), fmt.Sprintf("GUEST%d", m.next+1), false)
		t.guest = true
		writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"device_id":%q,"access_token":%q}`, t.user, t.device, t.tok))
		return
	case r.Method == "POST" && strings.HasSuffix(path, "/refresh"):
		var req struct {
			Refresh string `json:"refresh_token"`
		}
		_ = json.Unmarshal(body, &req)
		old, ok := m.byRef[req.Refresh]
		if !ok {
			writeJSON(w, 401, `{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid refresh token","soft_logout":false}`)
			return
		}
		delete(m.byRef, req.Refresh)
		// Synapse deletes the access token issued before the one being
		// refreshed (handlers/auth.py refresh_token).
		if old.prev != nil {
			m.revokeWhere(func(t *modelToken) bool { return t == old.prev })
		}
		nt := m.issue(old.user, old.device, true)
		nt.prev = old
		writeJSON(w, 200, fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"expires_in_ms":%d}`, nt.tok, nt.refresh, modelExpiry.Milliseconds()))
		return
	}
	tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if q := r.URL.Query().Get("access_token"); q != "" {
		if tok != "" {
			writeJSON(w, 401, `{"errcode":"M_MISSING_TOKEN","error":"Mixing Authorization headers and access_token query parameters."}`)
			return
		}
		tok = q
	}
	if strings.HasPrefix(path, "/_synapse/mas/") {
		m.serveMAS(w, path, tok, body)
		return
	}
	if tok == "" && m.serveTokenless(w, r.Method, path, body) {
		return
	}
	if strings.HasSuffix(path, "/account/whoami") {
		// Counted per token and masquerade (a 403 is never cached).
		k := tok + "|" + r.URL.Query().Get("user_id") + "|" + r.Header.Get("X-Forwarded-For")
		if q := r.URL.Query(); q.Has("device_id") || q.Has("org.matrix.msc3202.device_id") {
			k += "|device"
		}
		m.whoamis[k]++
	}
	if tok == "" {
		writeJSON(w, 401, `{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}`)
		return
	}
	qv := r.URL.Query()
	_, hasUser := qv["user_id"]
	_, hasDevice := qv["device_id"]
	// The proxy names the client in X-Forwarded-For (Synapse behind a
	// proxy reads it, x_forwarded).
	a := m.answerLocked(modelAsk{tok: tok, asUser: qv.Get("user_id"), asDevice: qv.Get("device_id"),
		hasUser: hasUser, hasDevice: hasDevice, from: r.Header.Get("X-Forwarded-For")})
	isLogout := r.Method == "POST" && (strings.HasSuffix(path, "/logout") || strings.HasSuffix(path, "/logout/all"))
	if t := m.byTok[tok]; isLogout && (a.errcode == "M_USER_LOCKED" || (a.soft && a.errcode == "M_UNKNOWN_TOKEN")) {
		// Logging out admits a locked user (MSC3939, allow_locked) and
		// an expired token (allow_expired): Synapse deletes its device,
		// or with logout/all every device of its user.
		a = modelAnswer{status: 200, user: t.user, device: t.device}
	}
	switch a.status {
	case 401:
		writeJSON(w, 401, fmt.Sprintf(`{"errcode":%q,"error":"Invalid access token passed.","soft_logout":%t}`, a.errcode, a.soft))
		return
	case 403:
		writeJSON(w, 403, `{"errcode":"M_EXCLUSIVE","error":"Application service cannot masquerade as this user"}`)
		return
	case 400:
		writeJSON(w, 400, `{"errcode":"M_UNKNOWN_DEVICE","error":"Application service trying to use a device that doesn't exist"}`)
		return
	}
	user, device := a.user, a.device
	if a.guest && !strings.HasSuffix(path, "/account/whoami") && !strings.HasSuffix(path, "/sync") {
		// Guests may whoami and sync; the revoking calls refuse them.
		writeJSON(w, 403, `{"errcode":"M_GUEST_ACCESS_FORBIDDEN","error":"Guest access not allowed"}`)
		return
	}
	caller := m.byTok[tok]
	switch {
	case strings.HasSuffix(path, "/account/whoami"):
		dev := ""
		if device != "" {
			dev = fmt.Sprintf(`,"device_id":%q`, device)
		}
		writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":%t%s}`, user, a.guest, dev))
	case r.Method == "POST" && strings.HasSuffix(path, "/logout/all"):
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		writeJSON(w, 200, `{}`)
	case r.Method == "POST" && strings.HasSuffix(path, "/logout"):
		// Synapse deletes the device, hence all its tokens; an
		// appservice without a device deletes nothing (its token is
		// no access token).
		m.revokeWhere(func(t *modelToken) bool { return t == caller || (device != "" && t.user == user && t.device == device) })
		writeJSON(w, 200, `{}`)
	case strings.Contains(path, "dehydrated_device"):
		m.serveDehydrated(w, r.Method, user, body)
	case strings.HasPrefix(path, "/_synapse/admin/"):
		if !m.admins[user] {
			writeJSON(w, 403, `{"errcode":"M_FORBIDDEN","error":"You are not a server admin"}`)
			return
		}
		rest := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/_synapse/admin/"), "/")
		for i := range rest {
			if u, err := url.PathUnescape(rest[i]); err == nil {
				rest[i] = u
			}
		}
		switch {
		case r.Method == "POST" && len(rest) == 3 && rest[1] == "deactivate":
			m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] })
			m.deactivated[rest[2]] = true
			writeJSON(w, 200, `{"id_server_unbind_result":"success"}`)
		case r.Method == "PUT" && len(rest) == 3 && rest[0] == "v2" && rest[1] == "users":
			// Locking keeps the user's tokens: Synapse refuses them
			// (M_USER_LOCKED) while the lock lasts.
			// UserRestServletV2.on_PUT, for an existing user: a
			// password (set_password: every token of the user but
			// the requester's own, unless logout_devices is false),
			// deactivated, locked; both of the last two is a 400.
			var req struct {
				Locked        *bool   `json:"locked"`
				Deactivated   *bool   `json:"deactivated"`
				Password      *string `json:"password"`
				LogoutDevices *bool   `json:"logout_devices"`
				Admin         *bool   `json:"admin"`
			}
			if json.Unmarshal(body, &req) != nil || (req.Locked != nil && *req.Locked && req.Deactivated != nil && *req.Deactivated) {
				writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"An user can't be deactivated and locked"}`)
				return
			}
			if req.Admin != nil && m.admins[rest[2]] != *req.Admin {
				if rest[2] == user && !*req.Admin {
					writeJSON(w, 400, `{"errcode":"M_UNKNOWN","error":"You may not demote yourself."}`)
					return
				}
				m.admins[rest[2]] = *req.Admin
			}
			if req.Password != nil && (req.LogoutDevices == nil || *req.LogoutDevices) {
				m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] && t != caller })
			}
			if req.Deactivated != nil {
				if *req.Deactivated {
					m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] })
				}
				m.deactivated[rest[2]] = *req.Deactivated
			}
			if req.Locked != nil {
				m.locked[rest[2]] = *req.Locked
			}
			writeJSON(w, 200, fmt.Sprintf(`{"name":%q}`, rest[2]))
		case r.Method == "POST" && len(rest) == 3 && rest[1] == "reset_password":
			var req struct {
				LogoutDevices *bool `json:"logout_devices"`
			}
			_ = json.Unmarshal(body, &req)
			if req.LogoutDevices == nil || *req.LogoutDevices {
				// Synapse keeps the requester's own token (set_password).
				m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] && t != caller })
			}
			writeJSON(w, 200, `{}`)
		case len(rest) == 4 && rest[0] == "v1" && rest[1] == "users" && rest[3] == "admin":
			// UserAdminServlet: GET the flag, PUT it (an admin may
			// not demote themselves).
			if r.Method == "GET" {
				writeJSON(w, 200, fmt.Sprintf(`{"admin":%t}`, m.admins[rest[2]]))
				return
			}
			var req struct {
				Admin *bool `json:"admin"`
			}
			if json.Unmarshal(body, &req) != nil || req.Admin == nil {
				writeJSON(w, 400, `{"errcode":"M_MISSING_PARAM","error":"Missing param 'admin'"}`)
				return
			}
			if rest[2] == user && !*req.Admin {
				writeJSON(w, 400, `{"errcode":"M_UNKNOWN","error":"You may not demote yourself."}`)
				return
			}
			m.admins[rest[2]] = *req.Admin
			writeJSON(w, 200, `{}`)
		case r.Method == "POST" && len(rest) == 4 && rest[1] == "users" && rest[3] == "delete_devices":
			var req struct {
				Devices []string `json:"devices"`
			}
			_ = json.Unmarshal(body, &req)
			m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] && slices.Contains(req.Devices, t.device) })
			writeJSON(w, 200, `{}`)
		case r.Method == "DELETE" && len(rest) == 5 && rest[1] == "users" && rest[3] == "devices":
			m.revokeWhere(func(t *modelToken) bool { return t.user == rest[2] && t.device == rest[4] })
			writeJSON(w, 200, `{}`)
		default:
			writeJSON(w, 404, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`)
		}
	case r.Method == "DELETE" && strings.Contains(path, "/devices/"),
		r.Method == "POST" && strings.HasSuffix(path, "/delete_devices"):
		var req struct {
			Devices []string        `json:"devices"`
			Auth    json.RawMessage `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		if !modelUIA(w, req.Auth) {
			return
		}
		if r.Method == "DELETE" {
			// Like Synapse: the raw segment, unquoted.
			raw := r.URL.EscapedPath()
			d, err := url.PathUnescape(raw[strings.LastIndex(raw, "/")+1:])
			if err != nil {
				d = raw[strings.LastIndex(raw, "/")+1:]
			}
			req.Devices = []string{d}
		}
		m.revokeWhere(func(t *modelToken) bool { return t.user == user && slices.Contains(req.Devices, t.device) })
		writeJSON(w, 200, `{}`)
	case r.Method == "POST" && strings.HasSuffix(path, "/account/password"):
		var req struct {
			LogoutDevices *bool           `json:"logout_devices"`
			Auth          json.RawMessage `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		if !modelUIA(w, req.Auth) {
			return
		}
		if req.LogoutDevices == nil || *req.LogoutDevices {
			// Synapse: delete_access_tokens_for_user(except the caller's
			// token) and the devices other than the caller's.
			m.revokeWhere(func(t *modelToken) bool { return t.user == user && t != caller })
		}
		writeJSON(w, 200, `{}`)
	case r.Method == "POST" && strings.HasSuffix(path, "/account/deactivate"):
		var req struct {
			Auth json.RawMessage `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		if !modelUIA(w, req.Auth) {
			return
		}
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		m.deactivated[user] = true
		writeJSON(w, 200, `{"id_server_unbind_result":"no-support"}`)
	case strings.Contains(path, "/admin/lock/"):
		// Account locking of spec v1.18 (MSC4323): Synapse 1.163 does
		// not serve it.
		writeJSON(w, 404, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`)
	default:
		writeJSON(w, 200, `{}`)
	}
}

// serveMAS plays synapse/rest/synapse/mas/: the shared secret is the
// caller, users are named by localpart.
func (m *modelHS) serveMAS(w http.ResponseWriter, path, tok string, body []byte) {
	if tok != modelMASToken {
		writeJSON(w, 403, `{"errcode":"M_FORBIDDEN","error":"This endpoint must only be called by MAS"}`)
		return
	}
	var req struct {
		Localpart string   `json:"localpart"`
		DeviceID  string   `json:"device_id"`
		Devices   []string `json:"devices"`
	}
	if json.Unmarshal(body, &req) != nil || req.Localpart == "" {
		writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"bad body"}`)
		return
	}
	user := "@" + req.Localpart + ":" + modelServer
	switch path {
	case "/_synapse/mas/delete_device":
		m.revokeWhere(func(t *modelToken) bool { return t.user == user && t.device == req.DeviceID })
	case "/_synapse/mas/sync_devices":
		m.revokeWhere(func(t *modelToken) bool { return t.user == user && !slices.Contains(req.Devices, t.device) })
	case "/_synapse/mas/delete_user":
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		m.deactivated[user] = true
	case "/_synapse/mas/reactivate_user":
		// activate_account: the account may log in again; its tokens
		// stay deleted, and a lock stays (Synapse's locked flag is
		// MAS's to set with provision_user).
		delete(m.deactivated, user)
	case "/_synapse/mas/provision_user":
		var p struct {
			Locked *bool `json:"locked"`
		}
		_ = json.Unmarshal(body, &p)
		if p.Locked != nil {
			m.masLocked[user] = *p.Locked
		}
	}
	w.WriteHeader(200)
}

func modelUIA(w http.ResponseWriter, auth json.RawMessage) bool {
	var a struct {
		Password string `json:"password"`
	}
	if len(auth) == 0 {
		writeJSON(w, 401, `{"session":"uia1","flows":[{"stages":["m.login.password"]}],"params":{}}`)
		return false
	}
	if json.Unmarshal(auth, &a) != nil || a.Password != hsPassword {
		writeJSON(w, 401, `{"session":"uia1","flows":[{"stages":["m.login.password"]}],"params":{},"errcode":"M_FORBIDDEN","error":"Invalid password"}`)
		return false
	}
	return true
}

func (m *modelHS) serveLogin(w http.ResponseWriter, body []byte) {
	var req struct {
		User         string `json:"user"`
		DeviceID     string `json:"device_id"`
		RefreshToken bool   `json:"refresh_token"`
	}
	if json.Unmarshal(body, &req) != nil || req.User == "" {
		writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"bad login"}`)
		return
	}
	if m.deactivated[req.User] {
		writeJSON(w, 403, `{"errcode":"M_USER_DEACTIVATED","error":"This account has been deactivated"}`)
		return
	}
	if req.DeviceID == "" {
		req.DeviceID = fmt.Sprintf("NEW%d", m.next+1)
	}
	// Logging in with an existing device_id: Synapse 1.163 keeps the
	// device's other tokens valid (TestE2ERevokingCalls "login device
	// reuse"), though the spec says a server should invalidate them.
	t := m.issue(req.User, req.DeviceID, req.RefreshToken)
	extra := ""
	if t.refresh != "" {
		extra = fmt.Sprintf(`,"expires_in_ms":%d,"refresh_token":%q`, modelExpiry.Milliseconds(), t.refresh)
	}
	writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"device_id":%q,"access_token":%q%s}`, req.User, req.DeviceID, t.tok, extra))
}

// serveDehydrated plays MSC3814's dehydrated_device (DehydratedDeviceV2Servlet):
// PUT stores a dehydrated device and deletes the previous one (even when
// it has the same ID: store_dehydrated_device returns the old ID and
// delete_devices deletes it); DELETE deletes it.
func (m *modelHS) serveDehydrated(w http.ResponseWriter, method, user string, body []byte) {
	old, had := m.dehydrated[user]
	switch method {
	case "PUT":
		var req struct {
			DeviceID string `json:"device_id"`
		}
		if json.Unmarshal(body, &req) != nil || req.DeviceID == "" {
			writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"device_id missing"}`)
			return
		}
		m.dehydrated[user] = req.DeviceID
		if had {
			m.revokeWhere(func(t *modelToken) bool { return t.user == user && t.device == old })
		}
		writeJSON(w, 200, fmt.Sprintf(`{"device_id":%q}`, req.DeviceID))
	case "DELETE":
		if !had {
			writeJSON(w, 404, `{"errcode":"M_NOT_FOUND","error":"No dehydrated device available"}`)
			return
		}
		delete(m.dehydrated, user)
		m.revokeWhere(func(t *modelToken) bool { return t.user == user && t.device == old })
		writeJSON(w, 200, fmt.Sprintf(`{"device_id":%q}`, old))
	default:
		writeJSON(w, 200, `{}`)
	}
}

// serveTokenless plays the revoking calls that carry no token: a password
// reset by email (user-interactive auth with m.login.email.identity; the
// model's session ID names the user) and OIDC back-channel logout (the
// model's logout_token names the user whose sessions end). It returns
// false for other calls.
func (m *modelHS) serveTokenless(w http.ResponseWriter, method, path string, body []byte) bool {
	switch {
	case method == "POST" && strings.HasSuffix(path, "/account/password"):
		var req struct {
			Auth struct {
				Type  string `json:"type"`
				Creds struct {
					SID string `json:"sid"`
				} `json:"threepid_creds"`
			} `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		user := req.Auth.Creds.SID
		if req.Auth.Type != "m.login.email.identity" || !slices.Contains(modelUsers, user) {
			writeJSON(w, 401, `{"session":"uia2","flows":[{"stages":["m.login.email.identity"]}],"params":{}}`)
			return true
		}
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		writeJSON(w, 200, `{}`)
		return true
	case method == "POST" && path == "/_synapse/client/oidc/backchannel_logout":
		v, _ := url.ParseQuery(string(body))
		user, ok := strings.CutPrefix(v.Get("logout_token"), "valid:")
		if !ok {
			writeJSON(w, 400, `{"error":"invalid_request","error_description":"Invalid logout token"}`)
			return true
		}
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		writeJSON(w, 200, `{}`)
		return true
	}
	return false
}

// issueMAS is MAS issuing a token (its compatibility or OAuth session):
// Synapse learns of it at introspection, with expires_in.
func (m *modelHS) issueMAS(user, device string) *modelToken {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := m.issue(user, device, false)
	t.mas = true
	t.exp = m.now().Add(modelMASExpiry)
	return t
}

// Introspect is MAS's introspection endpoint as the proxy asks it
// (Config.Introspector): active while Synapse would accept the token, and
// a MAS token's expiry. Synapse's own tokens carry none.
func (m *modelHS) Introspect(_ context.Context, token string) (upstream.Introspection, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.byTok[token]
	if !ok {
		return upstream.Introspection{}, nil
	}
	a := m.answerLocked(modelAsk{tok: token})
	in := upstream.Introspection{Active: a.status == 200 || a.errcode == "M_USER_LOCKED"}
	if t.mas {
		in.Exp = t.exp
	}
	return in, nil
}
