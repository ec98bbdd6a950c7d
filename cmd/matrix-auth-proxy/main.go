// Command matrix-auth-proxy is a sidecar in front of a Matrix homeserver: it
// answers GET /account/whoami from a token cache and forwards everything else.
// This file only wires: configuration, logger, registry, listeners, shutdown.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/proxy"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/proxy/fastlane"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache/bus"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// version is stamped at build time with -ldflags "-X main.version=…".
var version = "dev"

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitConfig = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	go func() {
		// After the first signal, restore the default action: a second
		// Ctrl-C or SIGTERM ends the process at once.
		<-ctx.Done()
		stop()
	}()
	os.Exit(run(ctx, environ(), os.Stderr))
}

func environ() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

// run serves until ctx is done (SIGTERM or SIGINT), then shuts down
// gracefully, and returns the exit code. Logs go to logOut.
func run(ctx context.Context, env map[string]string, logOut io.Writer) int {
	cfg, err := loadConfig(env)
	if err != nil {
		fmt.Fprintf(logOut, "matrix-auth-proxy: invalid configuration: %v\n", err)
		return exitConfig
	}
	log := newLogger(cfg, logOut)
	defer func() { _ = log.Sync() }()
	if pct, ok := gcPercent(env); ok {
		debug.SetGCPercent(pct)
	}
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("stopped", zap.Error(err))
		return exitFailed
	}
	return exitOK
}

// gcPercent is the GC pacing the proxy sets for itself, if any: GOGC=400
// when the operator bounded the heap with GOMEMLIMIT (the manifests in
// deploy/ do) and chose no GOGC. A passthrough allocates about 7 KiB
// that die with the request, while the live heap is mostly the token
// cache; at Go's default of 100 the GC ran every few thousand requests
// and took about 5% of a passthrough's CPU (make bench, issue 15). The
// heap may now grow to five times what is live between collections, but
// never past GOMEMLIMIT, near which the GC runs as often as it must.
// Without GOMEMLIMIT nothing bounds that growth, so Go's default stays.
func gcPercent(env map[string]string) (int, bool) {
	if env["GOGC"] != "" || env["GOMEMLIMIT"] == "" || env["GOMEMLIMIT"] == "off" {
		return 0, false
	}
	return 400, true
}

func newLogger(cfg Config, out io.Writer) *zap.Logger {
	ec := zap.NewProductionEncoderConfig()
	ec.EncodeTime = zapcore.ISO8601TimeEncoder
	enc := zapcore.NewJSONEncoder(ec)
	if cfg.LogFormat == "console" {
		enc = zapcore.NewConsoleEncoder(ec)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(out)), cfg.level))
}

