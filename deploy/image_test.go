package deploy

// The container image, proved without a Docker engine: the Dockerfile says
// what the issue asks and builds with `make build`; the binary that command
// makes is static and serves as uid 65532 with an empty environment from a
// read-only working directory, as it would in distroless.

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dockerfile is the Dockerfile's instructions, continuation lines joined.
type dockerInstr struct{ Cmd, Args string }

func dockerfile(t *testing.T) []dockerInstr {
	t.Helper()
	var out []dockerInstr
	var cur strings.Builder
	for _, line := range strings.Split(readFile(t, "Dockerfile"), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasSuffix(trimmed, "\\") {
			cur.WriteString(strings.TrimSuffix(trimmed, "\\") + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, dockerInstr{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	return out
}

func TestDockerfile(t *testing.T) {
	instrs := dockerfile(t)
	var froms []string
	for _, in := range instrs {
		if in.Cmd == "FROM" {
			froms = append(froms, in.Args)
		}
	}
	if len(froms) != 2 {
		t.Fatalf("FROM lines %q: want a builder and a final stage", froms)
	}

	// The builder's Go is the one go.mod asks for.
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(readFile(t, "go.mod"))
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	if want := "golang:" + m[1] + " AS "; !strings.HasPrefix(froms[0], want) {
		t.Errorf("builder stage is FROM %q; want %q… (go.mod says go %s)", froms[0], want, m[1])
	}
	if want := "gcr.io/distroless/static-"; !strings.HasPrefix(froms[1], want) || !strings.HasSuffix(froms[1], ":nonroot") {
		t.Errorf("final stage is FROM %q; want %s…:nonroot (no libc, no shell)", froms[1], want)
	}

	// After the second FROM: what the final image is.
	final := false
	var builds, users, exposes, entrypoints []string
	for _, in := range instrs {
		switch {
		case in.Cmd == "FROM":
			final = in.Args == froms[1]
		case in.Cmd == "RUN" && !final && strings.Contains(in.Args, "build"):
			builds = append(builds, in.Args)
		case in.Cmd == "RUN" && final:
			t.Errorf("RUN %s in the final stage: distroless has no shell", in.Args)
		case in.Cmd == "USER" && final:
			users = append(users, in.Args)
		case in.Cmd == "EXPOSE" && final:
			exposes = append(exposes, strings.Fields(in.Args)...)
		case in.Cmd == "ENTRYPOINT" && final:
			entrypoints = append(entrypoints, in.Args)
		}
	}
	// The flags live in the Makefile only: the image builds with make.
	if len(builds) != 1 || !regexp.MustCompile(`^make build VERSION="?\$\{?VERSION\}?"?$`).MatchString(builds[0]) {
		t.Errorf("builder RUN %q; want exactly `make build VERSION=\"${VERSION}\"`, so the image gets the Makefile's BUILD_FLAGS", builds)
	}
	if !strings.Contains(readFile(t, "Makefile"), "CGO_ENABLED=0 $(GO) build $(BUILD_FLAGS)") {
		t.Error("Makefile build recipe no longer reads `CGO_ENABLED=0 $(GO) build $(BUILD_FLAGS)`; check the Dockerfile still builds a static binary")
	}
	if len(users) != 1 || users[0] != "65532:65532" {
		t.Errorf("final USER %q; want 65532:65532", users)
	}
	var entry []string
	if len(entrypoints) != 1 || json.Unmarshal([]byte(entrypoints[0]), &entry) != nil || len(entry) != 1 {
		t.Errorf("ENTRYPOINT %q; want the exec form with the binary alone (no shell in the image)", entrypoints)
	}

	// EXPOSE the binary's default ports.
	env := binaryEnv(t)
	want := []string{
		fmt.Sprint(portOf(t, env["LISTEN_ADDR"].Default)),
		fmt.Sprint(portOf(t, env["ADMIN_ADDR"].Default)),
	}
	if strings.Join(exposes, " ") != strings.Join(want, " ") {
		t.Errorf("EXPOSE %q; want the default LISTEN_ADDR and ADMIN_ADDR ports %q", exposes, want)
	}
}

// TestDockerignore checks that .dockerignore keeps out what must not be in
// an image (the git history, caches, local binaries) and keeps in what
// `make build` needs. Patterns are matched like Docker does for these simple
// forms: path.Match on the path or any leading part of it.
func TestDockerignore(t *testing.T) {
	var patterns []string
	for _, line := range strings.Split(readFile(t, ".dockerignore"), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "!") {
			t.Fatalf(".dockerignore: exception %q is not understood by this test", line)
		}
		patterns = append(patterns, strings.TrimPrefix(line, "**/"))
	}
	ignored := func(path string) bool {
		parts := strings.Split(path, "/")
		for _, p := range patterns {
			for i := range parts {
				// Whole leading parts ("bin" ignores "bin/x"), and for
				// "**/"-patterns, the last element anywhere.
				if ok, _ := filepath.Match(p, strings.Join(parts[:i+1], "/")); ok {
					return true
				}
				if ok, _ := filepath.Match(p, parts[i]); ok && i == len(parts)-1 {
					return true
				}
			}
		}
		return false
	}
	for _, p := range []string{".git", ".cache/synapse", "bin/matrix-auth-proxy", "proxy/proxy_test.go"} {
		if !ignored(p) {
			t.Errorf(".dockerignore lets %s into the build context", p)
		}
	}
	needed := []string{"go.mod", "go.sum", "Makefile"}
	for _, dir := range []string{"cmd/matrix-auth-proxy", "proxy", "tokencache", "upstream"} {
		files, _ := filepath.Glob(repoPath(t, dir, "*.go"))
		for _, f := range files {
			if !strings.HasSuffix(f, "_test.go") {
				needed = append(needed, dir+"/"+filepath.Base(f))
			}
		}
	}
	for _, p := range needed {
		if ignored(p) {
			t.Errorf(".dockerignore keeps out %s, which make build needs", p)
		}
	}
}

// TestReleaseBinaryIsStatic: distroless/static has no libc and no dynamic
// loader, so the binary must have no interpreter and no needed libraries.
func TestReleaseBinaryIsStatic(t *testing.T) {
	f, err := elf.Open(releaseBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("program header %v: the binary is dynamically linked", p.Type)
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	if len(libs) > 0 {
		t.Errorf("binary needs shared libraries %q", libs)
	}
	// -s -w: no symbol table, no DWARF.
	if s := f.Section(".symtab"); s != nil {
		t.Error("binary has a symbol table: -ldflags -s missing")
	}
}

const (
	netnsChildEnv = "DEPLOY_TEST_NETNS_CHILD"
	netnsBinEnv   = "DEPLOY_TEST_NETNS_BIN"
	netnsDirEnv   = "DEPLOY_TEST_NETNS_DIR"
)

// TestReleaseBinaryRunsAsNonroot runs the binary as distroless would: uid and
// gid 65532, no environment at all (so every default applies, including
// ports 8080 and 9090), a working directory it cannot write. The default
// ports may be taken on this machine, so it runs in a fresh network
// namespace: this test binary re-executes itself there (see netnsChild).
// Needs root, for the namespace and to switch users.
func TestReleaseBinaryRunsAsNonroot(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping in -short mode: waits for the default 5s SHUTDOWN_DELAY")
	}
	bin := releaseBinary(t)
	if os.Geteuid() != 0 {
		unavailable(t, "needs root to create a network namespace and run as uid 65532")
	}
	t.Parallel()
	// Root-owned and 0555: read-only for uid 65532, which needs only to
	// traverse the directories above it.
	wd := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(wd, 0o555); err != nil {
		t.Fatal(err)
	}
	mode := os.FileMode(0o555)
	for d := wd; d != filepath.Dir(d) && d != filepath.Clean(os.TempDir()); d = filepath.Dir(d) {
		if err := os.Chmod(d, mode); err != nil {
			t.Fatal(err)
		}
		mode = 0o755
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), netnsChildEnv+"=1", netnsBinEnv+"="+bin, netnsDirEnv+"="+wd)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		unavailable(t, "cannot start a process in a new network namespace: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("in the network namespace: %v\n%s", err, out.String())
	}
	t.Logf("in the network namespace:\n%s", out.String())
}

// netnsChild runs in the fresh network namespace (as root): it brings up
// loopback, starts the binary as 65532 with an empty environment and checks
// it serves on the default ports, then stops it with SIGTERM. It returns the
// exit code for TestMain.
func netnsChild() int {
	if err := netnsCheck(os.Getenv(netnsBinEnv), os.Getenv(netnsDirEnv)); err != nil {
		fmt.Println("FAIL:", err)
		return 1
	}
	return 0
}

func netnsCheck(bin, wd string) error {
	if err := loopbackUp(); err != nil {
		return fmt.Errorf("bringing up lo: %w", err)
	}
	// Prove the directory is read-only for the user the binary runs as.
	probe := exec.Command("/bin/sh", "-c", "touch probe 2>/dev/null")
	probe.Dir, probe.Env = wd, []string{"PATH=/usr/bin:/bin"}
	probe.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65532, Gid: 65532, Groups: []uint32{}}}
	if probe.Run() == nil {
		return fmt.Errorf("uid 65532 can write to the working directory %s", wd)
	}

	var logs bytes.Buffer
	cmd := exec.Command(bin)
	cmd.Env = []string{} // not nil: nil would mean "inherit ours"
	cmd.Dir = wd
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65532, Gid: 65532, Groups: []uint32{}}}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	fail := func(format string, args ...any) error {
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf(format+"\nlogs:\n%s", append(args, logs.String())...)
	}

	client := &http.Client{Timeout: 2 * time.Second}
	status := func(url string) int {
		resp, err := client.Get(url)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	deadline := time.Now().Add(10 * time.Second)
	for status("http://127.0.0.1:9090/healthz") != http.StatusOK {
		if time.Now().After(deadline) {
			return fail("no 200 from http://127.0.0.1:9090/healthz within 10s")
		}
		select {
		case err := <-done:
			return fmt.Errorf("exited before answering /healthz: %v\nlogs:\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	fmt.Println("GET :9090/healthz: 200")

	uid, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		return fail("%v", err)
	}
	if m := regexp.MustCompile(`(?m)^Uid:\s+(\d+)\s+(\d+)`).FindSubmatch(uid); m == nil || string(m[1]) != "65532" || string(m[2]) != "65532" {
		return fail("process runs as %q, want uid 65532", m)
	}
	fmt.Println("running as uid 65532")
	// No homeserver in this namespace: not ready, and clients get a 502.
	if s := status("http://127.0.0.1:9090/readyz"); s != http.StatusServiceUnavailable {
		return fail("GET :9090/readyz: %d, want 503 without a homeserver", s)
	}
	if s := status("http://127.0.0.1:8080/_matrix/client/versions"); s != http.StatusBadGateway {
		return fail("GET :8080/_matrix/client/versions: %d, want 502 without a homeserver", s)
	}
	fmt.Println("GET :9090/readyz: 503, GET :8080/…: 502 (no homeserver)")
	if !strings.Contains(logs.String(), `"version":"`+buildVersion+`"`) {
		return fail("start-up log does not show version %q: -X main.version not applied", buildVersion)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fail("%v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("after SIGTERM: %v\nlogs:\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		return fail("still running 30s after SIGTERM")
	}
	fmt.Println("SIGTERM: exit 0")
	return nil
}

// loopbackUp sets the IFF_UP flag of lo, which a new network namespace
// starts without.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}
