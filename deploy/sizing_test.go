package deploy

// TestSizing measures what the sidecar's resources (kubernetes/sidecar/
// sidecar.yaml) are sized from: the release binary's RSS with a full default
// cache and its CPU per request, against a fake homeserver on loopback. It
// runs only when asked, since it loads the machine for about a minute:
//
//	cd deploy && SIZING=1 go test -run TestSizing -v
//	SIZING=1 SIZING_ENV="RATE_LIMIT_RPS=0" go test -run TestSizing -v

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSizing(t *testing.T) {
	if os.Getenv("SIZING") != "1" {
		t.Skip("set SIZING=1 to measure memory and CPU under load (about a minute)")
	}
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/_matrix/client/versions":
			io.WriteString(w, `{"versions":["v1.11"]}`)
		case strings.HasSuffix(r.URL.Path, "/account/whoami"):
			// One user per token "tok-N"; anything else is unknown.
			if n, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer tok-"); ok {
				fmt.Fprintf(w, `{"user_id":"@user-%s:example.org","device_id":"DEV%s"}`, n, n)
				return
			}
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}`)
		default:
			io.WriteString(w, `{"next_batch":"s1","rooms":{},"presence":{}}`)
		}
	}))
	defer hs.Close()

	bin := releaseBinary(t)
	listen, admin := freeAddr(t), freeAddr(t)
	cmd := exec.Command(bin)
	cmd.Env = []string{"UPSTREAM_URL=" + hs.URL, "LISTEN_ADDR=" + listen, "ADMIN_ADDR=" + admin, "SHUTDOWN_DELAY=0s", "LOG_LEVEL=warn"}
	cmd.Env = append(cmd.Env, strings.Fields(os.Getenv("SIZING_ENV"))...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	pid := cmd.Process.Pid
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if code, _ := get(t, "http://"+admin+"/healthz", ""); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("proxy did not start")
		}
	}
	_, rss, _ := procUsage(t, pid)
	t.Logf("env %q; idle: RSS %d MiB", cmd.Env[5:], rss>>10)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	do := func(path, token string) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+listen+path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil {
			t.Error(err)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// phase runs job from 32 goroutines, n times or for d, and reports the
	// proxy's CPU per request and memory.
	phase := func(name string, n int64, d time.Duration, job func(i int64)) {
		cpu0, _, _ := procUsage(t, pid)
		start := time.Now()
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 32 {
			wg.Go(func() {
				for {
					i := next.Add(1) - 1
					if (n > 0 && i >= n) || (d > 0 && time.Since(start) > d) {
						return
					}
					job(i)
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start).Seconds()
		cpu1, rss, peak := procUsage(t, pid)
		done := n
		if n == 0 {
			done = next.Load() - 32 // each goroutine's last number did not run
		}
		t.Logf("%-40s %7d requests, %6.0f/s; CPU %.2f cores, %3.0f µs/request; RSS %3d MiB (peak %3d MiB)",
			name, done, float64(done)/elapsed, (cpu1-cpu0)/elapsed, (cpu1-cpu0)/float64(done)*1e6, rss>>10, peak>>10)
	}
	const whoami = "/_matrix/client/v3/account/whoami"
	phase("fill: 100000 valid tokens (misses)", 100000, 0, func(i int64) { do(whoami, "tok-"+strconv.FormatInt(i, 10)) })
	phase("fill: 12500 unknown tokens (misses)", 12500, 0, func(i int64) { do(whoami, "bad-"+strconv.FormatInt(i, 10)) })
	phase("whoami, cache hits", 0, 20*time.Second, func(i int64) { do(whoami, "tok-"+strconv.FormatInt(i%100000, 10)) })
	phase("80% whoami hits, 20% forwarded", 0, 20*time.Second, func(i int64) {
		if i%5 == 0 {
			do("/_matrix/client/v3/sync", "tok-1")
		} else {
			do(whoami, "tok-"+strconv.FormatInt(i%100000, 10))
		}
	})
	phase("forwarded only", 0, 15*time.Second, func(int64) { do("/_matrix/client/v3/sync", "tok-1") })
	s := scrapeMetrics(t, "http://"+admin+"/metrics")
	if _, ok := s["matrix_auth_proxy_token_cache_entries"]; !ok {
		t.Error("no matrix_auth_proxy_token_cache_entries")
	}
	_, body := get(t, "http://"+admin+"/metrics", "")
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "matrix_auth_proxy_token_cache_entries ") || strings.HasPrefix(line, "matrix_auth_proxy_rate_limited_total") {
			t.Log(line)
		}
	}
}

// procUsage returns a process's CPU seconds (user+system), RSS and peak RSS
// in KiB, from /proc.
func procUsage(t *testing.T, pid int) (cpu float64, rss, peak int) {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	cpu = float64(utime+stime) / 100 // USER_HZ
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fmt.Sscan(v, &rss)
		}
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			fmt.Sscan(v, &peak)
		}
	}
	return cpu, rss, peak
}
