package proxy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
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
	byTok  map[string]*modelToken // access token → its record
	byRef  map[string]*modelToken // refresh token → the access token it came with
	next   int
	// hold, when set, holds the next call other than a whoami until
	// release is closed (a client hangs up meanwhile).
	hold *modelHold
	// onHold, if set, is told of each hold taken (tests of the check).
	onHold func(*modelHold)
	// whoamis counts the homeserver's whoami calls per access token and
	// masquerade user ("tok|user").
	whoamis map[string]int
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
}

const (
	modelServer   = "hs"
	modelMASToken = "mas-shared-secret-for-the-model"
	modelASToken  = "as_token_of_the_bridge"
	modelASUser   = "@as_bot:hs"
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
var modelUsers = []string{"@u0:hs", "@u1:hs", "@u2:hs", "@bridge_a:hs", "@bridge_b:hs"}

// newModelHS starts a model; the caller closes m.srv.
func newModelHS(now func() time.Time) *modelHS {
	m := &modelHS{now: now, byTok: map[string]*modelToken{}, byRef: map[string]*modelToken{}, whoamis: map[string]int{}}
	as := &modelToken{tok: modelASToken, user: modelASUser, appservice: true}
	m.tokens = append(m.tokens, as)
	m.byTok[as.tok] = as
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

// answer is what a whoami for tok (with an optional masquerade user)
// answers: the status, the user and the device.
func (m *modelHS) answer(tok, asUser string) (int, string, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.answerLocked(tok, asUser)
}

func (m *modelHS) answerLocked(tok, asUser string) (int, string, string) {
	t, ok := m.byTok[tok]
	if !ok || t.revoked || (!t.exp.IsZero() && m.now().After(t.exp)) {
		return 401, "", ""
	}
	if asUser != "" {
		// Synapse: only an appservice may masquerade, and only as a user
		// in its namespace.
		if !t.appservice || !strings.HasPrefix(asUser, "@bridge_") {
			return 403, "", ""
		}
		return 200, asUser, ""
	}
	return 200, t.user, t.device
}

func (m *modelHS) whoamiCount(tok string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.whoamis[tok+"|"]
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
	if strings.HasSuffix(path, "/account/whoami") {
		// Counted per token and masquerade (a 403 is never cached).
		m.whoamis[tok+"|"+r.URL.Query().Get("user_id")]++
	}
	if tok == "" {
		writeJSON(w, 401, `{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}`)
		return
	}
	status, user, device := m.answerLocked(tok, r.URL.Query().Get("user_id"))
	switch status {
	case 401:
		soft := false
		if t, ok := m.byTok[tok]; ok && !t.revoked {
			soft = true // expired
		}
		writeJSON(w, 401, fmt.Sprintf(`{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":%t}`, soft))
		return
	case 403:
		writeJSON(w, 403, `{"errcode":"M_EXCLUSIVE","error":"Application service cannot masquerade as this user"}`)
		return
	}
	caller := m.byTok[tok]
	switch {
	case strings.HasSuffix(path, "/account/whoami"):
		dev := ""
		if device != "" {
			dev = fmt.Sprintf(`,"device_id":%q`, device)
		}
		writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":false%s}`, user, dev))
	case r.Method == "POST" && strings.HasSuffix(path, "/logout/all"):
		m.revokeWhere(func(t *modelToken) bool { return t.user == user })
		writeJSON(w, 200, `{}`)
	case r.Method == "POST" && strings.HasSuffix(path, "/logout"):
		// Synapse deletes the device, hence all its tokens.
		m.revokeWhere(func(t *modelToken) bool { return t == caller || (device != "" && t.user == user && t.device == device) })
		writeJSON(w, 200, `{}`)
	case strings.HasPrefix(path, "/_synapse/admin/"):
		if user != modelAdmin {
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
			writeJSON(w, 200, `{"id_server_unbind_result":"success"}`)
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
		writeJSON(w, 200, `{"id_server_unbind_result":"no-support"}`)
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
