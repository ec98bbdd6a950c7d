// Package bus shares a token cache's invalidations between replicas of the
// proxy over Redis pub/sub.
//
// It talks to the cache (package tokencache) only through the methods any
// caller uses (Apply, SetMaxTTL, Len) and is fed through the cache's
// OnInvalidate hook; the cache itself knows nothing about the network.
package bus

// Redis is never on the request path: Publish only enqueues (outbox.go says
// in what order things leave, and what is done when too much waits), and a
// Bus that cannot reach Redis leaves the cache serving, with shorter
// lifetimes (DownTTL) and a flush once it is back, since it may have missed
// invalidations in between. Pub/sub delivers at most once and only to
// subscribers connected at that moment; the flush after every gap is what
// makes that enough.
//
// What goes over the wire is an Invalidation: a TokenID (a keyed hash, only
// meaningful to replicas sharing the hash key) and Matrix IDs, never a token.

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// DefaultChannel is the pub/sub channel of a Config without one.
const DefaultChannel = "matrix-auth-proxy:invalidate"

const (
	// busQueueSize bounds the explicit revocations waiting to be
	// published; busPassiveQueueSize the passive invalidations.
	busQueueSize        = 1024
	busPassiveQueueSize = 2048
	// busPassiveBatch is the most passive invalidations in one message,
	// and busPassiveInterval the least time between two such messages.
	// Together they bound what a flood of made-up tokens costs Redis (at
	// most 50 messages a second) and how many passive invalidations get
	// through (5,000 a second; more are dropped).
	busPassiveBatch    = 100
	busPassiveInterval = 20 * time.Millisecond
	// busMaxMessage bounds what is decoded; a message of one invalidation
	// is ~200 bytes, a full passive batch ~3,600.
	busMaxMessage = 4096
	// busOpTimeout bounds dialing, a publish, and the wait for the
	// subscription's confirmation.
	busOpTimeout = 2 * time.Second
	// busHealthInterval is how long the subscription may stay silent
	// before it is pinged; a ping unanswered for as long again means the
	// link is gone. A killed Redis closes the socket and is noticed at once;
	// this catches a silent one (a partition) within two intervals.
	busHealthInterval = time.Second
	busMinBackoff     = 100 * time.Millisecond
	busMaxBackoff     = 10 * time.Second
)

// Values of the dropped metric's reason label.
const (
	dropQueueFull       = "queue_full"       // explicit, owed as a flush
	dropPassiveOverflow = "passive_overflow" // passive, only counted
	dropPublishFailed   = "publish_failed"   // owed as a flush
	dropMalformed       = "malformed"        // incoming
)

// Config is the behaviour of a Bus.
type Config struct {
	// URL is the Redis server: redis://[user:password@]host:port[/db] or
	// rediss:// for TLS (go-redis ParseURL syntax, including its query
	// options). It is never logged with its password.
	URL string
	// Password, if set, overrides the URL's password, so that it can come
	// from a Secret instead of being part of the URL.
	Password string
	// Channel is the pub/sub channel; "" means DefaultChannel. Every
	// replica of one deployment must use the same one, and a different one
	// from other deployments sharing the Redis server.
	Channel string
	// DownTTL bounds how long a positive answer lives while the bus is down
	// (not subscribed), when invalidations made by other replicas are
	// missed: answers stored meanwhile get at most DownTTL (Cache.SetMaxTTL)
	// and, if the outage lasts DownTTL, the whole cache is flushed so that
	// older answers do not outlive it either. 0: no bound beyond the cache's
	// own TTL (the flush when the bus comes back still happens).
	DownTTL time.Duration
	// Logger; nil means none.
	Logger *zap.Logger
	// Registerer receives the bus metrics. Required.
	Registerer prometheus.Registerer
}

// Bus shares a Cache's invalidations with the other replicas subscribed to
// the same channel, and applies theirs. Wire Publish into the cache's
// Config.OnInvalidate and run Run for as long as the cache is in use.
type Bus struct {
	cache   *tokencache.Cache
	opts    *redis.Options
	channel string
	downTTL time.Duration
	log     *zap.Logger
	// from tells this instance's messages apart when they come back.
	from string
	out  *outbox

	up atomic.Bool
	// ups counts the times the link came up, so the publisher can tell
	// that its backoff after a failure no longer applies.
	ups atomic.Uint64
	// lastQueueWarn (unix ns) rate-limits the queue-full warning.
	lastQueueWarn   atomic.Int64
	warnedMalformed atomic.Bool

	m busMetrics
}

