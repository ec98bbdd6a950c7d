package proxy

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// fakeHS is a small homeserver with just enough of the Client-Server API to
// hold sessions and revoke them the way Synapse does. It records what it
// received, so tests can assert on that.
type fakeHS struct {
	t   testing.TB
	srv *httptest.Server

	mu       sync.Mutex
	sessions map[string]session // access token → session
	received []received
	nextID   int
	// expiresInMS, when set, is announced by /login for new tokens.
	expiresInMS int64

	whoamiCalls atomic.Int64
	adminCalls  atomic.Int64
	// guests and admins are users whose whoami says is_guest, and whom the
	// Synapse admin API admits.
	guests, admins map[string]bool
	// whoamiGate, when set, holds every whoami until it is closed or sent on.
	whoamiGate chan struct{}
	// override, when set, answers requests first; it returns false to let
	// the fake go on.
	override func(w http.ResponseWriter, r *http.Request) bool
}

func (hs *fakeHS) setOverride(f func(w http.ResponseWriter, r *http.Request) bool) {
	hs.mu.Lock()
	hs.override = f
	hs.mu.Unlock()
}

type session struct{ user, device string }

type received struct {
	Method, RequestURI string
	Header             http.Header
	Body               []byte
}

const hsPassword = "correct horse"

func newFakeHS(t testing.TB) *fakeHS {
	t.Helper()
	hs := &fakeHS{t: t, sessions: map[string]session{}, guests: map[string]bool{}, admins: map[string]bool{}}
	hs.srv = httptest.NewServer(http.HandlerFunc(hs.serve))
	t.Cleanup(hs.srv.Close)
	return hs
}

// login creates a session and returns its token.
func (hs *fakeHS) login(user, device string) string {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.nextID++
	tok := fmt.Sprintf("syt_%s_%s_%06d", strings.Trim(user, "@:"), device, hs.nextID)
	hs.sessions[tok] = session{user, device}
	return tok
}

// revoke removes sessions behind the proxy's back (the admin API would).
func (hs *fakeHS) revoke(match func(tok string, s session) bool) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	for tok, s := range hs.sessions {
		if match(tok, s) {
			delete(hs.sessions, tok)
		}
	}
}

func (hs *fakeHS) requests() []received {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return append([]received(nil), hs.received...)
}

// lastRequest returns the last request whose RequestURI contains substr.
func (hs *fakeHS) lastRequest(substr string) (received, bool) {
	reqs := hs.requests()
	for i := len(reqs) - 1; i >= 0; i-- {
		if strings.Contains(reqs[i].RequestURI, substr) {
			return reqs[i], true
		}
	}
	return received{}, false
}

