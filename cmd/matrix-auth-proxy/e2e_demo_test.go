package main_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestE2EDemo runs `make demo`'s script non-interactively (DEMO_EXIT=1): it
// starts its own Synapse and proxy, runs the curl commands it prints, checks
// what they answer, and stops both.
func TestE2EDemo(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	e2eSharedSynapse(t) // skips or fails the same way when Synapse cannot be had
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(e2eRepoDir(t), "deploy", "local", "demo.sh"))
	cmd.Env = append(os.Environ(),
		"DEMO_EXIT=1",
		"DEMO_BIN="+filepath.Join(dir, "matrix-auth-proxy"),
		"DEMO_LISTEN_ADDR="+e2eFreeAddr(t),
		"DEMO_ADMIN_ADDR="+e2eFreeAddr(t),
		"SYNAPSE_DATA="+filepath.Join(dir, "synapse"),
		"SYNAPSE_PORT="+strings.TrimPrefix(e2eFreeAddr(t), "127.0.0.1:"),
		"SYNAPSE_BCRYPT_ROUNDS=4",
	)
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("deploy/local/demo.sh with DEMO_EXIT=1: %v\n%s", err, out)
	}
	for _, want := range []string{"curl -sS", "all commands behaved as described", "synapse.sh: stopped"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