type busMetrics struct {
	published, received, applied, flushes prometheus.Counter
	queueFull, passiveOverflow            prometheus.Counter
	publishFailed, malformed              prometheus.Counter
	up                                    prometheus.Gauge
}

// New checks cfg and registers the bus metrics. It does not connect:
// Run does.
func New(cfg Config, c *tokencache.Cache) (*Bus, error) {
	if c == nil {
		return nil, errors.New("bus: New needs a Cache")
	}
	if cfg.Registerer == nil {
		return nil, errors.New("bus: Config.Registerer is required")
	}
	if cfg.DownTTL < 0 {
		return nil, errors.New("bus: Config.DownTTL must not be negative")
	}
	opts, err := redis.ParseURL(cfg.URL)
	if err != nil {
		// go-redis errors quote the URL; never repeat a password.
		return nil, errors.New("bus: Config.URL is not a redis:// or rediss:// URL")
	}
	if cfg.Password != "" {
		opts.Password = cfg.Password
	}
	opts.DialTimeout = busOpTimeout
	opts.ReadTimeout = busOpTimeout
	opts.WriteTimeout = busOpTimeout
	// A failed publish is counted and dealt with by a resync, not retried:
	// retries would only hold the queue up while Redis is down.
	opts.MaxRetries = -1
	opts.PoolSize = 2
	// Cluster maintenance notifications are for Redis Enterprise/Cloud
	// endpoints; probing for them is noise on a plain server.
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}

	b := &Bus{
		cache:   c,
		opts:    opts,
		channel: cfg.Channel,
		downTTL: cfg.DownTTL,
		log:     cfg.Logger,
		from:    fmt.Sprintf("%016x", rand.Uint64()),
		out:     newOutbox(busQueueSize, busPassiveQueueSize),
	}
	if b.channel == "" {
		b.channel = DefaultChannel
	}
	if b.log == nil {
		b.log = zap.NewNop()
	}
	b.log = b.log.With(zap.String("redis", opts.Addr), zap.String("channel", b.channel))
	if err := b.m.register(cfg.Registerer); err != nil {
		return nil, err
	}
	return b, nil
}

func (m *busMetrics) register(reg prometheus.Registerer) error {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "matrix_auth_proxy", Subsystem: "bus", Name: name, Help: help})
	}
	m.published = counter("messages_published_total", "Messages published to the other replicas: one per explicit invalidation or flush, one per batch of passive ones.")
	m.received = counter("messages_received_total", "Messages received on the channel, this replica's own echoes and malformed ones included.")
	m.applied = counter("messages_applied_total", "Messages of other replicas applied to the cache.")
	m.flushes = counter("flushes_total", "Cache flushes because invalidations may have been missed (bus back after a gap, down longer than the down TTL, or a peer lost some).")
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "matrix_auth_proxy", Subsystem: "bus", Name: "messages_dropped_total",
		Help: "Lost on the way: queue_full (an explicit invalidation found its queue full) and publish_failed (a message could not be published), both made up for by telling the peers to flush; passive_overflow (a passive invalidation found its set full: only counted); malformed (incoming messages).",
	}, []string{"reason"})
	m.queueFull = dropped.WithLabelValues(dropQueueFull)
	m.passiveOverflow = dropped.WithLabelValues(dropPassiveOverflow)
	m.publishFailed = dropped.WithLabelValues(dropPublishFailed)
	m.malformed = dropped.WithLabelValues(dropMalformed)
	m.up = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "matrix_auth_proxy", Subsystem: "bus", Name: "up",
		Help: "1 while subscribed to the invalidation channel and able to publish, else 0.",
	})
	for _, c := range []prometheus.Collector{m.published, m.received, m.applied, m.flushes, dropped, m.up} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("bus: registering metrics: %w", err)
		}
	}
	return nil
}

// Publish hands an invalidation to the other replicas. It never blocks:
// meant for Config.OnInvalidate, it runs on the request path. What waits is
// bounded: an explicit revocation that finds its queue full (Redis slower
// than the revocations, or down for long) makes the peers flush instead,
// and is counted and, at most every ten seconds, warned about; a passive
// one (tokencache.ReasonUnknownToken) that finds its set full is dropped
// and counted (outbox.go says why that is safe).
func (b *Bus) Publish(inv tokencache.Invalidation) {
	switch b.out.add(inv) {
	case explicitOverflow:
		b.m.queueFull.Inc()
		now := time.Now().UnixNano()
		if last := b.lastQueueWarn.Load(); now-last > int64(10*time.Second) && b.lastQueueWarn.CompareAndSwap(last, now) {
			b.log.Warn("invalidation bus queue full: the other replicas will be told to flush", zap.Int("queue", busQueueSize))
		}
	case passiveOverflow:
		b.m.passiveOverflow.Inc()
	}
}

