package proxy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache/bus"
)

// coherenceRedis is a redis-server process the replicas of a rig share;
// nil: no bus.
type coherenceRedis struct {
	url, addr string
	cmd       *exec.Cmd
	done      chan struct{}
}

// startCoherenceRedis starts a redis-server on a free 127.0.0.1 port for
// the test; without redis-server the test skips, unless E2E_REQUIRED=1.
func startCoherenceRedis(t *testing.T) *coherenceRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("E2E_REQUIRED") == "1" {
			t.Fatalf("E2E_REQUIRED=1 but redis-server is not on PATH")
		}
		t.Skip("redis-server not on PATH; set E2E_REQUIRED=1 to make this a failure")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	r := &coherenceRedis{url: "redis://" + addr, addr: addr}
	r.start(t)
	t.Cleanup(r.kill)
	return r
}

func (r *coherenceRedis) start(tb testing.TB) {
	tb.Helper()
	_, port, _ := net.SplitHostPort(r.addr)
	r.cmd = exec.Command("redis-server", "--save", "", "--appendonly", "no", "--port", port, "--bind", "127.0.0.1")
	if err := r.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	r.done = make(chan struct{})
	cmd, done := r.cmd, r.done
	go func() { _ = cmd.Wait(); close(done) }()
	for try := 0; ; try++ {
		if c, err := net.DialTimeout("tcp", r.addr, time.Second); err == nil {
			c.Close()
			return
		}
		if try == 1000 {
			tb.Fatalf("redis-server on %s does not answer", r.addr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill kills the server it started (by its process, SIGKILL) and waits.
func (r *coherenceRedis) kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// bounce: Redis goes away, every bus notices, Redis comes back, every bus
// is up again (and has flushed its cache).
func (r *coherenceRedis) bounce(tb testing.TB, rig *coherenceRig) {
	tb.Helper()
	r.kill()
	rig.waitBusesState(tb, false)
	r.start(tb)
	rig.waitBuses(tb)
	// What was on its way when Redis went is lost (the buses flushed
	// their caches for it): count from here.
	for i := range rig.replicas {
		rig.rebase(tb, i)
	}
}

// attachBus wires a bus into a replica's config when the rig has Redis; the
// returned function completes the wiring once the proxy exists.
func (r *coherenceRig) attachBus(tb testing.TB, cfg *Config, reg *prometheus.Registry, rep *coherenceReplica) func(*Proxy) {
	if r.redis == nil {
		return func(*Proxy) {}
	}
	var b atomic.Pointer[bus.Bus]
	cfg.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
		if inv.Scope != tokencache.ScopeToken || inv.Reason != tokencache.ReasonUnknownToken {
			rep.explicit.Add(1) // one message each (bus.Config's doc)
		}
		if x := b.Load(); x != nil {
			x.Publish(inv)
		}
	}
	return func(p *Proxy) {
		x, err := bus.New(bus.Config{URL: r.redis.url, Registerer: reg}, p.Cache())
		if err != nil {
			tb.Fatal(err)
		}
		b.Store(x)
		rep.busUp = x.Up
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { x.Run(ctx) })
		rep.stopBus = func() { cancel(); wg.Wait() }
	}
}

// waitBuses waits until every replica's bus is up (a quiescent point).
func (r *coherenceRig) waitBuses(tb testing.TB) { r.waitBusesState(tb, true) }

func (r *coherenceRig) waitBusesState(tb testing.TB, up bool) {
	tb.Helper()
	for _, rep := range r.replicas {
		for try := 0; rep.busUp != nil && rep.busUp() != up; try++ {
			if try == 3000 {
				tb.Fatalf("bus up=%v: never", up)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// runCoherenceReplicas runs ops with two replicas sharing a Redis bus.
func runCoherenceReplicas(t *testing.T, ops []modelOp) error {
	t.Helper()
	return runCoherenceOn(t, startCoherenceRedis(t), ops)
}

func runCoherenceOn(tb testing.TB, redis *coherenceRedis, ops []modelOp) error {
	tb.Helper()
	r := newCoherenceRigN(tb, 2, redis)
	defer r.close()
	return r.run(tb, ops)
}

// randomOps draws a sequence: logins first, then any operation through
// either replica (Redis bounces are rarer: each takes a reconnection).
func randomOps(rng *rand.Rand, n int) []modelOp {
	ops := make([]modelOp, 0, n)
	for i := range n {
		k := opKind(rng.IntN(int(numOps)))
		if i < 4 || rng.IntN(5) == 0 {
			k = opLogin
		}
		if k == opRedisBounce && rng.IntN(4) != 0 {
			k = opWhoami
		}
		if rng.IntN(2) == 0 {
			k |= opVia2
		}
		ops = append(ops, modelOp{k, uint8(rng.UintN(256)), uint8(rng.UintN(256))})
	}
	return ops
}

// TestCoherenceReplicas is the seeded-random driver: sequences through two
// replicas sharing a real Redis. In go test it runs a few sequences
// (one, a bounded count); COHERENCE_DURATION=10m (make check-coherence) runs
// sequences for that long, COHERENCE_SEED=n replays a seed.
func TestCoherenceReplicas(t *testing.T) {
	t.Parallel()
	redis := startCoherenceRedis(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("COHERENCE_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	var until time.Time
	if d := os.Getenv("COHERENCE_DURATION"); d != "" {
		dur, err := time.ParseDuration(d)
		if err != nil {
			t.Fatal(err)
		}
		until = time.Now().Add(dur)
	}
	t.Logf("COHERENCE_SEED=%d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	for seq := 0; seq < 1 || time.Now().Before(until); seq++ {
		ops := randomOps(rng, 30)
		if err := runCoherenceOn(t, redis, ops); err != nil {
			shrunk, serr := shrinkOps(ops, 40, func(ops []modelOp) error { return runCoherenceOn(t, redis, ops) })
			if serr == nil {
				serr = fmt.Errorf("did not fail again when re-run (timing-dependent): %w", err)
			}
			t.Fatalf("COHERENCE_SEED=%d, sequence %d: %v\nshortest failing sequence found, as a test:\n\n%s",
				seed, seq, err, regressionTest(shrunk, serr, "runCoherenceReplicas"))
		}
	}
}

// busCount reads a bus counter of replica i.
func (r *coherenceRig) busCount(tb testing.TB, i int, name string) float64 {
	tb.Helper()
	mfs, err := r.replicas[i].reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "matrix_auth_proxy_bus_"+name {
			var sum float64
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
			return sum
		}
	}
	return 0
}

// quiesce waits, a bounded number of times, until every replica applied
// every message the others published (counted since the rig started, so
// that no baseline can be caught between a delivery and its count) and
// the published counts held still for a few polls (a message still in an
// outbox is not counted yet): a quiescent point.
func (r *coherenceRig) quiesce(tb testing.TB) error {
	tb.Helper()
	if r.redis == nil {
		return nil
	}
	stable, last := 0, -1.0
	for try := 0; ; try++ {
		var total float64
		done := true
		for i := range r.replicas {
			total += r.cumPublished(tb, i)
			// Every explicit revocation handed to the bus is published
			// (passive ones are batched: the stable polls cover them).
			if r.busCount(tb, i, "messages_published_total") < float64(r.replicas[i].explicit.Load()) {
				done = false
			}
		}
		for i := range r.replicas {
			var want float64
			for k := range r.replicas {
				if k != i {
					want += r.cumPublished(tb, k) - r.replicas[i].startPub[k]
				}
			}
			if r.busCount(tb, i, "messages_applied_total")-r.replicas[i].appliedBase < want {
				done = false
			}
		}
		if done && total == last {
			stable++
		} else {
			stable = 0
		}
		last = total
		// Longer than the bus spaces passive batches (20ms).
		if stable == 6 {
			return nil
		}
		if try == 1000 {
			return fmt.Errorf("the bus did not carry every message to every replica")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// cumPublished is what replica k published since the rig started, over
// its restarts.
func (r *coherenceRig) cumPublished(tb testing.TB, k int) float64 {
	return r.pubOff[k] + r.busCount(tb, k, "messages_published_total")
}

// rebase records, for a replica that just (re)started, what the others
// had published: it cannot have received that.
func (r *coherenceRig) rebase(tb testing.TB, i int) {
	tb.Helper()
	r.replicas[i].appliedBase = r.busCount(tb, i, "messages_applied_total")
	r.replicas[i].startPub = make([]float64, len(r.replicas))
	for k := range r.replicas {
		if r.replicas[k] != nil {
			r.replicas[i].startPub[k] = r.cumPublished(tb, k)
		}
	}
}

// A dead token asked about through two replicas in turn costs the
// homeserver one lookup per replica, as it costs one on a single replica:
// each lookup's 401 publishes a passive invalidation of the token, which
// must drop the peer's positive answers for it but not its negative one
// (tokencache.Scope). The bus is let settle after every request, so each
// replica has applied what the other published before it is asked.
func TestCoherenceDeadTokenStaysNegativeAcrossReplicas(t *testing.T) {
	t.Parallel()
	r := newCoherenceRigN(t, 2, startCoherenceRedis(t))
	defer r.close()
	const dead, asks = "syt_never_issued", 20
	for i := range asks {
		status, body, err := r.doVia(i%2, "GET", "/_matrix/client/v3/account/whoami", dead, "")
		if err != nil {
			t.Fatal(err)
		}
		if status != 401 || !strings.Contains(body, "M_UNKNOWN_TOKEN") {
			t.Fatalf("whoami %d: %d %s", i, status, body)
		}
		if err := r.quiesce(t); err != nil {
			t.Fatal(err)
		}
	}
	// Each replica published its own lookup's invalidation: the bus did
	// carry them, and they dropped nothing the replicas still needed.
	if got := r.hs.whoamiCount(dead); got != len(r.replicas) {
		t.Errorf("homeserver lookups for %d whoamis through %d replicas: %d, want one per replica",
			asks, len(r.replicas), got)
	}
	for i := range r.replicas {
		if n := r.busCount(t, i, "messages_applied_total"); n < 1 {
			t.Errorf("replica %d applied %v messages: the peer's invalidation never arrived", i, n)
		}
	}
}
