package bus

// Tests of the invalidation bus against a real redis-server, started by each
// test on a free 127.0.0.1 port and killed when it ends. Without the binary
// (Debian: apt-get install redis-server) they skip, unless E2E_REQUIRED=1.

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is a settable time source, so no test sleeps to see an expiry.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Unix(1_700_000_000, 0)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// drops counts the entries a cache dropped, by reason.
type drops struct {
	mu sync.Mutex
	n  map[tokencache.Reason]int
}

func (d *drops) add(r tokencache.Reason, n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n == nil {
		d.n = map[tokencache.Reason]int{}
	}
	d.n[r] += n
}

func (d *drops) get(r tokencache.Reason) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n[r]
}

// fixture is a cache on a settable clock, with the hash key every replica
// of a test shares.
type fixture struct {
	c     *tokencache.Cache
	clock *clock
	drops *drops
	h     *tokencache.Hasher
}

func newFixture(t *testing.T, mod func(*tokencache.Config)) *fixture {
	t.Helper()
	f := &fixture{clock: newClock(), drops: &drops{}}
	cfg := tokencache.Config{
		Size:          100,
		TTL:           2 * time.Minute,
		NegativeTTL:   10 * time.Second,
		LookupTimeout: time.Second,
		Now:           f.clock.Now,
		OnDrop:        f.drops.add,
	}
	if mod != nil {
		mod(&cfg)
	}
	var err error
	if f.c, err = tokencache.New(cfg); err != nil {
		t.Fatal(err)
	}
	if f.h, err = tokencache.NewHasher([]byte("0123456789abcdef0123456789abcdef")); err != nil {
		t.Fatal(err)
	}
	return f
}

func positive(user, device string) tokencache.Answer {
	return tokencache.Answer{Kind: tokencache.Positive, UserID: user, DeviceID: device,
		Body: fmt.Sprintf(`{"user_id":%q,"device_id":%q}`, user, device)}
}

// fill resolves key with a fetch that returns a, and fails the test if the
// fetch was not called.
func (f *fixture) fill(t *testing.T, key tokencache.Key, a tokencache.Answer) {
	t.Helper()
	called := false
	got, res, err := f.c.Resolve(t.Context(), key, func(context.Context) (tokencache.Answer, error) {
		called = true
		return a, nil
	})
	if err != nil || res != tokencache.Miss || !called || got.Kind != a.Kind {
		t.Fatalf("fill: got %v, %v, %v, called=%v", got, res, err, called)
	}
}

func (f *fixture) expect(t *testing.T, key tokencache.Key, want tokencache.Result) {
	t.Helper()
	if _, got := f.c.Get(key); got != want {
		t.Errorf("Get: got %v, want %v", got, want)
	}
}

// testRedis is a redis-server process of one test.
type testRedis struct {
	addr string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

func startTestRedis(t *testing.T) *testRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("E2E_REQUIRED") == "1" {
			t.Fatalf("E2E_REQUIRED=1 but redis-server is not on PATH (Debian: apt-get install redis-server)")
		}
		t.Skip("redis-server not on PATH (Debian: apt-get install redis-server); set E2E_REQUIRED=1 to make this a failure")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &testRedis{addr: ln.Addr().String(), log: filepath.Join(t.TempDir(), "redis.log")}
	ln.Close()
	r.Start(t)
	t.Cleanup(func() {
		r.Kill(t)
		if t.Failed() {
			b, _ := os.ReadFile(r.log)
			t.Logf("---- redis-server log ----\n%s", b)
		}
	})
	return r
}

func (r *testRedis) URL() string { return "redis://" + r.addr }

// Start starts the server (again) on its port and waits until it answers.
func (r *testRedis) Start(t *testing.T) {
	t.Helper()
	_, port, _ := net.SplitHostPort(r.addr)
	logf, err := os.OpenFile(r.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	r.cmd = exec.Command("redis-server", "--save", "", "--appendonly", "no", "--port", port, "--bind", "127.0.0.1")
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.done = make(chan struct{})
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	waitFor(t, 10*time.Second, "redis-server answering PING", func() bool {
		select {
		case <-r.done:
			t.Fatalf("redis-server exited at start-up")
		default:
		}
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("PING\r\n")); err != nil {
			return false
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		return err == nil && strings.HasPrefix(line, "+PONG")
	})
}

// Kill kills the server (SIGKILL: no goodbye to its clients) and waits.
func (r *testRedis) Kill(t *testing.T) {
	t.Helper()
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// monitor records everything Redis receives (MONITOR) until the server
// goes away or Stop is called.
type monitor struct {
	conn net.Conn
	done chan struct{}
	mu   sync.Mutex
	out  strings.Builder
}

func startMonitor(t *testing.T, addr string) *monitor {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m := &monitor{conn: c, done: make(chan struct{})}
	rd := bufio.NewReader(c)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := rd.ReadString('\n'); err != nil || !strings.HasPrefix(line, "+OK") {
		t.Fatalf("MONITOR: %q, %v", line, err)
	}
	_ = c.SetDeadline(time.Time{})
	go func() {
		defer close(m.done)
		for {
			line, err := rd.ReadString('\n')
			m.mu.Lock()
			m.out.WriteString(line)
			m.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(m.Stop)
	return m
}

func (m *monitor) Stop() {
	m.conn.Close()
	<-m.done
}

func (m *monitor) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.out.String()
}

// waitFor polls cond every millisecond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(time.Millisecond)
	}
}

// busNode is one replica: a cache, its bus and its registry.
type busNode struct {
	*fixture
	bus *Bus
	reg *prometheus.Registry
}

// newBusNode makes a replica on url and runs its bus until the test ends.
// Every node of a test shares the fixture's hash key, as replicas must.
func newBusNode(t *testing.T, url string, downTTL time.Duration) *busNode {
	t.Helper()
	n := newIdleBusNode(t, url, downTTL)
	n.run(t)
	return n
}

// newIdleBusNode makes a replica whose bus is not running yet: what it
// publishes waits until run.
func newIdleBusNode(t *testing.T, url string, downTTL time.Duration) *busNode {
	t.Helper()
	n := &busNode{reg: prometheus.NewRegistry()}
	n.fixture = newFixture(t, func(c *tokencache.Config) {
		c.TTL = 10 * time.Minute
		c.OnInvalidate = func(inv tokencache.Invalidation) { n.bus.Publish(inv) }
	})
	var err error
	if n.bus, err = New(Config{URL: url, DownTTL: downTTL, Registerer: n.reg}, n.c); err != nil {
		t.Fatal(err)
	}
	return n
}

// run runs the node's bus until the test ends.
func (n *busNode) run(t *testing.T) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.bus.Run(t.Context())
	}()
	t.Cleanup(func() { <-done }) // t.Context() is cancelled by then
}

