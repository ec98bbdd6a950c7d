package proxy

// Measurements behind `make bench` (deploy/local/bench.sh) that need the
// proxy's own internals or its production construction:
//
//   - BenchmarkPassthrough: a non-whoami request through ServeHTTP and the
//     ReverseProxy to a loopback homeserver, next to the same request sent
//     straight with the Transport, so the difference is what proxying adds;
//   - TestHeapPerTokenProduction (HEAP_TOKENS=1000000): heap per cached token,
//     filled through the production path (ServeHTTP → resolve →
//     upstream.Client.Whoami → answerFor → tokencache fill);
//   - TestServeForProfile (BENCH_SERVE_ADDR=…): the proxy built as
//     cmd/matrix-auth-proxy builds it, served for a while under an external
//     load generator, writing a CPU profile.
//
// The last two skip unless asked: they are measurements, not checks.

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// benchBody is the passthrough answer: about 1 KiB of JSON, a typical
// small Client-Server API response.
var benchBody = []byte(`{"global":{"content":[],"override":[{"actions":["dont_notify"],"conditions":[],"default":true,"enabled":false,"rule_id":".m.rule.master"},{"actions":["dont_notify"],"conditions":[{"key":"content.msgtype","kind":"event_match","pattern":"m.notice"}],"default":true,"enabled":true,"rule_id":".m.rule.suppress_notices"},{"actions":["notify",{"set_tweak":"sound","value":"default"},{"set_tweak":"highlight","value":false}],"conditions":[{"key":"type","kind":"event_match","pattern":"m.room.member"},{"key":"content.membership","kind":"event_match","pattern":"invite"}],"default":true,"enabled":true,"rule_id":".m.rule.invite_for_me"}],"room":[],"sender":[],"underride":[{"actions":["notify",{"set_tweak":"sound","value":"ring"},{"set_tweak":"highlight","value":false}],"conditions":[{"key":"type","kind":"event_match","pattern":"m.call.invite"}],"default":true,"enabled":true,"rule_id":".m.rule.call"}]}}`)

// synapseHeader is what Synapse sends with a client API answer.
func synapseHeader(h http.Header) {
	h["Content-Type"] = []string{"application/json"}
	h["Cache-Control"] = []string{"no-cache, no-store, must-revalidate"}
	h["Access-Control-Allow-Origin"] = []string{"*"}
	h["Access-Control-Allow-Methods"] = []string{"GET, HEAD, POST, PUT, DELETE, OPTIONS"}
	h["Access-Control-Allow-Headers"] = []string{"X-Requested-With, Content-Type, Authorization, Date"}
	h["Access-Control-Expose-Headers"] = []string{"Synapse-Trace-Id, Server"}
	h["Synapse-Trace-Id"] = []string{strconv.FormatInt(time.Now().UnixNano(), 16)}
	h["Server"] = []string{"Synapse/1.120.0"}
}

