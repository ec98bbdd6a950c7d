package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		UpstreamURL: "http://127.0.0.1:8008", ListenAddr: ":8080", AdminAddr: ":9090",
		CacheSize: 100000, CacheTTL: 2 * time.Minute, CacheNegativeTTL: 10 * time.Second,
		UpstreamTimeout: 10 * time.Second, RevokeTimeout: time.Minute, BodyReadTimeout: 10 * time.Second,
		ReadinessInterval: 5 * time.Second, ShutdownDelay: 5 * time.Second, ShutdownTimeout: 20 * time.Second,
		LogLevel: "info", LogFormat: "json", RateLimitRPS: 20, RateLimitBurst: 100,
		RedisChannel: "matrix-auth-proxy:invalidate", RedisDownCacheTTL: 10 * time.Second,
	}
	cfg.upstream, cfg.level = nil, 0
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", cfg, want)
	}
}

// Bad configuration exits 2 before listening, with one line that names the
// environment variable (not the Go field).
func TestBadConfigExits2NamingTheVariable(t *testing.T) {
	tests := map[string]string{
		"CACHE_TTL":               "two minutes",
		"CACHE_NEGATIVE_TTL":      "-1s",
		"CACHE_SIZE":              "0",
		"UPSTREAM_TIMEOUT":        "0",
		"REVOKE_TIMEOUT":          "0s",
		"BODY_READ_TIMEOUT":       "-1s",
		"SHUTDOWN_DELAY":          "soon",
		"SHUTDOWN_TIMEOUT":        "-5s",
		"READINESS_INTERVAL":      "0s",
		"UPSTREAM_URL":            "127.0.0.1:8008",
		"LISTEN_ADDR":             "8080",
		"ADMIN_ADDR":              ":http-alt",
		"LOG_LEVEL":               "loud",
		"LOG_FORMAT":              "xml",
		"RATE_LIMIT_RPS":          "-1",
		"RATE_LIMIT_BURST":        "0",
		"RATE_LIMIT_EXEMPT_USERS": "@bridge:hs,bridge",
		"RATE_LIMIT_EXEMPT_CIDRS": "10.0.0.0/8, 10.0.0.0/33",
		"TRUSTED_PROXIES":         "ingress",
		"TOKEN_HASH_KEY":          "short",
		"REDIS_URL":               "http://:secret@redis:6379",
		"SERVER_NAME":             "@example.org",
		"MAS_INTROSPECTION_URL":   "mas:8080/oauth2/introspect",
		"MAS_SECRET_FILE":         "/nonexistent/mas-secret",
	}
	for name, val := range tests {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			code := run(t.Context(), map[string]string{name: val}, &out)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], name+":") {
				t.Errorf("output %q: want one line naming %s", out.String(), name)
			}
			for _, field := range []string{"CacheTTL", "CacheSize", "field"} {
				if strings.Contains(out.String(), field) {
					t.Errorf("output names a Go field: %q", out.String())
				}
			}
		})
	}
	// The password of a bad UPSTREAM_URL is never echoed.
	for _, bad := range []string{"http://u:hunter2@hs:8008", "ftp://u:hunter2@hs", "http://u:hunter2@hs:8008/%zz"} {
		var out bytes.Buffer
		if code := run(t.Context(), map[string]string{"UPSTREAM_URL": bad}, &out); code != 2 || strings.Contains(out.String(), "hunter2") {
			t.Errorf("UPSTREAM_URL %s: exit %d, output %q", bad, code, out.String())
		}
	}
	for _, auth := range []string{"8081", ":8080", ":9090"} {
		var out bytes.Buffer
		if code := run(t.Context(), map[string]string{"AUTH_ADDR": auth}, &out); code != 2 || !strings.Contains(out.String(), "AUTH_ADDR: ") {
			t.Errorf("AUTH_ADDR=%s: exit %d: %q", auth, code, out.String())
		}
	}
	t.Run("same listen and admin address", func(t *testing.T) {
		var out bytes.Buffer
		if code := run(t.Context(), map[string]string{"LISTEN_ADDR": ":9090"}, &out); code != 2 || !strings.HasPrefix(strings.TrimPrefix(out.String(), "matrix-auth-proxy: invalid configuration: "), "ADMIN_ADDR") {
			t.Errorf("exit %d: %q", code, out.String())
		}
	})
}