// metric returns the value of a bus metric by its exposed name (and reason
// label, for the dropped counter); absent counts as 0.
func (n *busNode) metric(t *testing.T, name string, reason ...string) float64 {
	t.Helper()
	mfs, err := n.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if len(reason) == 0 || lp.GetName() != "reason" || lp.GetValue() != reason[0] {
					continue series
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

const (
	mPublished = "matrix_auth_proxy_bus_messages_published_total"
	mReceived  = "matrix_auth_proxy_bus_messages_received_total"
	mApplied   = "matrix_auth_proxy_bus_messages_applied_total"
	mDropped   = "matrix_auth_proxy_bus_messages_dropped_total"
	mUp        = "matrix_auth_proxy_bus_up"
	mFlushes   = "matrix_auth_proxy_bus_flushes_total"
)

func (n *busNode) waitUp(t *testing.T, want bool, d time.Duration) {
	t.Helper()
	gauge := 0.0
	if want {
		gauge = 1
	}
	waitFor(t, d, fmt.Sprintf("bus up=%v", want), func() bool {
		return n.bus.Up() == want && n.metric(t, mUp) == gauge
	})
}

// Fake tokens, distinctive enough to be found in anything Redis received.
var busTokens = []string{
	"syt_RAWTOKEN_alice_dev1_Zq8XfA", "syt_RAWTOKEN_alice_dev1_masq_k2Lp",
	"syt_RAWTOKEN_alice_dev2_Yd7QwE", "syt_RAWTOKEN_bob_dev1_Ur4TbN",
}

// assertNoRawTokens fails if a raw token reached Redis, after checking the
// monitor did see the bus's traffic (so the assertion is not vacuous).
func assertNoRawTokens(t *testing.T, traffic, published string) {
	t.Helper()
	if !strings.Contains(strings.ToLower(traffic), `"publish"`) || !strings.Contains(traffic, published) {
		t.Fatalf("MONITOR did not see the bus publishing %s; saw:\n%s", published, traffic)
	}
	for _, tok := range busTokens {
		if strings.Contains(traffic, tok) || strings.Contains(traffic, "RAWTOKEN") {
			t.Fatalf("raw token %q reached Redis:\n%s", tok, traffic)
		}
	}
}

func TestBusSharesInvalidations(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // registered first: runs last
	rs := startTestRedis(t)
	mon := startMonitor(t, rs.addr)
	a := newBusNode(t, rs.URL(), time.Minute)
	b := newBusNode(t, rs.URL(), time.Minute)
	a.waitUp(t, true, 10*time.Second)
	b.waitUp(t, true, 10*time.Second)

	h := a.h
	aliceDev1 := h.Key(busTokens[0], tokencache.Masquerade{})
	aliceDev1Masq := h.Key(busTokens[0], tokencache.Masquerade{UserID: "@alice:example.org", DeviceID: "DEV1"})
	aliceDev2 := h.Key(busTokens[2], tokencache.Masquerade{})
	bobDev1 := h.Key(busTokens[3], tokencache.Masquerade{})
	entries := map[tokencache.Key]tokencache.Answer{
		aliceDev1:     positive("@alice:example.org", "DEV1"),
		aliceDev1Masq: positive("@alice:example.org", "DEV1"),
		aliceDev2:     positive("@alice:example.org", "DEV2"),
		bobDev1:       positive("@bob:example.org", "DEV1"),
	}

	published := 0
	for _, tc := range []struct {
		name       string
		invalidate func(*tokencache.Cache)
		gone       []tokencache.Key
	}{
		{"token", func(c *tokencache.Cache) { c.InvalidateToken(aliceDev1.Token, "logout") }, []tokencache.Key{aliceDev1, aliceDev1Masq}},
		{"device", func(c *tokencache.Cache) { c.InvalidateDevice("@alice:example.org", "DEV2", "device") }, []tokencache.Key{aliceDev2}},
		{"user sparing a token", func(c *tokencache.Cache) { c.InvalidateUser("@alice:example.org", aliceDev2.Token, "password") },
			[]tokencache.Key{aliceDev1, aliceDev1Masq}},
		{"user", func(c *tokencache.Cache) { c.InvalidateUser("@alice:example.org", tokencache.TokenID{}, "deactivate") },
			[]tokencache.Key{aliceDev1, aliceDev1Masq, aliceDev2}},
		{"all", func(c *tokencache.Cache) { c.Flush("logout") }, []tokencache.Key{aliceDev1, aliceDev1Masq, aliceDev2, bobDev1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, n := range []*busNode{a, b} {
				n.c.Apply(tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: "test"})
				for k, ans := range entries {
					n.fill(t, k, ans)
				}
			}
			appliedB := b.metric(t, mApplied)
			dropsB := b.drops.get(tokencache.ReasonBus)

			start := time.Now()
			tc.invalidate(a.c)
			published++
			gone := func(k tokencache.Key) bool { _, r := b.c.Get(k); return r == tokencache.Miss }
			waitFor(t, time.Second, "invalidation applied on B", func() bool {
				for _, k := range tc.gone {
					if !gone(k) {
						return false
					}
				}
				return true
			})
			t.Logf("applied on B %v after the invalidation on A", time.Since(start).Round(time.Microsecond))
			for k := range entries {
				wantGone := false
				for _, g := range tc.gone {
					wantGone = wantGone || g == k
				}
				if gone(k) != wantGone {
					t.Errorf("B: entry of %s/%s gone=%v, want %v", entries[k].UserID, entries[k].DeviceID, gone(k), wantGone)
				}
			}
			// The counter moves just after the entries go.
			waitFor(t, time.Second, "B counting one applied message", func() bool { return b.metric(t, mApplied)-appliedB >= 1 })
			if got := b.metric(t, mApplied) - appliedB; got != 1 {
				t.Errorf("B applied %v messages, want 1", got)
			}
			if got := b.drops.get(tokencache.ReasonBus) - dropsB; got != len(tc.gone) {
				t.Errorf("B dropped %d entries with reason %q, want %d", got, tokencache.ReasonBus, len(tc.gone))
			}
			// A hears its own message back and ignores it.
			waitFor(t, time.Second, "A receiving its own echo", func() bool { return a.metric(t, mReceived) == float64(published) })
			if got := a.metric(t, mApplied); got != 0 {
				t.Errorf("A applied %v messages, want 0 (its own echoes)", got)
			}
			// The publisher counts after PUBLISH returns, which can be after
			// the echo arrived.
			waitFor(t, time.Second, "A counting its publish", func() bool { return a.metric(t, mPublished) == float64(published) })
		})
	}
	for _, n := range []*busNode{a, b} {
		for _, reason := range []string{"queue_full", "passive_overflow", "publish_failed", "malformed"} {
			if got := n.metric(t, mDropped, reason); got != 0 {
				t.Errorf("dropped{reason=%q} = %v, want 0", reason, got)
			}
		}
		if got := n.metric(t, mFlushes); got != 0 {
			t.Errorf("flushes = %v, want 0 (the cache was empty at the first subscription)", got)
		}
	}
	assertNoRawTokens(t, mon.String(), fmt.Sprintf("%x", aliceDev1.Token[:]))
}

func TestBusIgnoresMalformedMessages(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	b := newBusNode(t, rs.URL(), time.Minute)
	b.waitUp(t, true, 10*time.Second)
	key := b.h.Key(busTokens[0], tokencache.Masquerade{})
	b.fill(t, key, positive("@alice:example.org", "DEV1"))

	raw := redis.NewClient(&redis.Options{Addr: rs.addr})
	defer raw.Close()
	hexID := fmt.Sprintf("%x", key.Token[:])
	bad := []string{
		``,
		`not json`,
		`[1,2,3]`,
		`{"v":2,"from":"x","scope":"all"}`,
		`{"v":3,"from":"x","scope":"all"}`,
		`{"v":2,"from":"x","scope":"token","tokens":[]}`,
		`{"v":2,"scope":"token","tokens":["` + hexID + `"]}`,
		`{"v":2,"from":"x","scope":"token","token":"` + hexID + `","tokens":["` + hexID + `"]}`,
		`{"v":2,"from":"x","scope":"token","tokens":["` + hexID + `","` + hexID[:30] + `"]}`,
		`{"v":2,"from":"x","scope":"user","user_id":"@alice:example.org","tokens":["` + hexID + `"]}`,
		`{"from":"x","scope":"all"}`,
		`{"v":1,"scope":"all"}`,
		`{"v":1,"from":"x","scope":"everything"}`,
		`{"v":1,"from":"x","scope":"token"}`,
		`{"v":1,"from":"x","scope":"token","token":"` + hexID[:30] + `"}`,
		`{"v":1,"from":"x","scope":"token","token":"` + strings.Repeat("zz", 16) + `"}`,
		`{"v":1,"from":"x","scope":"device","device_id":"DEV1"}`,
		`{"v":1,"from":"x","scope":"user"}`,
		`{"v":1,"from":"x","scope":"user","user_id":"@alice:example.org","token":"abc"}`,
		`{"v":1,"from":"x","scope":"all","user_id":"` + strings.Repeat("a", busMaxMessage) + `"}`,
		`{"v":"1","from":"x","scope":"all"}`,
	}
	for _, p := range bad {
		if err := raw.Publish(t.Context(), DefaultChannel, p).Err(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "malformed messages counted", func() bool {
		return b.metric(t, mDropped, "malformed") == float64(len(bad))
	})
	if _, r := b.c.Get(key); r != tokencache.Hit {
		t.Fatalf("a malformed message dropped an entry")
	}
	if got := b.metric(t, mApplied); got != 0 {
		t.Fatalf("applied %v malformed messages", got)
	}
	// The bus is still working: a well-formed message from a peer applies.
	good := `{"v":1,"from":"peer","scope":"token","token":"` + hexID + `","reason":"logout","future_field":true}`
	if err := raw.Publish(t.Context(), DefaultChannel, good).Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "well-formed message applied", func() bool { _, r := b.c.Get(key); return r == tokencache.Miss })
	if got, want := b.metric(t, mReceived), float64(len(bad)+1); got != want {
		t.Errorf("received = %v, want %v", got, want)
	}
	if !b.bus.Up() {
		t.Error("bus down after malformed messages")
	}
}

func TestBusSurvivesRedisOutage(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	const downTTL = 30 * time.Second // long: the test's outage must not reach it
	rs := startTestRedis(t)
	mon := startMonitor(t, rs.addr)
	a := newBusNode(t, rs.URL(), downTTL)
	b := newBusNode(t, rs.URL(), downTTL)
	a.waitUp(t, true, 10*time.Second)
	b.waitUp(t, true, 10*time.Second)

	beforeOutage := b.h.Key(busTokens[0], tokencache.Masquerade{})
	duringOutage := b.h.Key(busTokens[1], tokencache.Masquerade{})
	onA := a.h.Key(busTokens[2], tokencache.Masquerade{})
	afterOutage := b.h.Key(busTokens[3], tokencache.Masquerade{})
	b.fill(t, beforeOutage, positive("@alice:example.org", "DEV1"))
	a.fill(t, onA, positive("@alice:example.org", "DEV2"))

	start := time.Now()
	rs.Kill(t)
	mon.Stop()
	traffic := mon.String()
	a.waitUp(t, false, 5*time.Second)
	b.waitUp(t, false, 5*time.Second)
	t.Logf("both buses down %v after Redis was killed", time.Since(start).Round(time.Millisecond))

	// The cache keeps working, with positive answers clamped to downTTL.
	b.fill(t, duringOutage, positive("@alice:example.org", "DEV1"))
	b.clock.Advance(downTTL - time.Nanosecond)
	b.expect(t, duringOutage, tokencache.Hit)
	b.clock.Advance(time.Nanosecond)
	b.expect(t, duringOutage, tokencache.Miss)
	b.fill(t, duringOutage, positive("@alice:example.org", "DEV1"))
	b.expect(t, beforeOutage, tokencache.Hit) // stored before: its own TTL
	// Local invalidations still work; the one that cannot be published
	// waits for the bus to be back.
	if n := a.c.InvalidateToken(onA.Token, "logout"); n != 1 {
		t.Fatalf("InvalidateToken on A during the outage dropped %d, want 1", n)
	}
	if got := a.bus.out.len(); got != 1 {
		t.Errorf("A holds %d invalidations while down, want 1", got)
	}

	start = time.Now()
	rs.Start(t)
	mon = startMonitor(t, rs.addr)
	a.waitUp(t, true, 15*time.Second)
	b.waitUp(t, true, 15*time.Second)
	t.Logf("both buses up %v after Redis restarted", time.Since(start).Round(time.Millisecond))
	// B flushed on resubscribing (entries filled before and during the
	// outage may have missed invalidations), and again for A's resync.
	if got := b.metric(t, mFlushes); got != 1 {
		t.Errorf("B flushes = %v, want 1", got)
	}
	if got := a.metric(t, mFlushes); got != 1 {
		t.Errorf("A flushes = %v, want 1", got)
	}
	b.expect(t, beforeOutage, tokencache.Miss)
	b.expect(t, duringOutage, tokencache.Miss)
	if got := b.drops.get(tokencache.ReasonBusResync); got != 2 {
		t.Errorf("B dropped %d entries for %q, want 2", got, tokencache.ReasonBusResync)
	}
	// What A decided while down goes out once it is back (B gets it only
	// if it resubscribed first; it flushed anyway): nothing was lost, so
	// nobody is told to flush.
	waitFor(t, 5*time.Second, "A publishing what it held", func() bool { return a.metric(t, mPublished) == 1 })
	for _, reason := range []string{"queue_full", "publish_failed"} {
		if got := a.metric(t, mDropped, reason); got != 0 {
			t.Errorf("A dropped{reason=%q} = %v, want 0", reason, got)
		}
	}

	// The clamp is lifted: the cache's own TTL again.
	b.fill(t, afterOutage, positive("@bob:example.org", "DEV1"))
	b.clock.Advance(downTTL + time.Minute)
	b.expect(t, afterOutage, tokencache.Hit)
	// And the bus works again.
	a.c.InvalidateDevice("@bob:example.org", "DEV1", "device")
	waitFor(t, time.Second, "B applying A's invalidation after the outage", func() bool {
		_, r := b.c.Get(afterOutage)
		return r == tokencache.Miss
	})
	mon.Stop()
	traffic += mon.String()
	if held := fmt.Sprintf(`\"token\":\"%x\",\"reason\":\"logout\"`, onA.Token[:]); !strings.Contains(traffic, held) {
		t.Errorf("the invalidation A held is not in the Redis traffic:\n%s", traffic)
	}
	if strings.Contains(traffic, `\"scope\":\"all\"`) {
		t.Errorf("a flush was published, though nothing was lost:\n%s", traffic)
	}
	assertNoRawTokens(t, traffic, "@bob:example.org")
}

func TestBusNoticesSilentRedis(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	b := newBusNode(t, rs.URL(), time.Minute)
	b.waitUp(t, true, 10*time.Second)
	// A frozen server (or a partition) closes no socket: only the health
	// check's unanswered ping tells.
	if err := rs.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	b.waitUp(t, false, 5*time.Second)
	t.Logf("bus down %v after Redis froze", time.Since(start).Round(time.Millisecond))
	if err := rs.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	b.waitUp(t, true, 20*time.Second)
}

func TestBusResyncAfterLostPublish(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	a := newBusNode(t, rs.URL(), time.Minute)
	b := newBusNode(t, rs.URL(), time.Minute)
	a.waitUp(t, true, 10*time.Second)
	b.waitUp(t, true, 10*time.Second)
	bob := b.h.Key(busTokens[3], tokencache.Masquerade{})
	b.fill(t, bob, positive("@bob:example.org", "DEV1"))

	// A loses one of its invalidations while B stays subscribed (a
	// partition on A's side, a publish timeout): B never sees that gap by
	// itself, so A tells it to flush, as soon as it can.
	a.bus.lost()
	waitFor(t, time.Second, "B flushed by A's resync", func() bool { _, r := b.c.Get(bob); return r == tokencache.Miss })
	waitFor(t, time.Second, "B applying it", func() bool { return b.metric(t, mApplied) == 1 })
	// A counts a publish after PUBLISH returns, which can be after B
	// applied it.
	waitFor(t, time.Second, "A counting the resync", func() bool { return a.metric(t, mPublished) == 1 })
	if got := a.metric(t, mDropped, "publish_failed"); got != 1 {
		t.Errorf("publish_failed = %v, want 1", got)
	}
	if got := b.metric(t, mFlushes); got != 0 {
		t.Errorf("B counted %v flushes of its own, want 0", got)
	}
}

// logBuffer collects a zap logger's JSON lines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *zap.Logger {
	return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(l), zap.DebugLevel))
}

