package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache/bus"
)

// coherenceRedis is the Redis the replicas of a rig share; nil: no bus.
type coherenceRedis struct {
	url string
}

// attachBus wires a bus into a replica's config when the rig has Redis; the
// returned function completes the wiring once the proxy exists.
func (r *coherenceRig) attachBus(tb testing.TB, cfg *Config, reg *prometheus.Registry, rep *coherenceReplica) func(*Proxy) {
	if r.redis == nil {
		return func(*Proxy) {}
	}
	var b atomic.Pointer[bus.Bus]
	cfg.Cache.OnInvalidate = func(inv tokencache.Invalidation) {
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
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { x.Run(ctx) })
		rep.stopBus = func() { cancel(); wg.Wait() }
	}
}