// Up reports whether the bus is subscribed and able to publish.
func (b *Bus) Up() bool { return b.up.Load() }

// Run connects, subscribes, applies the other replicas' invalidations and
// publishes this one's, reconnecting with backoff, until ctx is done. It
// returns once every connection is closed and every goroutine it started
// has ended. Run it once. After it returns the cache no longer hears of
// other replicas' invalidations, so positive answers stay capped at DownTTL
// (matters when the proxy serves on during a graceful shutdown).
func (b *Bus) Run(ctx context.Context) {
	client := redis.NewClient(b.opts)
	defer client.Close()
	var wg sync.WaitGroup
	defer wg.Wait() // before client.Close
	wg.Go(func() { b.publishLoop(ctx, client) })

	l := &link{}
	b.linkDown(l, nil) // until the first subscription, invalidations may be missed
	backoff := busMinBackoff
	for {
		err := b.session(ctx, client, l)
		if ctx.Err() != nil {
			break
		}
		if l.up {
			backoff = busMinBackoff
		}
		b.linkDown(l, err)
		// Jitter (half the backoff, at random), so replicas that lost
		// Redis together do not all come back in the same millisecond.
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, busMaxBackoff)
		timer := time.NewTimer(wait)
		for waiting := true; waiting; {
			select {
			case <-ctx.Done():
				waiting = false
			case <-timer.C:
				waiting = false
			case <-l.downFlush():
				b.resync("bus down for longer than the down TTL")
				l.flushTimer = nil
			}
		}
		timer.Stop()
		if ctx.Err() != nil {
			break
		}
	}
	l.stopFlushTimer()
	b.up.Store(false)
	b.m.up.Set(0)
	b.cache.SetMaxTTL(b.downTTL)
}

// link is the state of the connection, owned by Run's goroutine.
type link struct {
	up         bool
	subscribed bool // ever
	wasDown    bool // ever observed down
	downSince  time.Time
	warned     bool // about the current outage
	flushTimer *time.Timer
}

func (l *link) downFlush() <-chan time.Time {
	if l.flushTimer == nil {
		return nil
	}
	return l.flushTimer.C
}

func (l *link) stopFlushTimer() {
	if l.flushTimer != nil {
		l.flushTimer.Stop()
		l.flushTimer = nil
	}
}

// linkDown records that the bus is not subscribed; err is why (nil: not
// yet tried). The first failure of an outage is a warning, later ones of the
// same outage are debug lines.
func (b *Bus) linkDown(l *link, err error) {
	if l.up || l.downSince.IsZero() {
		l.up = false
		l.downSince = time.Now()
		l.warned = false
		b.up.Store(false)
		b.m.up.Set(0)
		b.cache.SetMaxTTL(b.downTTL)
		if b.downTTL > 0 {
			l.stopFlushTimer()
			l.flushTimer = time.NewTimer(b.downTTL)
		}
	}
	if err == nil {
		return
	}
	l.wasDown = true
	if !l.warned {
		l.warned = true
		b.log.Warn("invalidation bus down: other replicas' logouts are not seen until it is back; the cache is flushed then",
			zap.Duration("down_cache_ttl", b.downTTL), zap.Error(err))
	} else if ce := b.log.Check(zap.DebugLevel, "invalidation bus still down"); ce != nil {
		ce.Write(zap.Error(err))
	}
}

// linkUp records that the subscription is confirmed and publishing works.
func (b *Bus) linkUp(l *link) {
	first := !l.subscribed
	l.subscribed = true
	l.up = true
	l.stopFlushTimer()
	// Anything cached before this moment may have missed an invalidation:
	// on a reconnection always, on the first subscription if the cache
	// already holds answers (Redis was slow or down at start-up).
	if !first || l.wasDown || b.cache.Len() > 0 {
		b.resync("")
	}
	b.cache.SetMaxTTL(0)
	b.up.Store(true)
	b.m.up.Set(1)
	if l.warned {
		b.log.Info("invalidation bus back up; cache flushed", zap.Duration("down_for", time.Since(l.downSince).Round(time.Millisecond)))
	} else {
		b.log.Info("invalidation bus up")
	}
	l.warned = false
	// What waited while down (and the flush owed for our own losses, if
	// any) can go now.
	b.ups.Add(1)
	b.out.signal()
}