func TestBusFlushesWhenDownLongerThanDownTTL(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	// Nothing listens there: the bus is down from the start.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	reg := prometheus.NewRegistry()
	var bus *Bus
	f := newFixture(t, func(c *tokencache.Config) {
		c.TTL = 10 * time.Minute
		c.OnInvalidate = func(inv tokencache.Invalidation) { bus.Publish(inv) }
	})
	key := f.h.Key(busTokens[0], tokencache.Masquerade{})
	f.fill(t, key, positive("@alice:example.org", "DEV1")) // stored at full TTL
	logs := &logBuffer{}
	bus, err = New(Config{URL: "redis://" + addr, DownTTL: 300 * time.Millisecond, Registerer: reg, Logger: logs.logger()}, f.c)
	if err != nil {
		t.Fatal(err)
	}
	n := &busNode{fixture: f, bus: bus, reg: reg}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); bus.Run(ctx) }()

	start := time.Now()
	waitFor(t, 5*time.Second, "cache flushed after the down TTL", func() bool { _, r := f.c.Get(key); return r == tokencache.Miss })
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("flushed after %v, before the down TTL", d)
	}
	if got := n.metric(t, mFlushes); got != 1 {
		t.Errorf("flushes = %v, want 1", got)
	}
	if n.metric(t, mUp) != 0 || bus.Up() {
		t.Error("bus reported up with nothing listening")
	}
	// Publishing while down neither blocks nor leaks a token: it waits.
	f.c.InvalidateToken(key.Token, "logout")
	if got := bus.out.len(); got != 1 {
		t.Errorf("%d invalidations wait, want 1", got)
	}

	// Let it retry a few times: one warning per outage, not one per retry.
	waitFor(t, 5*time.Second, "a few retries", func() bool { return time.Since(start) > time.Second })
	cancel()
	<-done
	if got := strings.Count(logs.String(), "invalidation bus down"); got != 1 {
		t.Errorf("%d bus-down warnings, want 1:\n%s", got, logs.String())
	}
	if strings.Contains(logs.String(), "RAWTOKEN") {
		t.Errorf("a token reached the logs:\n%s", logs.String())
	}
	// The clamp stays after Run returns: nothing is heard from peers.
	f.fill(t, key, positive("@alice:example.org", "DEV1"))
	f.clock.Advance(300*time.Millisecond - time.Nanosecond)
	f.expect(t, key, tokencache.Hit)
	f.clock.Advance(time.Nanosecond)
	f.expect(t, key, tokencache.Miss)
}

