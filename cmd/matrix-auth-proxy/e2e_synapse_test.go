package main_test

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// e2eRefreshLifetime is refreshable_access_token_lifetime of the test
// Synapses: short, so the refresh test sees a token expire. Only that test
// logs in with refresh_token: true; every other token never expires.
const e2eRefreshLifetime = 8 * time.Second

// e2eSynapse is a Synapse started by deploy/local/synapse.sh.
type e2eSynapse struct {
	URL  string // http://127.0.0.1:PORT
	Data string // SYNAPSE_DATA
	port string
	// Bridge is an appservice that may be used from any address; Fenced
	// one whose ip_range_whitelist admits only e2eFencedAddr. Both are
	// registered on every test Synapse (see e2eWriteExtraConfig).
	Bridge, Fenced e2eAppService
}

// e2eAppService is an appservice registered on a test Synapse.
type e2eAppService struct {
	Token  string // as_token
	Sender string // @sender_localpart:localhost
	// Prefix is the localpart prefix of the users in its exclusive
	// namespace: Prefix+"anything" may be masqueraded as.
	Prefix string
}

// e2eFencedAddr is the one client address the Fenced appservice's
// ip_range_whitelist admits (Synapse reads it from X-Forwarded-For, which
// the proxy sets; see e2eClientFrom).
const e2eFencedAddr = "127.0.0.3"

// e2eWriteExtraConfig writes the appservice registrations and the extra
// homeserver.yaml of a test Synapse into its data dir, followed by more
// (YAML that repeats none of its keys), and returns the path for
// SYNAPSE_EXTRA_CONFIG.
func e2eWriteExtraConfig(s *e2eSynapse, more string) (string, error) {
	randHex := func() string {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		return hex.EncodeToString(b)
	}
	var files []string
	for _, as := range []struct {
		id  string
		dst *e2eAppService
		ips string
	}{
		{"bridge", &s.Bridge, ""},
		{"fenced", &s.Fenced, "ip_range_whitelist: ['" + e2eFencedAddr + "/32']\n"},
	} {
		*as.dst = e2eAppService{Token: "as_" + as.id + "_" + randHex(), Sender: "@" + as.id + "-bot:localhost", Prefix: as.id + "_"}
		reg := "id: e2e-" + as.id + "\n" +
			"url: null\n" +
			"as_token: " + as.dst.Token + "\n" +
			"hs_token: hs_" + randHex() + "\n" +
			"sender_localpart: " + as.id + "-bot\n" +
			"rate_limited: false\n" +
			as.ips +
			"namespaces:\n  users:\n    - exclusive: true\n      regex: '@" + as.id + "_.*:localhost'\n  aliases: []\n  rooms: []\n"
		f := filepath.Join(s.Data, "appservice-"+as.id+".yaml")
		if err := os.WriteFile(f, []byte(reg), 0o600); err != nil {
			return "", err
		}
		files = append(files, "'"+f+"'")
	}
	extra := "app_service_config_files: [" + strings.Join(files, ", ") + "]\n" +
		"experimental_features:\n  msc3814_enabled: true\n" + more
	path := filepath.Join(s.Data, "extra.yaml")
	return path, os.WriteFile(path, []byte(extra), 0o600)
}

// errE2ENoSynapse wraps reasons Synapse cannot be had on this machine (no
// python3, pip install failed): the tests skip, unless E2E_REQUIRED=1.
var errE2ENoSynapse = errors.New("Synapse unavailable")

var e2eSynapses struct {
	mu      sync.Mutex // guards started
	started []*e2eSynapse

	sharedMu sync.Mutex // held while the shared one starts
	shared   *e2eSynapse
	tried    bool
	err      error
}

// e2eSharedSynapse returns the Synapse most tests share, starting it on first
// use. A Synapse that cannot be installed skips the test (see e2eUnavailable).
func e2eSharedSynapse(t testing.TB) *e2eSynapse {
	t.Helper()
	s, err := func() (*e2eSynapse, error) {
		e2eSynapses.sharedMu.Lock()
		defer e2eSynapses.sharedMu.Unlock()
		if !e2eSynapses.tried {
			e2eSynapses.tried = true
			// The server outlives this test; TestMain stops it.
			e2eSynapses.shared, e2eSynapses.err = e2eStartSynapse(t, "shared")
		}
		return e2eSynapses.shared, e2eSynapses.err
	}()
	e2eCheckSynapse(t, err)
	return s
}

// e2eOwnSynapse starts a Synapse for this test alone; it is stopped when
// the test ends.
func e2eOwnSynapse(t testing.TB, name string) *e2eSynapse {
	t.Helper()
	return e2eOwnSynapseWith(t, name, "")
}

// e2eOwnSynapseWith is e2eOwnSynapse with extra homeserver.yaml (see
// e2eWriteExtraConfig).
func e2eOwnSynapseWith(t testing.TB, name, extra string) *e2eSynapse {
	t.Helper()
	s, err := e2eStartSynapseWith(t, name, extra)
	e2eCheckSynapse(t, err)
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("stop Synapse %s: %v", name, err)
		}
	})
	return s
}