// resync flushes the cache, which may hold answers an unseen invalidation
// concerned. Apply, not Flush: the peers need not follow.
func (b *Bus) resync(why string) {
	n := b.cache.Apply(tokencache.Invalidation{Scope: tokencache.ScopeAll, Reason: tokencache.ReasonBusResync})
	b.m.flushes.Inc()
	if why != "" {
		b.log.Warn("cache flushed: "+why, zap.Int("entries", n), zap.Duration("down_cache_ttl", b.downTTL))
	}
}

// session subscribes and receives until the link fails or ctx is done.
func (b *Bus) session(ctx context.Context, client *redis.Client, l *link) error {
	ps := client.Subscribe(ctx) // no channel yet: does not connect
	defer ps.Close()
	// Receive does not watch ctx; closing the PubSub ends a blocked read.
	stop := context.AfterFunc(ctx, func() { _ = ps.Close() })
	defer stop()

	if err := ps.Subscribe(ctx, b.channel); err != nil {
		return err
	}
	for confirmed := false; !confirmed; {
		msg, err := ps.ReceiveTimeout(ctx, busOpTimeout)
		if err != nil {
			return fmt.Errorf("waiting for the subscription: %w", err)
		}
		s, ok := msg.(*redis.Subscription)
		confirmed = ok && s.Kind == "subscribe" && s.Channel == b.channel
	}
	pctx, cancel := context.WithTimeout(ctx, busOpTimeout)
	err := client.Ping(pctx).Err()
	cancel()
	if err != nil {
		return fmt.Errorf("publishing connection: %w", err)
	}
	b.linkUp(l)

	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, busHealthInterval)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil && isTimeout(err) && !pinged:
			// Quiet is fine; make sure it is not a dead link.
			if err := ps.Ping(ctx); err != nil {
				return err
			}
			pinged = true
			continue
		case err != nil && isTimeout(err):
			return errors.New("redis did not answer a ping")
		case err != nil:
			return err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Message:
			b.receive(m.Payload)
		case *redis.Subscription:
			if m.Kind == "unsubscribe" && m.Channel == b.channel {
				return errors.New("unsubscribed by the server")
			}
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// receive applies one message from the channel.
func (b *Bus) receive(payload string) {
	b.m.received.Inc()
	msg, invs, err := decodeBusMessage(payload)
	if err != nil {
		b.m.malformed.Inc()
		// Only someone with access to Redis can send these, but a version
		// skew during an upgrade would send many: warn once.
		if !b.warnedMalformed.Swap(true) {
			b.log.Warn("ignoring a malformed invalidation message; further ones are only counted",
				zap.Int("bytes", len(payload)), zap.Error(err))
		} else if ce := b.log.Check(zap.DebugLevel, "ignoring a malformed invalidation message"); ce != nil {
			ce.Write(zap.Int("bytes", len(payload)), zap.Error(err))
		}
		return
	}
	if msg.From == b.from {
		return
	}
	n := 0
	for _, inv := range invs {
		inv.Reason = tokencache.ReasonBus
		n += b.cache.Apply(inv)
	}
	b.m.applied.Inc()
	if ce := b.log.Check(zap.DebugLevel, "applied a peer's invalidations"); ce != nil {
		ce.Write(zap.String("scope", msg.Scope), zap.Int("invalidations", len(invs)), zap.String("peer_reason", msg.Reason),
			zap.String("from", msg.From), zap.Int("dropped", n))
	}
}