func TestNew(t *testing.T) {
	f := newFixture(t, nil)
	for name, cfg := range map[string]Config{
		"no registerer":     {URL: "redis://127.0.0.1:6379"},
		"not redis":         {URL: "http://127.0.0.1:6379", Registerer: prometheus.NewRegistry()},
		"not a url":         {URL: "::", Registerer: prometheus.NewRegistry()},
		"negative down ttl": {URL: "redis://127.0.0.1:6379", DownTTL: -time.Second, Registerer: prometheus.NewRegistry()},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := New(cfg, f.c); err == nil {
				t.Error("New accepted a bad config")
			}
		})
	}
	t.Run("no cache", func(t *testing.T) {
		if _, err := New(Config{URL: "redis://127.0.0.1:6379", Registerer: prometheus.NewRegistry()}, nil); err == nil {
			t.Error("New accepted a nil cache")
		}
	})
	t.Run("password never in errors", func(t *testing.T) {
		_, err := New(Config{URL: "redis://:hunter2@127.0.0.1:6379/notadb", Registerer: prometheus.NewRegistry()}, f.c)
		if err == nil || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("got %v, want an error without the password", err)
		}
	})
	t.Run("defaults and password override", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		b, err := New(Config{URL: "rediss://:fromurl@redis.example.org:6380/2", Password: "fromsecret", Registerer: reg}, f.c)
		if err != nil {
			t.Fatal(err)
		}
		if b.channel != DefaultChannel || b.opts.Password != "fromsecret" || b.opts.TLSConfig == nil || b.opts.Addr != "redis.example.org:6380" {
			t.Errorf("channel %q, password %q, TLS %v, addr %q", b.channel, b.opts.Password, b.opts.TLSConfig != nil, b.opts.Addr)
		}
		// Registered, at their zero values, before anything happened.
		n := &busNode{bus: b, reg: reg}
		mfs, _ := reg.Gather()
		if len(mfs) != 6 {
			t.Errorf("%d metric families registered, want 6", len(mfs))
		}
		mfs, _ = reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() != mDropped {
				continue
			}
			var reasons []string
			for _, m := range mf.GetMetric() {
				reasons = append(reasons, m.GetLabel()[0].GetValue())
			}
			slices.Sort(reasons)
			if want := []string{"malformed", "passive_overflow", "publish_failed", "queue_full"}; !slices.Equal(reasons, want) {
				t.Errorf("dropped reasons registered: %v, want %v", reasons, want)
			}
		}
		if got := n.metric(t, mDropped, "queue_full"); got != 0 {
			t.Errorf("queue_full = %v", got)
		}
		if _, err := New(Config{URL: "redis://127.0.0.1:6379", Registerer: reg}, f.c); err == nil {
			t.Error("a second bus registered the same metrics without an error")
		}
	})
}