func serve(ctx context.Context, cfg Config, log *zap.Logger) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	transport := upstream.NewTransport(cfg.UpstreamTimeout)
	defer transport.CloseIdleConnections()
	client, err := upstream.New(cfg.upstream, transport)
	if err != nil {
		return err
	}
	var hashKey []byte // nil: a random key, right for a single replica
	if cfg.TokenHashKey != "" {
		hashKey = []byte(cfg.TokenHashKey)
	}
	hasher, err := tokencache.NewHasher(hashKey)
	if err != nil {
		return err
	}
	// With REDIS_URL, every invalidation is shared with the other replicas.
	// invBus is set before anything is served, so the hook can read it freely.
	var invBus *bus.Bus
	publish := func(inv tokencache.Invalidation) {
		if invBus != nil {
			invBus.Publish(inv)
		}
	}
	var introspector proxy.Introspector
	if cfg.masURL != nil {
		in, err := upstream.NewIntrospector(cfg.masURL, cfg.masSecret, transport, nil)
		if err != nil {
			return fmt.Errorf("MAS_INTROSPECTION_URL: %w", err)
		}
		introspector = in
	}
	p, err := proxy.New(proxy.Config{
		Upstream:  cfg.upstream,
		Transport: transport,
		Hasher:    hasher,
		Cache: tokencache.Config{
			Size:          cfg.CacheSize,
			TTL:           cfg.CacheTTL,
			NegativeTTL:   cfg.CacheNegativeTTL,
			LookupTimeout: cfg.UpstreamTimeout,
			OnInvalidate:  publish,
		},
		Logger:          log,
		Registerer:      reg,
		TrustedProxies:  cfg.trusted,
		RevokeTimeout:   cfg.RevokeTimeout,
		BodyReadTimeout: cfg.BodyReadTimeout,
		RateLimit: proxy.RateLimitConfig{
			RPS:         cfg.RateLimitRPS,
			Burst:       cfg.RateLimitBurst,
			ExemptUsers: cfg.exemptUsers,
			ExemptCIDRs: cfg.exemptCIDRs,
		},
		ServerName:   cfg.ServerName,
		MASSecret:    cfg.masSecret,
		Introspector: introspector,
	})
	if err != nil {
		return err
	}

	if cfg.RedisURL != "" {
		invBus, err = bus.New(bus.Config{
			URL:        cfg.RedisURL,
			Password:   cfg.RedisPassword,
			Channel:    cfg.RedisChannel,
			DownTTL:    cfg.RedisDownCacheTTL,
			Logger:     log.Named("bus"),
			Registerer: reg,
		}, p.Cache())
		if err != nil {
			return fmt.Errorf("REDIS_URL: %w", err)
		}
	}

	clientLn, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("LISTEN_ADDR: %w", err)
	}
	adminLn, err := net.Listen("tcp", cfg.AdminAddr)
	if err != nil {
		clientLn.Close()
		return fmt.Errorf("ADMIN_ADDR: %w", err)
	}

	// The forward-auth endpoint gets a listener of its own (AUTH_ADDR),
	// which only the ingress should reach; empty: off.
	var authLn net.Listener
	if cfg.AuthAddr != "" {
		if authLn, err = net.Listen("tcp", cfg.AuthAddr); err != nil {
			clientLn.Close()
			adminLn.Close()
			return fmt.Errorf("AUTH_ADDR: %w", err)
		}
	}

	probe := upstream.NewProbe(client, cfg.ReadinessInterval, cfg.UpstreamTimeout)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "matrix_auth_proxy", Name: "upstream_ready",
		Help: "1 while the homeserver answers /_matrix/client/versions (what /readyz reports, shutdown aside), else 0.",
	}, func() float64 {
		if probe.Ready() {
			return 1
		}
		return 0
	}))
	var draining atomic.Bool
	clientSrv := &http.Server{
		Handler: p,
		// No ReadTimeout or WriteTimeout: media uploads and downloads can
		// take long, and /sync long-polls hold the response for minutes.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// Let the homeserver answer "OPTIONS *" like any other request.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     zap.NewStdLog(log.Named("http")),
	}
	adminSrv := &http.Server{
		Handler:           adminMux(reg, probe, &draining),
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      30 * time.Second,
		ErrorLog:          zap.NewStdLog(log.Named("admin")),
	}

	// The client and auth listeners serve their common requests (a GET or
	// HEAD without a body) on the fast lane, everything else with net/http
	// (proxy/fastlane). The admin listener is net/http's alone.
	clientFast := fastlane.New(clientSrv)
	servers := []struct {
		srv server
		ln  net.Listener
	}{{clientFast, clientLn}, {adminSrv, adminLn}}
	var auth *fastlane.Server
	if authLn != nil {
		authSrv := &http.Server{
			Handler:           p.ForwardAuth(),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			// "OPTIONS *" is no auth request: not net/http's 200 either.
			DisableGeneralOptionsHandler: true,
			ErrorLog:                     zap.NewStdLog(log.Named("auth")),
		}
		auth = fastlane.New(authSrv)
		servers = append(servers, struct {
			srv server
			ln  net.Listener
		}{auth, authLn})
	}

	// The probe and the bus run until the client listener has drained.
	bgCtx, stopBackground := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { probe.Run(bgCtx) })
	if invBus != nil {
		wg.Go(func() { invBus.Run(bgCtx) })
	}
	errc := make(chan error, len(servers))
	for _, s := range servers {
		wg.Go(func() {
			if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		})
	}
	authAddr := "off"
	if authLn != nil {
		authAddr = authLn.Addr().String()
	}
	log.Info("started", zap.String("version", version), zap.String("listen", clientLn.Addr().String()),
		zap.String("admin", adminLn.Addr().String()), zap.String("auth", authAddr), zap.String("upstream", cfg.upstream.Redacted()))

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}

	// Fail /readyz first and keep serving for SHUTDOWN_DELAY, so Kubernetes
	// takes the pod out of its Service before connections are refused.
	draining.Store(true)
	if serveErr == nil {
		log.Info("shutting down: /readyz now fails", zap.Duration("delay", cfg.ShutdownDelay))
		time.Sleep(cfg.ShutdownDelay)
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	var drain sync.WaitGroup
	for _, srv := range []*fastlane.Server{clientFast, auth} {
		if srv == nil {
			continue
		}
		drain.Go(func() {
			if err := srv.Shutdown(shutCtx); err != nil {
				log.Warn("in-flight requests cut at SHUTDOWN_TIMEOUT", zap.Error(err))
				srv.Close()
			}
		})
	}
	drain.Wait()
	stopBackground()
	adminCtx, cancelAdmin := context.WithTimeout(context.Background(), time.Second)
	defer cancelAdmin()
	if err := adminSrv.Shutdown(adminCtx); err != nil {
		adminSrv.Close()
	}
	wg.Wait()
	log.Info("stopped")
	return serveErr
}

// server is what both an http.Server and a fastlane.Server do.
type server interface {
	Serve(net.Listener) error
}

func adminMux(reg *prometheus.Registry, probe *upstream.Probe, draining *atomic.Bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case draining.Load():
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
		case !probe.Ready():
			http.Error(w, "homeserver not answering /_matrix/client/versions", http.StatusServiceUnavailable)
		default:
			_, _ = io.WriteString(w, "ok\n")
		}
	})
	mux.Handle("GET /metrics", promhttp.InstrumentMetricHandler(reg, promhttp.HandlerFor(reg, promhttp.HandlerOpts{})))
	return mux
}