// publishLoop sends what the outbox holds, while the link is up, until ctx
// is done. While the link is down, invalidations wait (within the outbox's
// bounds) rather than being lost: when it is back they reach the peers as
// they were, not as a flush.
func (b *Bus) publishLoop(ctx context.Context, client *redis.Client) {
	var (
		nextPassive time.Time // passive messages are spaced out
		retryAt     time.Time // after a failed publish, not before
		backoff     = busMinBackoff
		ups         = b.ups.Load()
	)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for ctx.Err() == nil {
		wait := time.Duration(-1) // until woken
		if b.up.Load() {
			if u := b.ups.Load(); u != ups {
				// A new link: the last one's failures say nothing of it.
				ups, retryAt, backoff = u, time.Time{}, busMinBackoff
			}
			now := time.Now()
			if now.Before(retryAt) {
				wait = retryAt.Sub(now)
			} else {
				m, ok, waiting := b.out.take(!now.Before(nextPassive), busPassiveBatch)
				if ok {
					if m.passive != nil {
						nextPassive = now.Add(busPassiveInterval)
					}
					if b.send(context.WithoutCancel(ctx), client, m) {
						backoff = busMinBackoff
					} else {
						// Retrying at once would only hammer a Redis that
						// refuses, or wait out more timeouts.
						retryAt = time.Now().Add(backoff)
						backoff = min(2*backoff, busMaxBackoff)
					}
					continue
				}
				if waiting {
					wait = nextPassive.Sub(now)
				}
			}
		}
		var tick <-chan time.Time
		if wait >= 0 {
			timer.Reset(wait)
			tick = timer.C
		}
		select {
		case <-ctx.Done():
		case <-b.out.wake:
		case <-tick:
		}
		timer.Stop()
	}
	b.drain(client)
}

// drain publishes what is left when Run is told to stop, within one
// timeout: the proxy stops the bus once its last requests are answered,
// and their revocations must not end with the process.
func (b *Bus) drain(client *redis.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), busOpTimeout)
	defer cancel()
	for ctx.Err() == nil {
		m, ok, _ := b.out.take(true, busPassiveBatch)
		if !ok {
			return
		}
		if !b.send(ctx, client, m) {
			break
		}
	}
	if n := b.out.len(); n > 0 {
		b.log.Warn("stopping with invalidations the other replicas were not told of", zap.Int("waiting", n))
	}
}

// lost records that invalidations of ours never reached the peers: peers
// may hold what they dropped, so they are told to flush.
func (b *Bus) lost() {
	b.m.publishFailed.Inc()
	b.out.owe(tokencache.ReasonBusResync)
}

// send publishes one message, within busOpTimeout and ctx. ctx is not
// Run's: a publish under way when Run is told to stop completes (what is
// left is drained after it), rather than being lost and owed as a flush.
func (b *Bus) send(ctx context.Context, client *redis.Client, m batch) bool {
	var payload string
	var err error
	if len(m.passive) > 1 {
		payload, err = encodeBatch(b.from, tokencache.ReasonUnknownToken, m.passive)
	} else {
		inv := m.inv
		if len(m.passive) == 1 {
			// One alone goes in the format every version reads.
			inv = tokencache.Invalidation{Scope: tokencache.ScopeToken, Token: m.passive[0], Reason: tokencache.ReasonUnknownToken}
		}
		payload, err = encodeBusMessage(b.from, inv)
	}
	if err != nil {
		b.log.Error("cannot encode an invalidation", zap.Error(err))
		b.lost()
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, busOpTimeout)
	defer cancel()
	if err := client.Publish(ctx, b.channel, payload).Err(); err != nil {
		b.lost()
		b.log.Warn("cannot publish an invalidation; the other replicas will be told to flush", zap.Error(err))
		return false
	}
	b.m.published.Inc()
	return true
}

// busMessage is the wire format. Only IDs, never a token.
//
// Version 1 carries one invalidation; every version reads it, so explicit
// revocations and flushes always go as version 1. Version 2 carries a batch
// of passive invalidations: scope "token", the IDs in Tokens, no Token.
// Replicas older than version 2 drop it as malformed (counted, and warned
// about once): during a rolling upgrade they miss only passive
// invalidations, which a replica may miss anyway (see outbox.go).
type busMessage struct {
	V        int      `json:"v"`
	From     string   `json:"from"`
	Scope    string   `json:"scope"`
	Token    string   `json:"token,omitempty"`  // hex TokenID
	Tokens   []string `json:"tokens,omitempty"` // hex TokenIDs, version 2
	UserID   string   `json:"user_id,omitempty"`
	DeviceID string   `json:"device_id,omitempty"`
	// Reason is the sender's, for logs; receivers apply ReasonBus.
	Reason string `json:"reason,omitempty"`
}

const (
	busMessageV1 = 1 // one invalidation
	busMessageV2 = 2 // a batch of token invalidations
)

var scopeNames = map[tokencache.Scope]string{tokencache.ScopeToken: "token", tokencache.ScopeDevice: "device", tokencache.ScopeUser: "user", tokencache.ScopeAll: "all"}