func TestBusPublishNeverBlocks(t *testing.T) {
	passive := func(i int) tokencache.Invalidation {
		return tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i), Reason: tokencache.ReasonUnknownToken}
	}
	explicit := func(i int) tokencache.Invalidation {
		return tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: madeUpToken(i), Reason: "logout"}
	}
	const extra = 10
	for _, tc := range []struct {
		name                      string
		n                         int
		inv                       func(int) tokencache.Invalidation
		queueFull, passiveDropped float64
		waiting                   int
	}{
		// Past its bound, the explicit queue is replaced by a flush.
		{"explicit", busQueueSize + extra, explicit, 1, 0, 1},
		// Past its bound, passives are dropped.
		{"passive", busPassiveQueueSize + extra, passive, 0, extra, busPassiveQueueSize},
		{"passive, one token", busPassiveQueueSize + extra, func(int) tokencache.Invalidation { return passive(0) }, 0, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, nil)
			reg := prometheus.NewRegistry()
			b, err := New(Config{URL: "redis://127.0.0.1:1", Registerer: reg}, f.c)
			if err != nil {
				t.Fatal(err)
			}
			// Nothing drains the outbox (Run is not running).
			for i := range tc.n {
				b.Publish(tc.inv(i))
			}
			n := &busNode{bus: b, reg: reg}
			if got := n.metric(t, mDropped, "queue_full"); got != tc.queueFull {
				t.Errorf("queue_full = %v, want %v", got, tc.queueFull)
			}
			if got := n.metric(t, mDropped, "passive_overflow"); got != tc.passiveDropped {
				t.Errorf("passive_overflow = %v, want %v", got, tc.passiveDropped)
			}
			if got := b.out.len(); got != tc.waiting {
				t.Errorf("%d waiting, want %d", got, tc.waiting)
			}
		})
	}
}