func writeJSON(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-cache, no-store, must-revalidate")
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS")
	w.Header().Set("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date")
	w.Header().Set("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server")
	w.Header().Set("Synapse-Trace-Id", fmt.Sprint(time.Now().UnixNano()))
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

const unknownToken = `{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":false}`

func (hs *fakeHS) serve(w http.ResponseWriter, r *http.Request) {
	hs.mu.Lock()
	override := hs.override
	hs.mu.Unlock()
	// An override sees the body unread (it may test streaming) and its
	// request is recorded without a body.
	var body []byte
	if override == nil || !override(w, r) {
		body, _ = io.ReadAll(r.Body)
		override = nil
	}
	hs.mu.Lock()
	hs.received = append(hs.received, received{r.Method, r.RequestURI, r.Header.Clone(), body})
	hs.mu.Unlock()
	if override != nil {
		return
	}
	path := r.URL.EscapedPath()
	if path == "/_matrix/client/versions" {
		writeJSON(w, 200, `{"versions":["v1.11"]}`)
		return
	}
	if strings.HasSuffix(path, "/account/whoami") {
		hs.whoamiCalls.Add(1)
		if hs.whoamiGate != nil {
			<-hs.whoamiGate
		}
	}
	if strings.HasSuffix(path, "/login") && r.Method == http.MethodPost {
		hs.serveLogin(w, body)
		return
	}
	// Like Synapse: "Bearer " exactly, or access_token, never both.
	tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	// Synapse's query parsing (Twisted's parse_qs), first value.
	if q := synapseQuery(r.URL.RawQuery)["access_token"]; len(q) > 0 && q[0] != "" {
		q := q[0]
		if tok != "" {
			writeJSON(w, 401, `{"errcode":"M_MISSING_TOKEN","error":"Mixing Authorization headers and access_token query parameters."}`)
			return
		}
		tok = q
	}
	if tok == "" {
		writeJSON(w, 401, `{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}`)
		return
	}
	hs.mu.Lock()
	s, ok := hs.sessions[tok]
	hs.mu.Unlock()
	if !ok {
		writeJSON(w, 401, unknownToken)
		return
	}
	if u := r.URL.Query().Get("user_id"); u != "" {
		if s.user != "@as_bot:hs" {
			writeJSON(w, 403, `{"errcode":"M_FORBIDDEN","error":"Application service cannot masquerade as this user"}`)
			return
		}
		s = session{u, r.URL.Query().Get("device_id")}
	}
	switch {
	case strings.HasSuffix(path, "/account/whoami"):
		dev := ""
		if s.device != "" {
			dev = fmt.Sprintf(`,"device_id":%q`, s.device)
		}
		hs.mu.Lock()
		guest := hs.guests[s.user]
		hs.mu.Unlock()
		writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"is_guest":%t%s}`, s.user, guest, dev))
	case r.Method == http.MethodGet && strings.HasPrefix(path, "/_synapse/admin/v1/users/") && strings.HasSuffix(path, "/admin"):
		hs.adminCalls.Add(1)
		hs.mu.Lock()
		isAdmin, named := hs.admins[s.user], hs.admins[r.URL.Path[len("/_synapse/admin/v1/users/"):len(r.URL.Path)-len("/admin")]]
		hs.mu.Unlock()
		if !isAdmin {
			writeJSON(w, 403, `{"errcode":"M_FORBIDDEN","error":"You are not a server admin"}`)
			return
		}
		writeJSON(w, 200, fmt.Sprintf(`{"admin":%t}`, named))
	case strings.HasSuffix(path, "/logout/all"):
		hs.revoke(func(_ string, o session) bool { return o.user == s.user })
		writeJSON(w, 200, `{}`)
	case strings.HasSuffix(path, "/logout"):
		hs.revoke(func(_ string, o session) bool { return o == s })
		writeJSON(w, 200, `{}`)
	case strings.HasSuffix(path, "/delete_devices"), r.Method == http.MethodDelete && strings.Contains(path, "/devices/"):
		var req struct {
			Devices []string        `json:"devices"`
			Auth    json.RawMessage `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		if !hs.uiaPassed(w, req.Auth) {
			return
		}
		if r.Method == http.MethodDelete {
			// Like Synapse: the raw segment, unquoted.
			req.Devices = []string{r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]}
		}
		for _, d := range req.Devices {
			hs.revoke(func(_ string, o session) bool { return o.user == s.user && o.device == d })
		}
		writeJSON(w, 200, `{}`)
	case strings.HasSuffix(path, "/account/password"):
		var req struct {
			LogoutDevices *bool           `json:"logout_devices"`
			Auth          json.RawMessage `json:"auth"`
		}
		_ = json.Unmarshal(body, &req)
		if !hs.uiaPassed(w, req.Auth) {
			return
		}
		if req.LogoutDevices == nil || *req.LogoutDevices {
			hs.revoke(func(t string, o session) bool { return o.user == s.user && t != tok })
		}
		writeJSON(w, 200, `{}`)
	case strings.HasSuffix(path, "/account/deactivate"):
		hs.revoke(func(_ string, o session) bool { return o.user == s.user })
		writeJSON(w, 200, `{"id_server_unbind_result":"no-support"}`)
	default:
		writeJSON(w, 200, `{"ok":true}`)
	}
}

