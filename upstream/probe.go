package upstream

import (
	"context"
	"sync"
	"time"
)

// Probe keeps asking the homeserver for /_matrix/client/versions and says
// whether it answered recently. It backs the proxy's /readyz.
type Probe struct {
	client   *Client
	interval time.Duration
	timeout  time.Duration
	now      func() time.Time

	mu     sync.Mutex
	lastOK time.Time
	failed bool
}

// NewProbe returns a Probe that asks every interval, each try bounded by
// timeout. Call Run to start it.
func NewProbe(c *Client, interval, timeout time.Duration) *Probe {
	return &Probe{client: c, interval: interval, timeout: timeout, now: time.Now}
}

// Run probes until ctx is done.
func (p *Probe) Run(ctx context.Context) {
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		p.Check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Check probes once.
func (p *Probe) Check(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	err := p.client.Versions(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failed = err != nil
	if err == nil {
		p.lastOK = p.now()
	}
}

// Ready reports whether the last probe succeeded and is recent: no older than
// two intervals plus one timeout, so a probe that hangs cannot keep a stale
// success alive.
func (p *Probe) Ready() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.failed && !p.lastOK.IsZero() && p.now().Sub(p.lastOK) <= 2*p.interval+p.timeout
}