func TestBusMessageFormat(t *testing.T) {
	id := tokencache.TokenID{0xde, 0xad, 0xbe, 0xef, 15: 0x01}
	for _, tc := range []struct {
		inv  tokencache.Invalidation
		want string
	}{
		{tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: id, Reason: "logout"},
			`{"v":1,"from":"me","scope":"token","token":"deadbeef000000000000000000000001","reason":"logout"}`},
		{tokencache.Invalidation{Scope: tokencache.ScopeDevice, UserID: "@a:x", DeviceID: "D", Reason: "device"},
			`{"v":1,"from":"me","scope":"device","user_id":"@a:x","device_id":"D","reason":"device"}`},
		{tokencache.Invalidation{Scope: tokencache.ScopeUser, UserID: "@a:x", Token: id, Reason: "password"},
			`{"v":1,"from":"me","scope":"user","token":"deadbeef000000000000000000000001","user_id":"@a:x","reason":"password"}`},
		{tokencache.Invalidation{Scope: tokencache.ScopeUser, UserID: "@a:x", Reason: "deactivate"},
			`{"v":1,"from":"me","scope":"user","user_id":"@a:x","reason":"deactivate"}`},
		{tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: "logout"},
			`{"v":1,"from":"me","scope":"all","reason":"logout"}`},
	} {
		got, err := encodeBusMessage("me", tc.inv)
		if err != nil || got != tc.want {
			t.Errorf("encode %+v:\n got %s, %v\nwant %s", tc.inv, got, err, tc.want)
			continue
		}
		msg, invs, err := decodeBusMessage(got)
		want := tc.inv
		want.Reason = ""
		if err != nil || len(invs) != 1 || !reflect.DeepEqual(invs[0], want) || msg.From != "me" || msg.Reason != string(tc.inv.Reason) {
			t.Errorf("decode %s: got %+v from %q, %v; want %+v", got, invs, msg.From, err, want)
		}
	}
	if _, err := encodeBusMessage("me", tokencache.Invalidation{}); err == nil {
		t.Error("encoded an invalidation without a scope")
	}
	// A user's devices but some go to the peers as the whole user, which
	// every replica, old or new, reads.
	got, err := encodeBusMessage("me", tokencache.Invalidation{Scope: tokencache.ScopeDevicesExcept, UserID: "@a:x", Keep: []string{"K"}, Reason: "device"})
	if want := `{"v":1,"from":"me","scope":"user","user_id":"@a:x","reason":"device"}`; err != nil || got != want {
		t.Errorf("devices-except: got %s, %v; want %s", got, err, want)
	}
}