// uiaPassed plays user-interactive auth: the first round gets a 401 with a
// session, a round with the right password passes.
func (hs *fakeHS) uiaPassed(w http.ResponseWriter, auth json.RawMessage) bool {
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

func (hs *fakeHS) serveLogin(w http.ResponseWriter, body []byte) {
	var req struct {
		User     string `json:"user"`
		DeviceID string `json:"device_id"`
	}
	if json.Unmarshal(body, &req) != nil || req.User == "" {
		writeJSON(w, 400, `{"errcode":"M_BAD_JSON","error":"bad login"}`)
		return
	}
	if req.DeviceID == "" {
		req.DeviceID = fmt.Sprintf("DEV%d", time.Now().UnixNano())
	} else {
		// Logging in with an existing device_id replaces its tokens.
		hs.revoke(func(_ string, o session) bool { return o.user == req.User && o.device == req.DeviceID })
	}
	tok := hs.login(req.User, req.DeviceID)
	exp := ""
	if hs.expiresInMS > 0 {
		exp = fmt.Sprintf(`,"expires_in_ms":%d,"refresh_token":"syr_x"`, hs.expiresInMS)
	}
	writeJSON(w, 200, fmt.Sprintf(`{"user_id":%q,"device_id":%q,"access_token":%q%s}`, req.User, req.DeviceID, tok, exp))
}

// harness is a proxy in front of a fakeHS, with its registry and logs.
type harness struct {
	t     testing.TB
	hs    *fakeHS
	p     *Proxy
	front *httptest.Server
	reg   *prometheus.Registry
	logs  *observer.ObservedLogs
	now   *fakeClock
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newHarness(t testing.TB, mods ...func(*Config)) *harness {
	t.Helper()
	h := &harness{t: t, hs: newFakeHS(t), reg: prometheus.NewRegistry(), now: &fakeClock{t: time.Unix(1_700_000_000, 0)}}
	core, logs := observer.New(zapcore.DebugLevel)
	h.logs = logs
	transport := upstream.NewTransport(time.Second)
	t.Cleanup(transport.CloseIdleConnections)
	hasher, err := tokencache.NewHasher([]byte("test hash key, 32 bytes long...."))
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Upstream:  mustParseURL(t, h.hs.srv.URL),
		Transport: transport,
		Hasher:    hasher,
		Cache: tokencache.Config{Size: 1000, TTL: 2 * time.Minute, NegativeTTL: 10 * time.Second,
			LookupTimeout: 2 * time.Second, Now: h.now.Now},
		Logger:     zap.New(core),
		Registerer: h.reg,
	}
	for _, m := range mods {
		m(&cfg)
	}
	if h.p, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	h.front = httptest.NewServer(h.p)
	t.Cleanup(h.front.Close)
	return h
}

// do sends a request through the proxy and returns the response with its
// body read. The client never follows redirects: the proxy must not make
// any.
func (h *harness) do(method, path string, hdr http.Header, body string) (*http.Response, string) {
	h.t.Helper()
	req, err := http.NewRequest(method, h.front.URL+path, strings.NewReader(body))
	if err != nil {
		h.t.Fatal(err)
	}
	if body == "" {
		req.Body = http.NoBody
		req.ContentLength = 0
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp, string(b)
}

func bearer(tok string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }

// whoami asks whoami through the proxy with a header token and returns the
// status and body.
func (h *harness) whoami(tok string) (int, string) {
	h.t.Helper()
	resp, body := h.do("GET", whoamiV3, bearer(tok), "")
	return resp.StatusCode, body
}

// counter sums the series of a counter or gauge whose labels match the
// given name/value pairs.
func (h *harness) counter(name string, labels ...string) float64 {
	h.t.Helper()
	var sum float64
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if got[labels[i]] != labels[i+1] {
					continue metric
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

func mustParseURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