func e2eCheckSynapse(t testing.TB, err error) {
	t.Helper()
	switch {
	case errors.Is(err, errE2ENoSynapse):
		e2eUnavailable(t, "%v", err)
	case err != nil:
		t.Fatalf("Synapse: %v", err)
	}
}

// e2eStartSynapse installs (once per machine: the venv outlives the clone)
// and starts a Synapse with its own data dir and port.
func e2eStartSynapse(t testing.TB, name string) (*e2eSynapse, error) {
	t.Helper()
	return e2eStartSynapseWith(t, name, "")
}

// e2eStartSynapseWith is e2eStartSynapse with extra homeserver.yaml.
func e2eStartSynapseWith(t testing.TB, name, extra string) (*e2eSynapse, error) {
	t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		return nil, fmt.Errorf("%w: deploy/local/synapse.sh needs curl, not on PATH", errE2ENoSynapse)
	}
	python := os.Getenv("PYTHON")
	if python == "" {
		python = "python3"
	}
	if _, err := exec.LookPath(python); err != nil {
		return nil, fmt.Errorf("%w: %s not on PATH", errE2ENoSynapse, python)
	}
	data := filepath.Join(e2eWorkDir(t), "synapse-"+name)
	if err := os.MkdirAll(data, 0o755); err != nil {
		return nil, err
	}
	addr := e2eFreeAddr(t)
	s := &e2eSynapse{URL: "http://" + addr, Data: data, port: addr[strings.LastIndexByte(addr, ':')+1:]}
	if _, err := e2eWriteExtraConfig(s, extra); err != nil {
		return nil, err
	}

	// pip install takes about a minute on a fresh machine; a slow mirror
	// gets ten.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	if out, err := s.script(ctx, "install"); err != nil {
		return nil, fmt.Errorf("%w: deploy/local/synapse.sh install: %v\n%s", errE2ENoSynapse, err, e2eTrim(out))
	}
	e2eSynapses.mu.Lock()
	e2eSynapses.started = append(e2eSynapses.started, s)
	e2eSynapses.mu.Unlock()
	if out, err := s.script(ctx, "start"); err != nil {
		return nil, fmt.Errorf("deploy/local/synapse.sh start: %v\n%s", err, e2eTrim(out))
	}
	t.Logf("Synapse %q up at %s after %v (data and logs: %s)", name, s.URL, time.Since(start).Round(time.Millisecond), data)
	return s, nil
}

// script runs deploy/local/synapse.sh for this instance.
func (s *e2eSynapse) script(ctx context.Context, args ...string) ([]byte, error) {
	script, err := filepath.Abs(filepath.Join("..", "..", "deploy", "local", "synapse.sh"))
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "bash", append([]string{script}, args...)...)
	cmd.Env = append(os.Environ(),
		"SYNAPSE_DATA="+s.Data,
		"SYNAPSE_PORT="+s.port,
		"SYNAPSE_REFRESH_TOKEN_LIFETIME="+fmt.Sprintf("%ds", int(e2eRefreshLifetime.Seconds())),
		"SYNAPSE_BCRYPT_ROUNDS=4",
		"SYNAPSE_START_TIMEOUT=120",
		"SYNAPSE_STOP_TIMEOUT=15",
		"SYNAPSE_EXTRA_CONFIG="+filepath.Join(s.Data, "extra.yaml"),
	)
	cmd.WaitDelay = 5 * time.Second
	return cmd.CombinedOutput()
}

// Stop stops the server (SIGTERM, then SIGKILL), keeping its data.
func (s *e2eSynapse) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := s.script(ctx, "stop"); err != nil {
		return fmt.Errorf("%v\n%s", err, e2eTrim(out))
	}
	return nil
}

// Start starts a stopped server again on the same port and data.
func (s *e2eSynapse) Start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if out, err := s.script(ctx, "start"); err != nil {
		t.Fatalf("deploy/local/synapse.sh start: %v\n%s", err, e2eTrim(out))
	}
}

// DumpOnFailure prints the tails of the server's logs if the test fails.
func (s *e2eSynapse) DumpOnFailure(t testing.TB) {
	t.Helper()
	e2eDumpOnFailure(t, "Synapse stdout", filepath.Join(s.Data, "stdout.log"))
	e2eDumpOnFailure(t, "Synapse homeserver.log", filepath.Join(s.Data, "homeserver.log"))
}

func e2eStopAllSynapses() {
	e2eSynapses.mu.Lock()
	defer e2eSynapses.mu.Unlock()
	for _, s := range e2eSynapses.started {
		if err := s.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: stopping Synapse %s: %v\n", s.Data, err)
		}
	}
}

// e2eUser is a registered account.
type e2eUser struct {
	Name     string // localpart
	ID       string // @name:localhost
	Password string
	// Token is the admin registration's own session, made directly on
	// Synapse; tests use sessions from /login instead, except the admin's.
	Token string
}

// e2eUniqueName returns a fresh localpart that says which test made it.
func e2eUniqueName(t testing.TB, prefix string) string {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return strings.ToLower(prefix) + "-" + hex.EncodeToString(b)
}