func TestBusBatchFormat(t *testing.T) {
	ids := []tokencache.TokenID{{0xde, 0xad, 0xbe, 0xef, 15: 0x01}, {15: 0x02}}
	got, err := encodeBatch("me", tokencache.ReasonUnknownToken, ids)
	want := `{"v":2,"from":"me","scope":"token","tokens":["deadbeef000000000000000000000001","00000000000000000000000000000002"],"reason":"unknown_token"}`
	if err != nil || got != want {
		t.Fatalf("encode:\n got %s, %v\nwant %s", got, err, want)
	}
	msg, invs, err := decodeBusMessage(got)
	if err != nil || msg.From != "me" || len(invs) != len(ids) {
		t.Fatalf("decode %s: %+v from %q, %v", got, invs, msg.From, err)
	}
	for i, inv := range invs {
		if want := (tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: ids[i]}); !reflect.DeepEqual(inv, want) {
			t.Errorf("invalidation %d: got %+v, want %+v", i, inv, want)
		}
	}
	// A full batch from a sender with the longest ID this code makes fits
	// in what receivers accept.
	full := make([]tokencache.TokenID, busPassiveBatch)
	for i := range full {
		full[i] = madeUpToken(i)
	}
	if p, err := encodeBatch(fmt.Sprintf("%016x", ^uint64(0)), tokencache.ReasonUnknownToken, full); err != nil {
		t.Errorf("a full batch: %v", err)
	} else if _, invs, err := decodeBusMessage(p); err != nil || len(invs) != busPassiveBatch {
		t.Errorf("a full batch of %d bytes decodes to %d invalidations, %v", len(p), len(invs), err)
	}
	if _, err := encodeBatch("me", tokencache.ReasonUnknownToken, nil); err == nil {
		t.Error("encoded an empty batch")
	}
	if _, err := encodeBatch("me", tokencache.ReasonUnknownToken, make([]tokencache.TokenID, 2*busPassiveBatch)); err == nil {
		t.Error("encoded a batch larger than receivers accept")
	}
}

// FuzzBusMessage: whatever arrives on the channel, decoding never panics,
// and what it accepts means the same after a round trip.
func FuzzBusMessage(f *testing.F) {
	f.Add(`{"v":1,"from":"a","scope":"token","token":"deadbeef000000000000000000000001","reason":"logout"}`)
	f.Add(`{"v":1,"from":"a","scope":"user","user_id":"@a:x","token":""}`)
	f.Add(`{"v":1,"from":"a","scope":"device","user_id":"@a:x","device_id":"D"}`)
	f.Add(`{"v":1,"from":"a","scope":"all"}`)
	f.Add(`{"v":2}`)
	f.Add(`{"v":2,"from":"a","scope":"token","tokens":["deadbeef000000000000000000000001","00000000000000000000000000000002"]}`)
	f.Add(`{"v":2,"from":"a","scope":"token","tokens":[]}`)
	f.Add(`null`)
	f.Fuzz(func(t *testing.T, payload string) {
		msg, invs, err := decodeBusMessage(payload)
		if err != nil {
			return
		}
		if len(invs) == 0 || len(invs) > busMaxMessage/32 {
			t.Fatalf("accepted %q as %d invalidations", payload, len(invs))
		}
		var again string
		if msg.V == busMessageV2 {
			ids := make([]tokencache.TokenID, len(invs))
			for i, inv := range invs {
				if inv.Scope != tokencache.ScopeToken {
					t.Fatalf("accepted %q as %+v", payload, inv)
				}
				ids[i] = inv.Token
			}
			again, err = encodeBatch(msg.From, tokencache.Reason(msg.Reason), ids)
		} else {
			if len(invs) != 1 {
				t.Fatalf("accepted %q (version %d) as %d invalidations", payload, msg.V, len(invs))
			}
			again, err = encodeBusMessage(msg.From, invs[0])
		}
		if len(again) > busMaxMessage {
			return // json.Marshal escapes what the sender may not have (<, >, &)
		}
		if err != nil {
			t.Fatalf("accepted %q but cannot encode %+v: %v", payload, invs, err)
		}
		_, invs2, err := decodeBusMessage(again)
		if err != nil || !reflect.DeepEqual(invs2, invs) {
			t.Fatalf("round trip of %q: %+v then %+v, %v", payload, invs, invs2, err)
		}
	})
}

// channelLog records every message published on the default channel, seen
// by a plain subscriber, until the test ends.
type channelLog struct {
	mu   sync.Mutex
	msgs []string
}

func watchChannel(t *testing.T, addr string) *channelLog {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr})
	ps := c.Subscribe(t.Context(), DefaultChannel)
	if _, err := ps.Receive(t.Context()); err != nil { // the confirmation
		t.Fatal(err)
	}
	l := &channelLog{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m := range ps.Channel() {
			l.mu.Lock()
			l.msgs = append(l.msgs, m.Payload)
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ps.Close()
		<-done
		c.Close()
	})
	return l
}

func (l *channelLog) messages() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.msgs...)
}

// countContaining returns how many messages contain s.
func (l *channelLog) countContaining(s string) int {
	n := 0
	for _, m := range l.messages() {
		if strings.Contains(m, s) {
			n++
		}
	}
	return n
}

// madeUpToken is the ID of the i-th token of a flood of made-up ones.
func madeUpToken(i int) tokencache.TokenID {
	var id tokencache.TokenID
	copy(id[:], "madeup")
	binary.BigEndian.PutUint64(id[8:], uint64(i))
	return id
}

// A flood of passive invalidations (a spray of made-up tokens, each
// answered 401) must never cost an explicit one: every logout reaches the
// peer as itself, with no flush needed.
func TestBusExplicitInvalidationsOutrunPassiveFlood(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	a := newBusNode(t, rs.URL(), time.Minute)
	b := newBusNode(t, rs.URL(), time.Minute)
	a.waitUp(t, true, 10*time.Second)
	b.waitUp(t, true, 10*time.Second)

	const explicit, flood = 40, 40_000
	var logouts []tokencache.Key
	for i := range explicit {
		k := b.h.Key(fmt.Sprintf("syt_RAWTOKEN_user%d_dev_Zq8XfA", i), tokencache.Masquerade{})
		b.fill(t, k, positive(fmt.Sprintf("@user%d:example.org", i), "DEV"))
		logouts = append(logouts, k)
	}
	bystander := b.h.Key(busTokens[3], tokencache.Masquerade{})
	b.fill(t, bystander, positive("@bob:example.org", "DEV1"))

	for i := range flood {
		a.c.InvalidateToken(madeUpToken(i), tokencache.ReasonUnknownToken)
		if i%(flood/explicit) == flood/explicit/2 {
			a.c.InvalidateToken(logouts[i/(flood/explicit)].Token, "logout")
		}
	}
	waitFor(t, 5*time.Second, "every logout applied on B", func() bool {
		for _, k := range logouts {
			if _, r := b.c.Get(k); r != tokencache.Miss {
				return false
			}
		}
		return true
	})
	// Each arrived as itself: B dropped exactly those, no flush.
	b.expect(t, bystander, tokencache.Hit)
	if got := b.drops.get(tokencache.ReasonBus); got != explicit {
		t.Errorf("B dropped %d entries for its peer, want %d", got, explicit)
	}
	if got := a.metric(t, mDropped, "queue_full"); got != 0 {
		t.Errorf("A lost %v explicit invalidations (queue_full)", got)
	}
	// The premise: the flood was more than the bus would carry.
	if got := a.metric(t, mDropped, "passive_overflow"); got == 0 {
		t.Errorf("the flood of %d passive invalidations never overflowed", flood)
	}
	if got := a.metric(t, mPublished); got >= flood/10 {
		t.Errorf("A published %v messages for %d invalidations: not batched", got, flood+explicit)
	}
}

