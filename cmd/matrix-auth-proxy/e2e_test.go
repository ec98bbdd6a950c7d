package main_test

// End-to-end tests: they build the real binary and run it against a real
// Synapse (deploy/local/synapse.sh) and a real Prometheus, all on 127.0.0.1.
// They skip, saying why, when Synapse cannot be installed or Prometheus is not
// on PATH, unless E2E_REQUIRED=1 (CI), which turns every such skip into a
// failure. `go test -short` skips them too. E2E_BINARY=path tests a prebuilt
// binary instead of building one.
//
// One Synapse serves most tests; it is started by the first test that needs
// it and stopped by TestMain. The outage test has its own, since it stops it.
// Every proxy a test starts is stopped with SIGTERM and must exit 0.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	code := m.Run()
	e2eStopAllSynapses()
	e2eRemoveWorkDir()
	os.Exit(code)
}

// e2eRequired reports whether missing prerequisites fail the tests (CI).
func e2eRequired() bool { return os.Getenv("E2E_REQUIRED") == "1" }

// e2eUnavailable skips the test, or fails it under E2E_REQUIRED=1, because
// something it needs cannot be had on this machine.
func e2eUnavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if e2eRequired() {
		t.Fatalf("E2E_REQUIRED=1 but %s", msg)
	}
	t.Skipf("skipping end-to-end test: %s (set E2E_REQUIRED=1 to make this a failure)", msg)
}

// e2eShort skips end-to-end tests under -short.
func e2eShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping end-to-end test in -short mode")
	}
}

// The work dir holds what outlives a single test: the built binary and the
// shared Synapse's data and logs. TestMain removes it.
var e2eWork struct {
	once sync.Once
	dir  string
	err  error
}

func e2eWorkDir(t testing.TB) string {
	t.Helper()
	e2eWork.once.Do(func() {
		e2eWork.dir, e2eWork.err = os.MkdirTemp("", "matrix-auth-proxy-e2e-")
	})
	if e2eWork.err != nil {
		t.Fatalf("work dir: %v", e2eWork.err)
	}
	return e2eWork.dir
}

func e2eRemoveWorkDir() {
	if e2eWork.dir != "" {
		_ = os.RemoveAll(e2eWork.dir)
	}
}

// e2eRepoDir is the repository root (tests run in cmd/matrix-auth-proxy).
func e2eRepoDir(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

var e2eBuild struct {
	once sync.Once
	path string
	err  error
}

// e2eBinary builds the proxy once per test binary and returns its path.
// E2E_BINARY names a prebuilt one instead (a release build, a mutant).
func e2eBinary(t testing.TB) string {
	t.Helper()
	work := e2eWorkDir(t)
	e2eBuild.once.Do(func() {
		if bin := os.Getenv("E2E_BINARY"); bin != "" {
			e2eBuild.path, e2eBuild.err = filepath.Abs(bin)
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			e2eBuild.err = fmt.Errorf("no go tool on PATH to build the binary: %w", err)
			return
		}
		out := filepath.Join(work, "matrix-auth-proxy")
		cmd := exec.Command(goTool, "build", "-o", out, ".")
		if b, err := cmd.CombinedOutput(); err != nil {
			e2eBuild.err = fmt.Errorf("go build: %v\n%s", err, b)
			return
		}
		e2eBuild.path = out
	})
	if e2eBuild.err != nil {
		t.Fatal(e2eBuild.err)
	}
	return e2eBuild.path
}

// e2eFreeAddr returns a 127.0.0.1 address nobody listens on right now.
func e2eFreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// e2eTail returns the last n lines of a file, for failure reports.
func e2eTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// e2eTrim shortens a command's output for a failure message: its last 30
// lines, each cut at 400 bytes (pip lists every version it knows).
func e2eTrim(out []byte) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	for i, l := range lines {
		if len(l) > 400 {
			lines[i] = l[:400] + "…"
		}
	}
	return strings.Join(lines, "\n")
}

// e2eDumpOnFailure prints the tails of the given logs if the test failed.
func e2eDumpOnFailure(t testing.TB, name, path string) {
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- last lines of %s (%s) ----\n%s", name, path, e2eTail(path, 60))
		}
	})
}

// e2eProxy is a running matrix-auth-proxy binary.
type e2eProxy struct {
	URL      string // client listener, http://127.0.0.1:PORT
	AdminURL string // admin listener
	LogPath  string

	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	waitErr error
	stopped bool
}

// e2eStartProxy starts the binary in front of upstream. env overrides the
// defaults: a 10m CACHE_TTL (so a test that passes proves invalidation, not
// expiry), SHUTDOWN_DELAY=0, a 500ms readiness interval, debug logs. The
// proxy is stopped with SIGTERM when the test ends and must exit 0.
func e2eStartProxy(t testing.TB, upstream string, env map[string]string) *e2eProxy {
	t.Helper()
	bin := e2eBinary(t)
	logDir := t.TempDir()
	var lastErr error
	// A port picked as free can be taken before the proxy binds it: retry.
	for attempt := range 3 {
		p, err := e2eTryStartProxy(t, bin, filepath.Join(logDir, fmt.Sprintf("proxy-%d.log", attempt)), upstream, env)
		if err == nil {
			return p
		}
		lastErr = err
	}
	t.Fatalf("proxy did not start: %v", lastErr)
	return nil
}

