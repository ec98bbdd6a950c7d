package main_test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestE2EForwardAuth runs the forward-auth examples of deploy/forward-auth
// (nginx's auth_request and Caddy's forward_auth, from their Debian
// packages) in front of a backend that echoes the headers it received,
// against the proxy's AUTH_ADDR and a real Synapse with guest access. It
// stops its own Synapse at the end, so the other tests' one is not
// disturbed.
func TestE2EForwardAuth(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	nginxBin, caddyBin := e2eTool(t, "nginx"), e2eTool(t, "caddy")
	syn := e2eOwnSynapseWith(t, "fauth", "allow_guest_access: true\n")
	syn.DumpOnFailure(t)
	authAddr := e2eFreeAddr(t)
	px := e2eStartProxy(t, syn.URL, map[string]string{
		"AUTH_ADDR": authAddr, "TRUSTED_PROXIES": "127.0.0.1", "UPSTREAM_TIMEOUT": "2s",
	})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(r.Header)
	}))
	defer backend.Close()
	backendAddr := strings.TrimPrefix(backend.URL, "http://")
	ingresses := []struct{ name, url string }{
		{"nginx", e2eStartNginx(t, nginxBin, authAddr, backendAddr)},
		{"caddy", e2eStartCaddy(t, caddyBin, authAddr, backendAddr)},
	}

	alice := syn.Register(t, "fa-alice", false)
	root := syn.Register(t, "fa-root", true)
	g := e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/register?kind=guest", "", map[string]any{})
	if g.Status != http.StatusOK {
		t.Fatalf("guest registration: %d %s", g.Status, g.Body)
	}
	guest := e2eSessionFrom(t, g)
	var tokens []string
	for _, ing := range ingresses {
		t.Run(ing.name, func(t *testing.T) {
			a := e2eLogin(t, px.URL, alice, nil)
			r := e2eLogin(t, px.URL, root, nil)
			tokens = append(tokens, a.Token, r.Token, guest.Token)
			for _, tc := range []struct {
				name, path, token string
				header            []string
				status            int
				user, device      string // what the backend must see on a 200
				isGuest           string
			}{
				{"valid token", "/svc/x", a.Token, []string{"X-Matrix-User-ID", "@forged:localhost", "X-Matrix-Device-ID", "FORGED"}, 200, alice.ID, a.DeviceID, "false"},
				{"access_token in the URI", "/svc/x?access_token=" + a.Token, "", nil, 200, alice.ID, a.DeviceID, "false"},
				{"no token", "/svc/x", "", nil, 401, "", "", ""},
				{"made-up token", "/svc/x", "syt_bWFkZXVw_madeupmadeupmadeup_0AbCdE", nil, 401, "", "", ""},
				{"guest, default policy", "/svc/x", guest.Token, nil, 403, "", "", ""},
				{"guest choosing the policy in the query", "/svc/x?guests=allow", guest.Token, nil, 403, "", "", ""},
				{"guest where guests are allowed", "/public/x", guest.Token, nil, 200, guest.UserID, guest.DeviceID, "true"},
				{"non-admin on an admin-only service", "/admin/x", a.Token, nil, 403, "", "", ""},
				{"admin on an admin-only service", "/admin/x", r.Token, nil, 200, root.ID, r.DeviceID, "false"},
			} {
				resp := e2eDo(t, nil, http.MethodGet, ing.url+tc.path, tc.token, nil, tc.header...)
				if resp.Status != tc.status {
					t.Errorf("%s: %d %s, want %d", tc.name, resp.Status, resp.Body, tc.status)
					continue
				}
				if tc.status != 200 {
					continue
				}
				var seen http.Header
				if err := json.Unmarshal(resp.Body, &seen); err != nil {
					t.Fatalf("%s: backend answer %q: %v", tc.name, resp.Body, err)
				}
				if seen["X-Matrix-User-Id"][0] != tc.user || seen.Get("X-Matrix-Device-ID") != tc.device || seen.Get("X-Matrix-Is-Guest") != tc.isGuest || len(seen["X-Matrix-User-Id"]) != 1 {
					t.Errorf("%s: backend saw user %q device %q guest %q, want %s %s %s", tc.name,
						seen["X-Matrix-User-Id"], seen.Get("X-Matrix-Device-ID"), seen.Get("X-Matrix-Is-Guest"), tc.user, tc.device, tc.isGuest)
				}
			}

			// A token logged out through the proxy is refused at once.
			s := e2eLogin(t, px.URL, alice, nil)
			tokens = append(tokens, s.Token)
			e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, ing.url+"/svc/x", s.Token, nil), http.StatusOK)
			e2eWantStatus(t, e2eDo(t, nil, http.MethodPost, px.URL+"/_matrix/client/v3/logout", s.Token, map[string]any{}), http.StatusOK)
			if resp := e2eDo(t, nil, http.MethodGet, ing.url+"/svc/x", s.Token, nil); resp.Status != http.StatusUnauthorized {
				t.Errorf("after logout: %d %s, want 401", resp.Status, resp.Body)
			}
		})
	}
	for _, result := range []string{"allowed", "unauthenticated", "forbidden"} {
		if n := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_auth_requests_total{result="`+result+`"}`); n < 2 {
			t.Errorf("auth_requests_total{result=%q} = %v, want at least 2", result, n)
		}
	}

	// Synapse stopped: a token the cache does not know is a 502 or 504
	// through either ingress, never a 401; one it knows still passes.
	cached := e2eLogin(t, px.URL, alice, nil)
	fresh := e2eLogin(t, px.URL, alice, nil)
	tokens = append(tokens, cached.Token, fresh.Token)
	for _, ing := range ingresses {
		e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, ing.url+"/svc/x", cached.Token, nil), http.StatusOK)
	}
	if err := syn.Stop(); err != nil {
		t.Fatalf("stop Synapse: %v", err)
	}
	for _, ing := range ingresses {
		if r := e2eDo(t, nil, http.MethodGet, ing.url+"/svc/x", fresh.Token, nil); r.Status != http.StatusBadGateway && r.Status != http.StatusGatewayTimeout {
			t.Errorf("%s, Synapse down: %d %s, want 502 or 504", ing.name, r.Status, r.Body)
		}
		e2eWantStatus(t, e2eDo(t, nil, http.MethodGet, ing.url+"/svc/x", cached.Token, nil), http.StatusOK)
	}
	if n := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_auth_requests_total{result="error"}`); n < 2 {
		t.Errorf(`auth_requests_total{result="error"} = %v, want at least 2`, n)
	}
	px.Stop(t)
	log, err := os.ReadFile(px.LogPath)
	if err != nil || !strings.Contains(string(log), `"forward-auth"`) {
		t.Fatalf("proxy log without forward-auth lines (%v): the check below would prove nothing", err)
	}
	for _, tok := range tokens {
		if strings.Contains(string(log), tok) {
			t.Errorf("a token is in the proxy's log")
		}
	}
}