// Explicit invalidations that do not fit in the queue are owed to the peers
// as a flush: a burst of them faster than Redis takes them costs the peers
// their caches, never a revocation.
func TestBusExplicitOverflowFlushesPeers(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	a := newBusNode(t, rs.URL(), time.Minute)
	b := newBusNode(t, rs.URL(), time.Minute)
	a.waitUp(t, true, 10*time.Second)
	b.waitUp(t, true, 10*time.Second)

	const revocations, burst = 50, 8 * busQueueSize
	var revoked []tokencache.Key
	for i := range revocations {
		k := b.h.Key(fmt.Sprintf("syt_RAWTOKEN_user%d_dev_Zq8XfA", i), tokencache.Masquerade{})
		b.fill(t, k, positive(fmt.Sprintf("@user%d:example.org", i), "DEV"))
		revoked = append(revoked, k)
	}
	bystander := b.h.Key(busTokens[3], tokencache.Masquerade{})
	b.fill(t, bystander, positive("@bob:example.org", "DEV1"))

	for i := range burst {
		a.c.InvalidateDevice(fmt.Sprintf("@nobody%d:example.org", i), "DEV", "device")
		if i%(burst/revocations) == burst/revocations/2 {
			a.c.InvalidateToken(revoked[i/(burst/revocations)].Token, "logout")
		}
	}
	waitFor(t, 5*time.Second, "B dropping every revoked token", func() bool {
		for _, k := range revoked {
			if _, r := b.c.Get(k); r != tokencache.Miss {
				return false
			}
		}
		return true
	})
	// The premise: the burst overflowed; and what made up for it was a flush.
	if got := a.metric(t, mDropped, "queue_full"); got == 0 {
		t.Fatalf("a burst of %d invalidations never overflowed the queue", burst)
	}
	b.expect(t, bystander, tokencache.Miss)
	if got := b.metric(t, mFlushes); got != 0 {
		t.Errorf("B counted %v flushes of its own, want 0 (it applied its peer's)", got)
	}
}

// Passive invalidations of one token waiting to be published are one.
func TestBusCoalescesPassiveInvalidations(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	ch := watchChannel(t, rs.addr)
	b := newBusNode(t, rs.URL(), time.Minute)
	b.waitUp(t, true, 10*time.Second)
	dead := b.h.Key(busTokens[0], tokencache.Masquerade{})
	b.fill(t, dead, positive("@alice:example.org", "DEV1"))

	a := newIdleBusNode(t, rs.URL(), time.Minute)
	const n = 500
	for range n {
		a.c.InvalidateToken(dead.Token, tokencache.ReasonUnknownToken)
	}
	a.run(t)
	waitFor(t, 5*time.Second, "B dropping the dead token", func() bool { _, r := b.c.Get(dead); return r == tokencache.Miss })
	// A counts a publish once PUBLISH returns; the watcher may see it later.
	hexID := fmt.Sprintf("%x", dead.Token[:])
	waitFor(t, time.Second, "the message seen", func() bool { return a.metric(t, mPublished) >= 1 && ch.countContaining(hexID) >= 1 })
	if got := a.metric(t, mPublished); got != 1 || a.bus.out.len() != 0 {
		t.Errorf("A published %v messages and has %d more to go, want 1 and none", got, a.bus.out.len())
	}
	if got := ch.countContaining(hexID); got != 1 {
		t.Errorf("%d passive invalidations of one token went out as %d messages, want 1:\n%s", n, got, strings.Join(ch.messages(), "\n"))
	}
}

// What waits when the bus is stopped (the proxy stops it once its last
// requests are answered) still goes out.
func TestBusPublishesWhatWaitsWhenStopped(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
	rs := startTestRedis(t)
	b := newBusNode(t, rs.URL(), time.Minute)
	b.waitUp(t, true, 10*time.Second)
	revoked := b.h.Key(busTokens[0], tokencache.Masquerade{})
	b.fill(t, revoked, positive("@alice:example.org", "DEV1"))

	a := newIdleBusNode(t, rs.URL(), time.Minute)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); a.bus.Run(ctx) }()
	a.waitUp(t, true, 10*time.Second)
	for i := range 200 {
		a.c.InvalidateDevice(fmt.Sprintf("@nobody%d:example.org", i), "DEV", "device")
	}
	a.c.InvalidateToken(revoked.Token, "logout")
	cancel()
	<-done
	waitFor(t, 5*time.Second, "B dropping the token revoked last", func() bool { _, r := b.c.Get(revoked); return r == tokencache.Miss })
	if got := a.metric(t, mPublished); got != 201 {
		t.Errorf("A published %v messages, want 201", got)
	}
}