func e2eTryStartProxy(t testing.TB, bin, logPath, upstream string, env map[string]string) (*e2eProxy, error) {
	t.Helper()
	listen, admin := e2eFreeAddr(t), e2eFreeAddr(t)
	cfg := map[string]string{
		"UPSTREAM_URL":       upstream,
		"LISTEN_ADDR":        listen,
		"ADMIN_ADDR":         admin,
		"CACHE_TTL":          "10m",
		"UPSTREAM_TIMEOUT":   "5s",
		"READINESS_INTERVAL": "500ms",
		"SHUTDOWN_DELAY":     "0s",
		"SHUTDOWN_TIMEOUT":   "5s",
		"LOG_LEVEL":          "debug",
	}
	for k, v := range env {
		cfg[k] = v
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range cfg {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start proxy: %v", err)
	}
	p := &e2eProxy{
		URL:      "http://" + cfg["LISTEN_ADDR"],
		AdminURL: "http://" + cfg["ADMIN_ADDR"],
		LogPath:  logPath,
		cmd:      cmd,
		done:     make(chan struct{}),
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case <-p.done:
			return nil, fmt.Errorf("exited during startup (%v):\n%s", p.waitErr, e2eTail(logPath, 20))
		default:
		}
		if resp, err := http.Get(p.AdminURL + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-p.done
			return nil, fmt.Errorf("/healthz not 200 within 15s:\n%s", e2eTail(logPath, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
	e2eDumpOnFailure(t, "proxy log", logPath)
	t.Cleanup(func() { p.Stop(t) })
	return p, nil
}

// Stop sends SIGTERM and waits; the proxy must exit 0 within its shutdown
// timeout. Stopping twice is a no-op.
func (p *e2eProxy) Stop(t testing.TB) {
	t.Helper()
	if p.stopped {
		return
	}
	p.stopped = true
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if !p.Wait(20 * time.Second) {
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Errorf("proxy still running 20s after SIGTERM; killed it")
		return
	}
	if p.waitErr != nil {
		t.Errorf("proxy exited with %v after SIGTERM, want exit status 0", p.waitErr)
	}
}

// Wait waits up to d for the process to exit and reports whether it did.
func (p *e2eProxy) Wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// e2eMetrics scrapes the admin /metrics and returns every sample by its
// series as exposed, e.g. `matrix_auth_proxy_token_cache_lookups_total{result="hit"}`
// (client_golang sorts label names).
func e2eMetrics(t testing.TB, adminURL string) map[string]float64 {
	t.Helper()
	r := e2eDo(t, nil, http.MethodGet, adminURL+"/metrics", "", nil)
	if r.Status != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", r.Status, r.Body)
	}
	samples := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(r.Body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

// e2eMetric returns one series' value; a series that is absent counts as 0.
func e2eMetric(t testing.TB, adminURL, series string) float64 {
	t.Helper()
	return e2eMetrics(t, adminURL)[series]
}

const (
	e2eUpstreamWhoami200 = `matrix_auth_proxy_upstream_whoami_requests_total{code="200"}`
	e2eLookupHit         = `matrix_auth_proxy_token_cache_lookups_total{result="hit"}`
	e2eLookupMiss        = `matrix_auth_proxy_token_cache_lookups_total{result="miss"}`
	e2eLookupNegative    = `matrix_auth_proxy_token_cache_lookups_total{result="negative_hit"}`
)

// e2eResp is an HTTP answer, read whole.
type e2eResp struct {
	Status int
	Header http.Header
	Body   []byte
}

// JSON decodes the body as a JSON object, failing the test if it is not one.
func (r e2eResp) JSON(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("body of the %d answer is not a JSON object: %v: %q", r.Status, err, r.Body)
	}
	return m
}

// Errcode is the Matrix errcode of the body, "" if there is none.
func (r e2eResp) Errcode() string {
	var m struct {
		Errcode string `json:"errcode"`
	}
	_ = json.Unmarshal(r.Body, &m)
	return m.Errcode
}

var e2eHTTP = &http.Client{Timeout: 30 * time.Second}

// e2eDo sends a request with an optional bearer token and JSON body (a
// []byte is sent as is). client nil means the default one.
func e2eDo(t testing.TB, client *http.Client, method, url, token string, body any, header ...string) e2eResp {
	t.Helper()
	r, err := e2eTry(context.Background(), client, method, url, token, body, header...)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return r
}

// e2eTry is e2eDo that returns transport errors instead of failing.
func e2eTry(ctx context.Context, client *http.Client, method, url, token string, body any, header ...string) (e2eResp, error) {
	if client == nil {
		client = e2eHTTP
	}
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return e2eResp{}, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return e2eResp{}, err
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return e2eResp{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return e2eResp{}, err
	}
	return e2eResp{Status: resp.StatusCode, Header: resp.Header, Body: b}, nil
}

// e2eEventually polls cond every 100ms until it returns "" or d passes, then
// fails with cond's last complaint.
func e2eEventually(t testing.TB, d time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %s", what, d, msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// e2eStatusOf is GET url's status, or 0 with the error if there was no answer.
func e2eStatusOf(url string) (int, error) {
	resp, err := e2eHTTP.Get(url)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}
