package main_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// e2eFakeHomeserver answers /versions and whoami for the token "good", for
// tests about the proxy itself rather than Synapse.
func e2eFakeHomeserver(t testing.TB) *httptest.Server {
	t.Helper()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/_matrix/client/versions":
			fmt.Fprint(w, `{"versions":["v1.11"]}`)
		case r.URL.Path == "/_matrix/client/v3/account/whoami" && r.Header.Get("Authorization") == "Bearer good":
			fmt.Fprint(w, `{"user_id":"@good:localhost","device_id":"GOOD","is_guest":false}`)
		default:
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":false}`)
		}
	}))
	t.Cleanup(hs.Close)
	return hs
}

// TestE2EPrometheus: a real Prometheus scrapes the admin port, and promtool
// finds nothing wrong with the exposition.
func TestE2EPrometheus(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		e2eUnavailable(t, "no prometheus binary on PATH (Debian: apt-get install prometheus)")
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		e2eUnavailable(t, "no promtool binary on PATH (Debian: apt-get install prometheus)")
	}

	px := e2eStartProxy(t, e2eFakeHomeserver(t).URL, nil)
	for range 2 { // a miss, then a hit
		e2eWantStatus(t, e2eWhoami(t, px.URL, "good"), http.StatusOK)
	}

	t.Run("promtool check metrics", func(t *testing.T) {
		body := e2eDo(t, nil, http.MethodGet, px.AdminURL+"/metrics", "", nil).Body
		cmd := exec.CommandContext(t.Context(), promtool, "check", "metrics")
		cmd.Stdin = bytes.NewReader(body)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	})

	t.Run("scraped by Prometheus", func(t *testing.T) {
		promURL := e2eStartPrometheus(t, prom, strings.TrimPrefix(px.AdminURL, "http://"))
		for _, q := range []struct{ query, want string }{
			{`up{job="matrix-auth-proxy"}`, "1"},
			{`matrix_auth_proxy_token_cache_lookups_total{job="matrix-auth-proxy",result="hit"}`, "1"},
			{`matrix_auth_proxy_token_cache_lookups_total{job="matrix-auth-proxy",result="miss"}`, "1"},
		} {
			e2eEventually(t, 20*time.Second, q.query, func() string {
				got, err := e2ePromQuery(promURL, q.query)
				if err != nil {
					return err.Error()
				}
				if len(got) != 1 || got[0] != q.want {
					return fmt.Sprintf("got %v, want [%s]", got, q.want)
				}
				return ""
			})
		}
	})
}

// e2eStartPrometheus runs Prometheus on a free port with its own storage,
// scraping target every second, and kills it when the test ends.
func e2eStartPrometheus(t *testing.T, bin, target string) string {
	t.Helper()
	dir := t.TempDir()
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: matrix-auth-proxy
    static_configs:
      - targets: [%q]
`, target)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := e2eFreeAddr(t)
	logPath := filepath.Join(dir, "prometheus.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin,
		"--config.file="+cfgPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Registered after t.TempDir, so it runs before the dir is removed.
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	e2eDumpOnFailure(t, "Prometheus log", logPath)
	promURL := "http://" + addr
	e2eEventually(t, 30*time.Second, "Prometheus /-/ready", func() string {
		select {
		case err := <-done:
			done <- err
			return fmt.Sprintf("prometheus exited: %v", err)
		default:
		}
		code, err := e2eStatusOf(promURL + "/-/ready")
		if code != http.StatusOK {
			return fmt.Sprintf("%d %v", code, err)
		}
		return ""
	})
	return promURL
}

// e2ePromQuery runs an instant query and returns the sample values.
func e2ePromQuery(promURL, query string) ([]string, error) {
	resp, err := e2eHTTP.Get(promURL + "/api/v1/query?query=" + url.QueryEscape(query))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var ans struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		return nil, fmt.Errorf("HTTP %d: %v", resp.StatusCode, err)
	}
	if ans.Status != "success" {
		return nil, fmt.Errorf("query %s: %s", query, ans.Error)
	}
	var vals []string
	for _, r := range ans.Data.Result {
		s, _ := r.Value[1].(string)
		vals = append(vals, s)
	}
	return vals, nil
}
