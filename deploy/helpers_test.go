// Package deploy holds the offline checks of what deploy/ ships: the
// container image recipe, the Kubernetes manifests (rendered with the
// kustomize API, decoded strictly into their typed API structs), the alerting
// rules, the scrape config and the Grafana dashboard, each compared with what
// the real binary reads, serves and exports. It is its own Go module so the
// sidecar's module keeps none of these heavy dependencies.
//
// Checks that need more than Go (make, promtool, root for a network
// namespace) skip saying why, unless E2E_REQUIRED=1 (CI), which turns every
// such skip into a failure.
package deploy

import (
	"context"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if os.Getenv(netnsChildEnv) == "1" {
		// Re-executed inside a fresh network namespace by
		// TestReleaseBinaryRunsAsNonroot.
		os.Exit(netnsChild())
	}
	code := m.Run()
	if proxyBuild.dir != "" {
		_ = os.RemoveAll(proxyBuild.dir)
	}
	os.Exit(code)
}

// e2eRequired reports whether missing prerequisites fail the tests (CI).
func e2eRequired() bool { return os.Getenv("E2E_REQUIRED") == "1" }

// unavailable skips the test, or fails it under E2E_REQUIRED=1, because
// something it needs cannot be had on this machine.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if e2eRequired() {
		t.Fatalf("E2E_REQUIRED=1 but %s", msg)
	}
	t.Skipf("skipping: %s (set E2E_REQUIRED=1 to make this a failure)", msg)
}

// repoPath is a path in the repository (tests run in deploy/).
func repoPath(t testing.TB, elem ...string) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(append([]string{root}, elem...)...)
}

func readFile(t testing.TB, elem ...string) string {
	t.Helper()
	b, err := os.ReadFile(repoPath(t, elem...))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// envVar is one variable the binary reads, from a Config field's tags.
type envVar struct {
	Name, Default string
}

// binaryEnv parses cmd/matrix-auth-proxy/config.go and returns the variables
// of the Config struct's `env:"NAME"` tags: what the binary reads, from the
// source rather than a copy of it.
func binaryEnv(t testing.TB) map[string]envVar {
	t.Helper()
	path := repoPath(t, "cmd", "matrix-auth-proxy", "config.go")
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]envVar{}
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != "Config" {
			return true
		}
		st, ok := ts.Type.(*ast.StructType)
		if !ok {
			t.Fatalf("%s: Config is not a struct", path)
		}
		for _, field := range st.Fields.List {
			if field.Tag == nil {
				continue
			}
			raw, err := strconv.Unquote(field.Tag.Value)
			if err != nil {
				t.Fatalf("%s: tag %s: %v", path, field.Tag.Value, err)
			}
			tag := reflect.StructTag(raw)
			name, _, _ := strings.Cut(tag.Get("env"), ",")
			if name != "" {
				vars[name] = envVar{Name: name, Default: tag.Get("envDefault")}
			}
		}
		return false
	})
	if len(vars) == 0 {
		t.Fatalf("%s: no env tags found on type Config", path)
	}
	return vars
}

// portOf returns the port of a host:port listen address such as ":9090".
func portOf(t testing.TB, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	return n
}

// buildVersion is what the test build stamps into main.version.
const buildVersion = "deploy-test"

var proxyBuild struct {
	once sync.Once
	dir  string // 0755, so that uid 65532 can run what is in it
	path string
	err  error
	skip string
}