// Register creates a user with the shared-secret registration API
// (POST /_synapse/admin/v1/register), directly on Synapse.
func (s *e2eSynapse) Register(t testing.TB, prefix string, admin bool) *e2eUser {
	t.Helper()
	name := e2eUniqueName(t, prefix)
	password := "pw-" + name
	secret, err := os.ReadFile(filepath.Join(s.Data, "shared_secret"))
	if err != nil {
		t.Fatalf("shared secret: %v", err)
	}
	r := e2eDo(t, nil, http.MethodGet, s.URL+"/_synapse/admin/v1/register", "", nil)
	if r.Status != http.StatusOK {
		t.Fatalf("GET register nonce: %d %s", r.Status, r.Body)
	}
	nonce, _ := r.JSON(t)["nonce"].(string)
	// mac = HMAC-SHA1(secret, nonce \0 user \0 password \0 admin|notadmin)
	role := "notadmin"
	if admin {
		role = "admin"
	}
	mac := hmac.New(sha1.New, []byte(strings.TrimSpace(string(secret))))
	mac.Write([]byte(nonce + "\x00" + name + "\x00" + password + "\x00" + role))
	r = e2eDo(t, nil, http.MethodPost, s.URL+"/_synapse/admin/v1/register", "", map[string]any{
		"nonce": nonce, "username": name, "password": password, "admin": admin,
		"mac": hex.EncodeToString(mac.Sum(nil)),
	})
	if r.Status != http.StatusOK {
		t.Fatalf("register %s: %d %s", name, r.Status, r.Body)
	}
	m := r.JSON(t)
	u := &e2eUser{Name: name, Password: password}
	u.ID, _ = m["user_id"].(string)
	u.Token, _ = m["access_token"].(string)
	if u.ID != "@"+name+":localhost" || u.Token == "" {
		t.Fatalf("register %s: unexpected answer %s", name, r.Body)
	}
	return u
}

// e2eSession is what /login or /refresh returned.
type e2eSession struct {
	UserID, DeviceID, Token, RefreshToken string
	ExpiresInMS                           int64
}

// e2eLogin logs u in with m.login.password at base (the proxy or Synapse).
// extra adds fields to the request body (device_id, refresh_token).
func e2eLogin(t testing.TB, base string, u *e2eUser, extra map[string]any) *e2eSession {
	t.Helper()
	body := map[string]any{
		"type":       "m.login.password",
		"identifier": map[string]any{"type": "m.id.user", "user": u.Name},
		"password":   u.Password,
	}
	for k, v := range extra {
		body[k] = v
	}
	r := e2eDo(t, nil, http.MethodPost, base+"/_matrix/client/v3/login", "", body)
	if r.Status != http.StatusOK {
		t.Fatalf("login %s: %d %s", u.Name, r.Status, r.Body)
	}
	return e2eSessionFrom(t, r)
}

func e2eSessionFrom(t testing.TB, r e2eResp) *e2eSession {
	t.Helper()
	m := r.JSON(t)
	s := &e2eSession{}
	s.UserID, _ = m["user_id"].(string)
	s.DeviceID, _ = m["device_id"].(string)
	s.Token, _ = m["access_token"].(string)
	s.RefreshToken, _ = m["refresh_token"].(string)
	if f, ok := m["expires_in_ms"].(float64); ok {
		s.ExpiresInMS = int64(f)
	}
	if s.Token == "" {
		t.Fatalf("no access_token in %s", r.Body)
	}
	return s
}

// e2eWhoami asks GET /_matrix/client/v3/account/whoami at base.
func e2eWhoami(t testing.TB, base, token string) e2eResp {
	t.Helper()
	return e2eDo(t, nil, http.MethodGet, base+"/_matrix/client/v3/account/whoami", "", nil, "Authorization", "Bearer "+token)
}

// e2eUIA makes a request that needs user-interactive auth (Client-Server API
// "User-interactive authentication API") through base: first without "auth",
// which must be answered 401 with a session, then again with m.login.password
// in that session. It returns the second answer.
func e2eUIA(t testing.TB, base, method, path, token string, u *e2eUser, body map[string]any) e2eResp {
	t.Helper()
	first := e2eDo(t, nil, method, base+path, token, body)
	if first.Status != http.StatusUnauthorized {
		t.Fatalf("%s %s without auth: got %d %s, want 401 with a UIA session", method, path, first.Status, first.Body)
	}
	session, _ := first.JSON(t)["session"].(string)
	if session == "" {
		t.Fatalf("%s %s: UIA 401 without a session: %s", method, path, first.Body)
	}
	withAuth := map[string]any{}
	for k, v := range body {
		withAuth[k] = v
	}
	withAuth["auth"] = map[string]any{
		"type":       "m.login.password",
		"identifier": map[string]any{"type": "m.id.user", "user": u.Name},
		"password":   u.Password,
		"session":    session,
	}
	return e2eDo(t, nil, method, base+path, token, withAuth)
}

// e2ePath escapes a path segment such as a user or device ID.
func e2ePath(s string) string { return url.PathEscape(s) }