func TestBusConfig(t *testing.T) {
	key := strings.Repeat("k", 32)
	for _, tt := range []struct {
		env  map[string]string
		want string // variable named in the error; "" for none
	}{
		{map[string]string{"REDIS_URL": "redis://redis:6379"}, "TOKEN_HASH_KEY"},
		{map[string]string{"REDIS_URL": "redis://redis:6379", "TOKEN_HASH_KEY": key}, ""},
		{map[string]string{"REDIS_URL": "rediss://:pw@redis:6380/0", "TOKEN_HASH_KEY": key, "REDIS_DOWN_CACHE_TTL": "0s"}, "REDIS_DOWN_CACHE_TTL"},
		{map[string]string{"TOKEN_HASH_KEY": key}, ""},
	} {
		_, err := loadConfig(tt.env)
		var ce *configError
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%v: %v", tt.env, err)
		case tt.want != "" && (!errors.As(err, &ce) || ce.Var != tt.want):
			t.Errorf("%v: got %v, want an error naming %s", tt.env, err, tt.want)
		}
	}
	// A bad REDIS_URL is named, its password never printed.
	var out bytes.Buffer
	run(t.Context(), map[string]string{"REDIS_URL": "http://:hunter2@redis"}, &out)
	if !strings.Contains(out.String(), "REDIS_URL") || strings.Contains(out.String(), "hunter2") {
		t.Errorf("output %q", out.String())
	}
}

func TestMASConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "secret")
	if err := os.WriteFile(file, []byte("  s3cret-from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const url = "http://127.0.0.1:8081/oauth2/introspect"
	for _, tt := range []struct {
		env        map[string]string
		want       string // variable named in the error; "" for none
		wantSecret string
	}{
		{map[string]string{}, "", ""},
		{map[string]string{"SERVER_NAME": "example.org:8448"}, "", ""},
		{map[string]string{"MAS_SECRET": "hunter2"}, "", "hunter2"},
		{map[string]string{"MAS_SECRET_FILE": file}, "", "s3cret-from-file"},
		{map[string]string{"MAS_SECRET_FILE": empty}, "MAS_SECRET_FILE", ""},
		{map[string]string{"MAS_SECRET_FILE": file, "MAS_SECRET": "hunter2"}, "MAS_SECRET_FILE", ""},
		{map[string]string{"MAS_INTROSPECTION_URL": url}, "MAS_INTROSPECTION_URL", ""},
		{map[string]string{"MAS_INTROSPECTION_URL": url, "MAS_SECRET": "hunter2"}, "", "hunter2"},
		{map[string]string{"MAS_INTROSPECTION_URL": "http://u:hunter2@mas/oauth2/introspect", "MAS_SECRET": "hunter2"}, "MAS_INTROSPECTION_URL", ""},
	} {
		cfg, err := loadConfig(tt.env)
		var ce *configError
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%v: %v", tt.env, err)
		case tt.want != "" && (!errors.As(err, &ce) || ce.Var != tt.want):
			t.Errorf("%v: got %v, want an error naming %s", tt.env, err, tt.want)
		case tt.want == "" && cfg.masSecret != tt.wantSecret:
			t.Errorf("%v: secret %q, want %q", tt.env, cfg.masSecret, tt.wantSecret)
		}
		if err != nil && (strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "s3cret")) {
			t.Errorf("%v: the error echoes the secret: %v", tt.env, err)
		}
	}
}