// encodeBusMessage encodes one invalidation, as version 1.
func encodeBusMessage(from string, inv tokencache.Invalidation) (string, error) {
	m := busMessage{V: busMessageV1, From: from, Scope: scopeNames[inv.Scope], Reason: string(inv.Reason)}
	switch inv.Scope {
	case tokencache.ScopeToken:
		m.Token = hex.EncodeToString(inv.Token[:])
	case tokencache.ScopeDevice:
		m.UserID, m.DeviceID = inv.UserID, inv.DeviceID
	case tokencache.ScopeUser:
		m.UserID = inv.UserID
		if inv.Token != (tokencache.TokenID{}) {
			m.Token = hex.EncodeToString(inv.Token[:])
		}
	case tokencache.ScopeDevicesExcept:
		// Sent as the whole user, which every version reads: the peers
		// drop the kept devices too, one lookup each.
		m.Scope, m.UserID = scopeNames[tokencache.ScopeUser], inv.UserID
	case tokencache.ScopeAll:
	default:
		return "", fmt.Errorf("unknown scope %d", inv.Scope)
	}
	b, err := json.Marshal(m)
	return string(b), err
}

// encodeBatch encodes invalidations of tokens, as version 2.
func encodeBatch(from string, reason tokencache.Reason, ids []tokencache.TokenID) (string, error) {
	if len(ids) == 0 {
		return "", errors.New("empty batch")
	}
	m := busMessage{V: busMessageV2, From: from, Scope: "token", Tokens: make([]string, len(ids)), Reason: string(reason)}
	for i, id := range ids {
		m.Tokens[i] = hex.EncodeToString(id[:])
	}
	b, err := json.Marshal(m)
	if err == nil && len(b) > busMaxMessage {
		err = fmt.Errorf("batch of %d tokens is %d bytes, more than %d", len(ids), len(b), busMaxMessage)
	}
	return string(b), err
}

// decodeBusMessage parses and checks a message of either version. The
// invalidations hold only the fields their scope uses, and no Reason.
func decodeBusMessage(payload string) (busMessage, []tokencache.Invalidation, error) {
	var m busMessage
	if len(payload) > busMaxMessage {
		return m, nil, fmt.Errorf("message of %d bytes, more than %d", len(payload), busMaxMessage)
	}
	if err := json.Unmarshal([]byte(payload), &m); err != nil {
		return m, nil, errors.New("not a JSON message object")
	}
	if m.From == "" && (m.V == busMessageV1 || m.V == busMessageV2) {
		return m, nil, errors.New("no sender")
	}
	switch m.V {
	case busMessageV1:
		inv, err := decodeV1(m)
		if err != nil {
			return m, nil, err
		}
		return m, []tokencache.Invalidation{inv}, nil
	case busMessageV2:
		if m.Scope != "token" || m.Token != "" || len(m.Tokens) == 0 {
			return m, nil, errors.New("version 2 is a non-empty list of tokens")
		}
		invs := make([]tokencache.Invalidation, len(m.Tokens))
		for i, t := range m.Tokens {
			invs[i].Scope = tokencache.ScopeToken
			if err := decodeTokenID(&invs[i].Token, t); err != nil {
				return m, nil, err
			}
		}
		return m, invs, nil
	default:
		return m, nil, fmt.Errorf("unsupported message version %d", m.V)
	}
}

func decodeTokenID(id *tokencache.TokenID, s string) error {
	if len(s) != 2*len(id) {
		return errors.New("token is not a hex token ID")
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return errors.New("token is not a hex token ID")
	}
	return nil
}

func decodeV1(m busMessage) (tokencache.Invalidation, error) {
	var inv tokencache.Invalidation
	var err error
	switch m.Scope {
	case "token":
		inv.Scope = tokencache.ScopeToken
		err = decodeTokenID(&inv.Token, m.Token)
	case "device":
		inv.Scope = tokencache.ScopeDevice
		inv.UserID, inv.DeviceID = m.UserID, m.DeviceID
		if m.UserID == "" {
			err = errors.New("device scope without user_id")
		}
	case "user":
		inv.Scope = tokencache.ScopeUser
		inv.UserID = m.UserID
		switch {
		case m.UserID == "":
			err = errors.New("user scope without user_id")
		case m.Token != "":
			err = decodeTokenID(&inv.Token, m.Token)
		}
	case "all":
		inv.Scope = tokencache.ScopeAll
	default:
		err = errors.New("unknown scope")
	}
	if err != nil {
		return tokencache.Invalidation{}, err
	}
	return inv, nil
}