// e2eTool finds a server binary from a Debian package (nginx is in
// /usr/sbin, which a non-root PATH may lack), or skips the test.
func e2eTool(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/usr/bin"} {
		if p := filepath.Join(dir, name); e2eExecutable(p) {
			return p
		}
	}
	e2eUnavailable(t, "%s is not installed (apt-get install %s)", name, name)
	return ""
}

func e2eExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// e2eExample reads a file of deploy/forward-auth with its addresses
// replaced: the proxy's AUTH_ADDR, the protected backend's, and more.
func e2eExample(t testing.TB, name, authAddr, backendAddr string, more ...string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e2eRepoDir(t), "deploy", "forward-auth", name))
	if err != nil {
		t.Fatal(err)
	}
	r := strings.NewReplacer(append([]string{"127.0.0.1:8081", authAddr, "127.0.0.1:3000", backendAddr}, more...)...)
	return r.Replace(string(b))
}

// e2eStartNginx runs deploy/forward-auth/nginx.conf's server block and
// returns its URL. It is stopped when the test ends.
func e2eStartNginx(t testing.TB, bin, authAddr, backendAddr string) string {
	t.Helper()
	dir := t.TempDir()
	addr := e2eFreeAddr(t)
	site := e2eExample(t, "nginx.conf", authAddr, backendAddr, "listen 8080;", "listen "+addr+";")
	if err := os.WriteFile(filepath.Join(dir, "site.conf"), []byte(site), 0o600); err != nil {
		t.Fatal(err)
	}
	main := e2eNginxMain(dir, filepath.Join(dir, "site.conf"))
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte("daemon off;\nmaster_process off;\n"+main), 0o600); err != nil {
		t.Fatal(err)
	}
	e2eRun(t, "nginx", dir, addr, bin, []string{"-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log")}, nil)
	e2eDumpOnFailure(t, "nginx error.log", filepath.Join(dir, "error.log"))
	return "http://" + addr
}

// e2eNginxMain is a main nginx.conf that keeps every file in dir and
// includes site.
func e2eNginxMain(dir, site string) string {
	return fmt.Sprintf(`worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 64; }
http {
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    access_log %[1]s/access.log;
    include %[2]s;
}
`, dir, site)
}

// e2eStartCaddy runs deploy/forward-auth/Caddyfile on loopback and returns
// its URL. It is stopped when the test ends.
func e2eStartCaddy(t testing.TB, bin, authAddr, backendAddr string) string {
	t.Helper()
	dir := t.TempDir()
	addr := e2eFreeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	site := e2eExample(t, "Caddyfile", authAddr, backendAddr, ":8080 {", ":"+port+" {\n\tbind 127.0.0.1")
	cf := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cf, []byte(site), 0o600); err != nil {
		t.Fatal(err)
	}
	// Caddy keeps its state under HOME and XDG dirs: keep them here.
	env := []string{"HOME=" + dir, "XDG_DATA_HOME=" + dir, "XDG_CONFIG_HOME=" + dir}
	e2eRun(t, "caddy", dir, addr, bin, []string{"run", "--config", cf, "--adapter", "caddyfile"}, env)
	return "http://" + addr
}

// e2eRun starts a server that listens on addr, waits until it accepts
// connections, and stops it (by its PID) when the test ends.
func e2eRun(t testing.TB, name, dir, addr, bin string, args, env []string) {
	t.Helper()
	logPath := filepath.Join(dir, name+".out")
	out, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	e2eDumpOnFailure(t, name+" output", logPath)
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case <-done:
			t.Fatalf("%s exited during startup:\n%s", name, e2eTail(logPath, 20))
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening on %s within 15s:\n%s", name, addr, e2eTail(logPath, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