func TestRateLimitConfig(t *testing.T) {
	cfg, err := loadConfig(map[string]string{
		"RATE_LIMIT_RPS": "2.5", "RATE_LIMIT_EXEMPT_USERS": "@telegram:hs, @irc:hs",
		"RATE_LIMIT_EXEMPT_CIDRS": "10.0.0.0/8,192.0.2.7", "TRUSTED_PROXIES": "::ffff:172.16.0.0/108, fd00::/8",
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RateLimitRPS != 2.5 || !reflect.DeepEqual(cfg.exemptUsers, []string{"@telegram:hs", "@irc:hs"}) {
		t.Errorf("rps %v users %q", cfg.RateLimitRPS, cfg.exemptUsers)
	}
	if fmt.Sprint(cfg.exemptCIDRs) != "[10.0.0.0/8 192.0.2.7/32]" || fmt.Sprint(cfg.trusted) != "[172.16.0.0/12 fd00::/8]" {
		t.Errorf("cidrs %v trusted %v", cfg.exemptCIDRs, cfg.trusted)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func get(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRunServesAndShutsDownGracefully runs the whole program against a fake
// homeserver: admin endpoints, the client listener, and the shutdown
// sequence Kubernetes relies on.
func TestRunServesAndShutsDownGracefully(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	var slow sync.WaitGroup
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/_matrix/client/versions":
			_, _ = io.WriteString(w, `{"versions":["v1.11"]}`)
		case "/_matrix/client/v3/sync":
			time.Sleep(300 * time.Millisecond) // in flight when shutdown starts
			_, _ = io.WriteString(w, `{"next_batch":"s1"}`)
		default:
			_, _ = io.WriteString(w, `{"user_id":"@a:hs","device_id":"D"}`)
		}
	}))
	defer hs.Close()
	listen, admin := freeAddr(t), freeAddr(t)
	env := map[string]string{
		"UPSTREAM_URL": hs.URL, "LISTEN_ADDR": listen, "ADMIN_ADDR": admin,
		"READINESS_INTERVAL": "50ms", "SHUTDOWN_DELAY": "400ms", "SHUTDOWN_TIMEOUT": "5s",
	}
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	var logs syncBuffer
	exit := make(chan int)
	go func() { exit <- run(ctx, env, &logs) }()

	waitFor(t, "/healthz", func() bool { c, _ := get("http://" + admin + "/healthz"); return c == 200 })
	waitFor(t, "/readyz", func() bool { c, _ := get("http://" + admin + "/readyz"); return c == 200 })
	if c, body := get("http://" + admin + "/metrics"); c != 200 ||
		!strings.Contains(body, "matrix_auth_proxy_token_cache_entries") ||
		!strings.Contains(body, "go_goroutines") || !strings.Contains(body, "process_cpu_seconds_total") {
		t.Errorf("/metrics: %d", c)
	}
	// The client listener proxies, and never serves the admin endpoints.
	req, _ := http.NewRequest("GET", "http://"+listen+"/_matrix/client/v3/account/whoami", nil)
	req.Header.Set("Authorization", "Bearer syt_x")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("whoami through the proxy: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if _, body := get("http://" + listen + "/metrics"); strings.Contains(body, "matrix_auth_proxy") {
		t.Error("the client listener served metrics")
	}

	slow.Go(func() {
		if c, body := get("http://" + listen + "/_matrix/client/v3/sync"); c != 200 || !strings.Contains(body, "s1") {
			t.Errorf("in-flight request cut by shutdown: %d %s", c, body)
		}
	})
	time.Sleep(50 * time.Millisecond)
	stop() // SIGTERM
	waitFor(t, "/readyz to fail", func() bool { c, _ := get("http://" + admin + "/readyz"); return c == 503 })
	// Still serving clients during SHUTDOWN_DELAY.
	if c, _ := get("http://" + listen + "/_matrix/client/versions"); c != 200 {
		t.Errorf("client listener during SHUTDOWN_DELAY: %d", c)
	}
	select {
	case code := <-exit:
		if code != 0 {
			t.Errorf("exit code %d\n%s", code, logs.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return")
	}
	slow.Wait()
	if c, _ := get("http://" + listen + "/_matrix/client/versions"); c != 0 {
		t.Errorf("client listener still answering after exit: %d", c)
	}
	http.DefaultClient.CloseIdleConnections()
}

func TestListenFailureExits1(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var out bytes.Buffer
	code := run(t.Context(), map[string]string{"LISTEN_ADDR": ln.Addr().String(), "ADMIN_ADDR": freeAddr(t)}, &out)
	if code != 1 || !strings.Contains(out.String(), "LISTEN_ADDR") {
		t.Errorf("exit %d, log %s", code, out.String())
	}
}

// TestRunServesForwardAuthOnItsOwnListener: with AUTH_ADDR the forward-auth
// endpoint answers there, and the client listener knows nothing of it (it
// forwards /auth to the homeserver like any other path).
func TestRunServesForwardAuthOnItsOwnListener(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	var sawAuth atomic.Bool
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/_matrix/client/versions":
			_, _ = io.WriteString(w, `{"versions":["v1.11"]}`)
		case "/_matrix/client/v3/account/whoami":
			_, _ = io.WriteString(w, `{"user_id":"@a:hs","device_id":"D","is_guest":false}`)
		case "/auth":
			sawAuth.Store(true)
			w.WriteHeader(404)
		}
	}))
	defer hs.Close()
	listen, admin, auth := freeAddr(t), freeAddr(t), freeAddr(t)
	env := map[string]string{"UPSTREAM_URL": hs.URL, "LISTEN_ADDR": listen, "ADMIN_ADDR": admin, "AUTH_ADDR": auth,
		"SHUTDOWN_DELAY": "0s"}
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	var logs syncBuffer
	exit := make(chan int)
	go func() { exit <- run(ctx, env, &logs) }()
	waitFor(t, "/healthz", func() bool { c, _ := get("http://" + admin + "/healthz"); return c == 200 })

	req, _ := http.NewRequest("GET", "http://"+auth+"/auth", nil)
	req.Header.Set("Authorization", "Bearer syt_x")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Matrix-User-ID") != "@a:hs" {
		t.Errorf("AUTH_ADDR /auth: %d %v", resp.StatusCode, resp.Header)
	}
	req, _ = http.NewRequest("GET", "http://"+listen+"/auth", nil)
	req.Header.Set("Authorization", "Bearer syt_x")
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get("X-Matrix-User-ID") != "" || !sawAuth.Load() {
		t.Errorf("LISTEN_ADDR /auth: %d %v (forwarded: %v)", resp.StatusCode, resp.Header, sawAuth.Load())
	}
	// "OPTIONS *" is not answered 200 by net/http on the auth listener.
	if conn, err := net.Dial("tcp", auth); err == nil {
		_, _ = io.WriteString(conn, "OPTIONS * HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer syt_x\r\nConnection: close\r\n\r\n")
		line, _ := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if !strings.HasPrefix(line, "HTTP/1.1 404") {
			t.Errorf("OPTIONS * on AUTH_ADDR: %q", line)
		}
	}
	if c, body := get("http://" + admin + "/metrics"); c != 200 || !strings.Contains(body, `matrix_auth_proxy_auth_requests_total{result="allowed"} 1`) {
		t.Errorf("/metrics: %d, no allowed auth request counted", c)
	}
	stop()
	if code := <-exit; code != 0 {
		t.Errorf("exit %d\n%s", code, logs.String())
	}
	if c, _ := get("http://" + auth + "/auth"); c != 0 {
		t.Errorf("auth listener still answering after exit: %d", c)
	}
	http.DefaultClient.CloseIdleConnections()
}

func TestGCPercent(t *testing.T) {
	for _, c := range []struct {
		env  map[string]string
		want int // 0: Go's own pacing is left alone
	}{
		{env: map[string]string{}},
		{env: map[string]string{"GOMEMLIMIT": "200MiB"}, want: 400},
		{env: map[string]string{"GOMEMLIMIT": "200MiB", "GOGC": "100"}},
		{env: map[string]string{"GOMEMLIMIT": "200MiB", "GOGC": "off"}},
		{env: map[string]string{"GOGC": "50"}},
		{env: map[string]string{"GOMEMLIMIT": "off"}},
	} {
		got, ok := gcPercent(c.env)
		if !ok {
			got = 0
		}
		if got != c.want {
			t.Errorf("%v: GOGC %d (set: %v), want %d", c.env, got, ok, c.want)
		}
	}
}
