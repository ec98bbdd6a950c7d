package main_test

import (
	"net/http"
	"syscall"
	"testing"
	"time"
)

// TestE2EGracefulShutdown: on SIGTERM the binary fails /readyz at once, keeps
// serving clients for SHUTDOWN_DELAY, then exits 0.
func TestE2EGracefulShutdown(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	const delay = 1500 * time.Millisecond
	px := e2eStartProxy(t, e2eFakeHomeserver(t).URL, map[string]string{"SHUTDOWN_DELAY": delay.String()})
	e2eWaitReady(t, px, http.StatusOK)

	sent := time.Now()
	if err := px.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e2eEventually(t, time.Second, "/readyz 503 after SIGTERM", func() string {
		if code, err := e2eStatusOf(px.AdminURL + "/readyz"); code != http.StatusServiceUnavailable {
			return "readyz " + http.StatusText(code) + " " + e2eErrString(err)
		}
		return ""
	})
	if r := e2eWhoami(t, px.URL, "good"); r.Status != http.StatusOK {
		t.Errorf("whoami during SHUTDOWN_DELAY: %d %s, want 200", r.Status, r.Body)
	}
	if since := time.Since(sent); since > delay-200*time.Millisecond {
		t.Fatalf("test too slow (%v) to check serving inside the delay", since)
	}
	if !px.Wait(delay + 10*time.Second) {
		t.Fatalf("still running %v after SIGTERM", time.Since(sent))
	}
	if took := time.Since(sent); took < delay {
		t.Errorf("exited %v after SIGTERM, before SHUTDOWN_DELAY %v", took, delay)
	}
	px.stopped = true
	if px.waitErr != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0", px.waitErr)
	}
	if _, err := e2eStatusOf(px.URL + "/_matrix/client/versions"); err == nil {
		t.Errorf("client port still answers after exit")
	}
}

func e2eErrString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