// releaseBinary builds the proxy exactly as `make build` (and so the
// Dockerfile) does: it asks make for the build command (`make -n build`) and
// runs it with only the output path changed, so the flags are the Makefile's.
func releaseBinary(t testing.TB) string {
	t.Helper()
	proxyBuild.once.Do(func() {
		makeTool, err := exec.LookPath("make")
		if err != nil {
			proxyBuild.skip = "no make on PATH to ask for the release build command"
			return
		}
		if _, err := exec.LookPath("go"); err != nil {
			proxyBuild.skip = "no go on PATH to build the binary"
			return
		}
		root := repoPath(t)
		cmd := exec.Command(makeTool, "-n", "-s", "build", "VERSION="+buildVersion, "GO=go")
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			proxyBuild.err = fmt.Errorf("make -n build: %v", err)
			return
		}
		recipe := strings.TrimSpace(string(out))
		const output = "-o bin/matrix-auth-proxy"
		if strings.Count(recipe, "\n") != 0 || !strings.Contains(recipe, output) {
			proxyBuild.err = fmt.Errorf("make -n build printed %q; want one command with %q", recipe, output)
			return
		}
		if proxyBuild.dir, err = os.MkdirTemp("", "matrix-auth-proxy-deploy-"); err == nil {
			err = os.Chmod(proxyBuild.dir, 0o755)
		}
		if err != nil {
			proxyBuild.err = err
			return
		}
		bin := filepath.Join(proxyBuild.dir, "matrix-auth-proxy")
		build := exec.Command("sh", "-c", strings.Replace(recipe, output, "-o "+bin, 1))
		build.Dir = root
		if b, err := build.CombinedOutput(); err != nil {
			proxyBuild.err = fmt.Errorf("%s: %v\n%s", build.Args[2], err, b)
			return
		}
		proxyBuild.path = bin
	})
	if proxyBuild.skip != "" {
		unavailable(t, "%s", proxyBuild.skip)
	}
	if proxyBuild.err != nil {
		t.Fatal(proxyBuild.err)
	}
	return proxyBuild.path
}

// freeAddr returns a 127.0.0.1 address nobody listens on right now.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// fakeHomeserver answers what the proxy asks: /versions (readiness), whoami
// (valid for the token "good", 401 M_UNKNOWN_TOKEN for any other) and {} for
// everything else.
func fakeHomeserver(t testing.TB) *httptest.Server {
	t.Helper()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/_matrix/client/versions":
			io.WriteString(w, `{"versions":["v1.11"]}`)
		case strings.HasSuffix(r.URL.Path, "/account/whoami"):
			if r.Header.Get("Authorization") == "Bearer good" {
				io.WriteString(w, `{"user_id":"@alice:example.org","device_id":"DEV"}`)
				return
			}
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}`)
		default:
			io.WriteString(w, `{}`)
		}
	}))
	t.Cleanup(hs.Close)
	return hs
}

// runningProxy is the release binary serving on free 127.0.0.1 ports.
type runningProxy struct {
	ClientURL, AdminURL string
}

// startProxy runs the release binary in front of upstream, with env on top
// of free listen addresses and SHUTDOWN_DELAY=0. It is stopped with SIGTERM
// when the test ends and must exit 0.
func startProxy(t testing.TB, upstream string, env map[string]string) runningProxy {
	t.Helper()
	bin := releaseBinary(t)
	listen, admin := freeAddr(t), freeAddr(t)
	vars := map[string]string{
		"UPSTREAM_URL":       upstream,
		"LISTEN_ADDR":        listen,
		"ADMIN_ADDR":         admin,
		"SHUTDOWN_DELAY":     "0s",
		"READINESS_INTERVAL": "200ms",
	}
	for k, v := range env {
		vars[k] = v
	}
	cmd := exec.Command(bin)
	for k, v := range vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("proxy exited with %v after SIGTERM; logs:\n%s", err, logs.String())
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("proxy still running 15s after SIGTERM; logs:\n%s", logs.String())
		}
	})
	p := runningProxy{ClientURL: "http://" + listen, AdminURL: "http://" + admin}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if code, _ := get(t, p.AdminURL+"/healthz", ""); code == http.StatusOK {
			return p
		}
		select {
		case err := <-done:
			t.Fatalf("proxy exited before answering /healthz: %v; logs:\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("proxy did not answer /healthz within 15s; logs:\n%s", logs.String())
		}
	}
}

// get fetches url (with a bearer token unless empty) and returns the status
// code and body; a failed connection is status 0.
func get(t testing.TB, url, token string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