// BenchmarkPassthrough is a GET of ~1 KiB through ServeHTTP and the
// forward path to a homeserver on loopback ("proxied"; "proxied-rp" forces
// the ReverseProxy that forward stands in for), and the same request
// sent straight with the proxy's Transport ("direct", the floor). Both
// include the homeserver's own work, which runs in this process too; the
// difference is the proxy's. Profile with
//
//	go test -run XXX -bench Passthrough -benchmem -memprofile mem.out -cpuprofile cpu.out ./proxy/
func BenchmarkPassthrough(b *testing.B) {
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		synapseHeader(w.Header())
		_, _ = w.Write(benchBody)
	}))
	b.Cleanup(hs.Close)
	const path = "/_matrix/client/v3/pushrules/"
	for _, viaRP := range []bool{false, true} {
		name := "proxied" // forward.go, as ServeHTTP chooses
		if viaRP {
			name = "proxied-rp" // the ReverseProxy forward replaces
		}
		b.Run(name, func(b *testing.B) {
			transport := upstream.NewTransport(time.Second)
			b.Cleanup(transport.CloseIdleConnections)
			p, err := New(Config{Upstream: mustParseURL(b, hs.URL), Transport: transport,
				Cache:      tokencache.Config{Size: 1000, TTL: time.Minute, LookupTimeout: time.Second},
				Registerer: prometheus.NewRegistry()})
			if err != nil {
				b.Fatal(err)
			}
			if viaRP {
				p.direct = nil
			}
			req := httptest.NewRequest("GET", path, nil)
			req.RemoteAddr = "192.0.2.1:5000"
			req.Header.Set("Authorization", "Bearer syt_YWxpY2U_abcdefghijklmnopqrst_0A1B2C")
			req.Header.Set("User-Agent", "Element/1.0")
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				clear(w.h)
				p.ServeHTTP(w, req)
			}
			if w.code != 200 {
				b.Fatalf("got %d", w.code)
			}
		})
	}
	b.Run("direct", func(b *testing.B) {
		transport := upstream.NewTransport(time.Second)
		b.Cleanup(transport.CloseIdleConnections)
		b.ReportAllocs()
		for b.Loop() {
			req, _ := http.NewRequest("GET", hs.URL+path, nil)
			req.Header.Set("Authorization", "Bearer syt_YWxpY2U_abcdefghijklmnopqrst_0A1B2C")
			resp, err := transport.RoundTrip(req)
			if err != nil {
				b.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}

// synapseStub answers whoami lookups the way Synapse does, without a
// network: a fresh header map and body per answer, as http.Transport would
// hand them over. Tokens are heapToken(n); token n belongs to user n mod
// users, on its own device.
type synapseStub struct{ users int }

func (s synapseStub) RoundTrip(r *http.Request) (*http.Response, error) {
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	parts := strings.Split(tok, "_")
	if len(parts) != 4 {
		return nil, fmt.Errorf("stub: bad token %q", tok)
	}
	n, err := strconv.Atoi(parts[2])
	if err != nil {
		return nil, err
	}
	body := fmt.Appendf(nil, `{"user_id":"@user%07d:example.org","is_guest":false,"device_id":"%s"}`, n%s.users, synapseDeviceID(n))
	h := http.Header{}
	synapseHeader(h)
	h["Date"] = []string{time.Now().UTC().Format(http.TimeFormat)}
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	return &http.Response{StatusCode: 200, Status: "200 OK", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Body: io.NopCloser(bytes.NewReader(body)), ContentLength: int64(len(body)), Request: r}, nil
}

// synapseDeviceID is a device ID as Synapse makes them: ten capital letters.
func synapseDeviceID(n int) string {
	var b [10]byte
	for i := range b {
		b[len(b)-1-i] = 'A' + byte(n%26)
		n /= 26
	}
	return string(b[:])
}

// heapToken is an access token shaped like Synapse's:
// syt_<base64 localpart>_<20 random characters>_<6-character checksum>. The
// "random" part carries n, for the stub.
func heapToken(n, users int) string {
	local := base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "user%07d", n%users))
	return fmt.Sprintf("syt_%s_%020d_%06X", local, n, n&0xffffff)
}

func envInt(tb testing.TB, name string, def int) int {
	tb.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		tb.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// TestHeapPerTokenProduction reports the heap one cached token costs,
// everything included (key, stored answer, per-user index, LRU bookkeeping),
// filled through the production path: a whoami miss through ServeHTTP, the
// lookup through upstream.Client and a Transport (a stub handing over what
// Synapse sends), answerFor, and the cache's fill. Heap after minus before,
// after a GC, divided by tokens:
//
//	HEAP_TOKENS=1000000 HEAP_USERS=300000 go test -count=1 -run HeapPerTokenProduction -v ./proxy/
//
// HEAP_PROFILE=file also writes a heap profile (one sample per 512 bytes)
// while the cache is still full.
func TestHeapPerTokenProduction(t *testing.T) {
	if os.Getenv("HEAP_TOKENS") == "" {
		t.Skip("a measurement: set HEAP_TOKENS (make bench runs it at 1,000,000)")
	}
	n := envInt(t, "HEAP_TOKENS", 1)
	users := envInt(t, "HEAP_USERS", max(n*3/10, 1))
	if prof := os.Getenv("HEAP_PROFILE"); prof != "" {
		defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
		runtime.MemProfileRate = 512
	}
	// Size n+1: the warm-up token is held too. (The cache evicts per
	// shard, an approximate LRU: with Size n, the one eviction could take
	// any of the first tokens of the evicting shard, token 0 among them.)
	p, err := New(Config{Upstream: mustParseURL(t, "http://synapse.invalid:8008"), Transport: synapseStub{users},
		Cache:  tokencache.Config{Size: n + 1, TTL: time.Hour, NegativeTTL: 10 * time.Second, LookupTimeout: 10 * time.Second},
		Logger: zap.NewNop(), Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("GET", whoamiV3, nil)
	req.RemoteAddr = "192.0.2.1:5000"
	req.Header.Set("User-Agent", "Element/1.0")
	w := &discardWriter{h: http.Header{}}
	ask := func(i int) {
		req.Header["Authorization"] = []string{"Bearer " + heapToken(i, users)}
		clear(w.h)
		w.code = 0
		p.ServeHTTP(w, req)
		if w.code != 200 {
			t.Fatalf("token %d: %d", i, w.code)
		}
	}
	ask(n) // one entry outside the count: the pools, interner and metrics are warm
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	for i := range n {
		ask(i)
	}
	filled := time.Since(start)
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	if got := p.Cache().Len(); got != n+1 {
		t.Fatalf("cache holds %d, want %d", got, n)
	}
	if prof := os.Getenv("HEAP_PROFILE"); prof != "" {
		f, err := os.Create(prof)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	// Every token is still held: asking again is a hit, not a lookup.
	for _, i := range []int{0, n / 2, n - 1} {
		if _, r := p.Cache().Get(p.hasher.Key(heapToken(i, users), tokencache.Masquerade{})); r != tokencache.Hit {
			t.Fatalf("token %d: %v", i, r)
		}
	}
	t.Logf("%d tokens over %d users, filled in %v (%.1f µs each)", n, users, filled.Round(time.Millisecond),
		float64(filled.Microseconds())/float64(n))
	t.Logf("heap per token: %.0f bytes (HeapAlloc %d → %d; objects %+d)", float64(after.HeapAlloc-before.HeapAlloc)/float64(n),
		before.HeapAlloc, after.HeapAlloc, int64(after.HeapObjects)-int64(before.HeapObjects))
	runtime.KeepAlive(p)
}

// TestServeForProfile serves the proxy as cmd/matrix-auth-proxy builds it
// (same Transport, cache, server settings; no rate limiting) on
// BENCH_SERVE_ADDR for BENCH_SERVE_SECONDS in front of BENCH_SERVE_UPSTREAM,
// writing a CPU profile of that time to BENCH_SERVE_CPUPROFILE, for an
// external load generator to drive (make bench does, with wrk, when a
// throughput goal is missed):
//
//	go test -c -o proxy.test ./proxy/
//	BENCH_SERVE_ADDR=127.0.0.1:8088 BENCH_SERVE_UPSTREAM=http://127.0.0.1:8008 \
//	  BENCH_SERVE_CPUPROFILE=cpu.out GOMAXPROCS=1 taskset -c 0 ./proxy.test -test.run ServeForProfile
func TestServeForProfile(t *testing.T) {
	addr := os.Getenv("BENCH_SERVE_ADDR")
	if addr == "" {
		t.Skip("a profiling harness: set BENCH_SERVE_ADDR")
	}
	secs := envInt(t, "BENCH_SERVE_SECONDS", 15)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	transport := upstream.NewTransport(10 * time.Second)
	defer transport.CloseIdleConnections()
	p, err := New(Config{Upstream: mustParseURL(t, os.Getenv("BENCH_SERVE_UPSTREAM")), Transport: transport,
		Cache:  tokencache.Config{Size: 100000, TTL: time.Hour, NegativeTTL: 10 * time.Second, LookupTimeout: 10 * time.Second},
		Logger: zap.NewNop(), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		DisableGeneralOptionsHandler: true}
	if prof := os.Getenv("BENCH_SERVE_CPUPROFILE"); prof != "" {
		f, err := os.Create(prof)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if prof := os.Getenv("BENCH_SERVE_MEMPROFILE"); prof != "" {
		defer func() {
			f, err := os.Create(prof)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			_ = pprof.Lookup("allocs").WriteTo(f, 0)
		}()
	}
	go func() {
		time.Sleep(time.Duration(secs) * time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		t.Fatal(err)
	}
}
