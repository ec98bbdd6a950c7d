package proxy

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// This file is the proxy's part in a homeserver that delegates
// authentication to the Matrix Authentication Service (MAS, MSC3861; the
// OAuth 2.0 API of the Client-Server API v1.15). There, every change MAS
// makes to a user's sessions ends in a call from MAS to Synapse,
// POST /_synapse/mas/… with MAS's shared secret as bearer token
// (synapse/rest/synapse/mas/). Those calls are rows of revokingRoutes; their
// effects, pure like the others, are below. What is not in the table:
//
//   - Server name. MAS names users by localpart; the proxy needs user IDs.
//     It learns the homeserver's name from the first positive whoami answer
//     (every local user carries it), unless Config.ServerName sets it.
//   - Locked users. In MAS mode Synapse ignores its own locked flag: a lock
//     works because MAS then calls the user's tokens inactive, and Synapse
//     keeps introspection answers for two minutes. So the proxy remembers
//     whom MAS locked and stores no positive answer for them until MAS
//     unlocks them; otherwise a whoami right after the lock refills the
//     cache from Synapse's warm answer.
//   - Expiry. MAS access tokens expire, whoami does not say when; with an
//     Introspector the proxy asks MAS at a token's first lookup and never
//     serves it past its exp.

// Introspector asks MAS about a token; *upstream.Introspector is one.
type Introspector interface {
	Introspect(ctx context.Context, token string) (upstream.Introspection, error)
}

// defaultMaxLockedUsers bounds the users MAS locked that the proxy
// remembers. Past it the oldest lock is forgotten: by then Synapse's own
// introspection cache (two minutes) has almost surely let go of that user's
// tokens, so the proxy would store no positive answer for them anyway.
const defaultMaxLockedUsers = 10000

// introspectTimeout bounds asking MAS about a token, within the lookup's own
// bound: a slow MAS must not make every cache miss slow. Past it, the answer
// is stored as without MAS.
const introspectTimeout = 2 * time.Second

// mas is the proxy's MAS state.
type mas struct {
	// fixedServer is Config.ServerName; learned is set from the first
	// positive whoami answer when fixedServer is empty.
	fixedServer string
	learned     atomic.Pointer[string]
	// mismatch is set once a positive answer named a user of another
	// server than fixedServer: SERVER_NAME is wrong, and MAS's calls
	// would name users nobody has. The name is then treated as unknown
	// (a MAS call that succeeds flushes) and an error is logged once.
	mismatch atomic.Bool
	// secret is MAS's shared secret, for the rate limiter's exemption;
	// nil without one. Never a key, never logged.
	secret       []byte
	introspector Introspector
	locked       lockedUsers
	introspected *prometheus.CounterVec
}

func newMAS(cfg Config, reg prometheus.Registerer) (*mas, error) {
	m := &mas{fixedServer: cfg.ServerName, introspector: cfg.Introspector}
	if cfg.MASSecret != "" {
		m.secret = []byte("Bearer " + cfg.MASSecret)
	}
	n := cfg.MaxLockedUsers
	if n <= 0 {
		n = defaultMaxLockedUsers
	}
	var err error
	if m.locked.lru, err = simplelru.NewLRU[string, struct{}](n, nil); err != nil {
		return nil, err
	}
	m.introspected = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "mas_introspections_total",
		Help: "Tokens the proxy asked the Matrix Authentication Service about to learn their expiry, by result: active, inactive (the positive answer was not stored), error (stored for CACHE_TTL as without MAS).",
	}, []string{"result"})
	for _, r := range []string{"active", "inactive", "error"} {
		m.introspected.WithLabelValues(r)
	}
	return m, reg.Register(m.introspected)
}

// serverName is the homeserver's name: configured, learned, or "" when
// neither (no positive answer seen yet).
func (m *mas) serverName() string {
	if m.fixedServer != "" {
		if m.mismatch.Load() {
			return ""
		}
		return m.fixedServer
	}
	if s := m.learned.Load(); s != nil {
		return *s
	}
	return ""
}

// learn notes the server name of a user ID from a positive answer. It
// returns true the first time the answer contradicts SERVER_NAME.
func (m *mas) learn(userID string) (mismatch bool) {
	if m.fixedServer != "" {
		if m.mismatch.Load() {
			return false
		}
		_, server, ok := strings.Cut(userID, ":")
		return ok && server != m.fixedServer && m.mismatch.CompareAndSwap(false, true)
	}
	if m.learned.Load() != nil {
		return false
	}
	if _, server, ok := strings.Cut(userID, ":"); ok && server != "" {
		m.learned.CompareAndSwap(nil, &server)
	}
	return false
}

// fromMAS reports whether r carries MAS's secret as its bearer token.
func (m *mas) fromMAS(r *http.Request) bool {
	if m.secret == nil {
		return false
	}
	h := r.Header["Authorization"]
	return len(h) == 1 && subtle.ConstantTimeCompare([]byte(h[0]), m.secret) == 1
}

// isSecret reports whether token is MAS's secret.
func (m *mas) isSecret(token string) bool {
	return m.secret != nil && subtle.ConstantTimeCompare([]byte("Bearer "+token), m.secret) == 1
}

// lockedUsers is the bounded set of localparts MAS locked.
type lockedUsers struct {
	mu  sync.Mutex
	lru *simplelru.LRU[string, struct{}]
}

func (l *lockedUsers) lock(localpart string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lru.Add(localpart, struct{}{})
}

func (l *lockedUsers) unlock(localpart string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lru.Remove(localpart)
}

func (l *lockedUsers) has(userID string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lru.Len() == 0 {
		return false
	}
	return l.lru.Contains(localpartOf(userID))
}

func (l *lockedUsers) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// localpartOf is the localpart of "@localpart:server". Whoami answers only
// name local users, so the localpart alone identifies one.
func localpartOf(userID string) string {
	local, _, _ := strings.Cut(strings.TrimPrefix(userID, "@"), ":")
	return local
}

// masReview is the last word on a whoami answer fetched from the homeserver,
// before the cache stores it: it learns the server name, keeps answers for
// users MAS locked out of the cache, and bounds the answer's lifetime by the
// token's expiry at MAS. It never fails a lookup: MAS's trouble leaves the
// answer as the homeserver gave it (stored for CACHE_TTL).
func (p *Proxy) masReview(ctx context.Context, key tokencache.Key, token string, a tokencache.Answer) tokencache.Answer {
	if a.Kind != tokencache.Positive {
		return a
	}
	m := p.mas
	if m.learn(a.UserID) {
		p.log.Error("SERVER_NAME is not the homeserver's name: its users are named otherwise; "+
			"MAS's calls cannot be attributed, so each one that succeeds flushes the cache until SERVER_NAME is fixed",
			zap.String("server_name", m.fixedServer))
	}
	if m.locked.has(a.UserID) {
		return uncacheableAnswer(a)
	}
	// Only a plain token with a device can be MAS's: appservice tokens
	// are Synapse's own (MAS calls them inactive), and Synapse names no
	// device for them unless a masquerade asks for one.
	if m.introspector == nil || key.Variant != 0 || a.DeviceID == "" {
		return a
	}
	ictx, cancel := context.WithTimeout(ctx, introspectTimeout)
	defer cancel()
	in, err := m.introspector.Introspect(ictx, token)
	switch {
	case err != nil:
		m.introspected.WithLabelValues("error").Inc()
	case !in.Active:
		// Synapse answered from its introspection cache: a lock, or a
		// token MAS just revoked.
		m.introspected.WithLabelValues("inactive").Inc()
		return uncacheableAnswer(a)
	default:
		m.introspected.WithLabelValues("active").Inc()
		if !in.Exp.IsZero() {
			// fill reads the deadline: an expired exp stores nothing.
			p.cache.LimitLifetime(key.Token, in.Exp)
		}
	}
	return a
}

// uncacheableAnswer is a positive answer handed back as it came, never
// stored.
func uncacheableAnswer(a tokencache.Answer) tokencache.Answer {
	return tokencache.Answer{Kind: tokencache.Uncacheable, UserID: a.UserID, DeviceID: a.DeviceID, Body: a.Body, Meta: a.Meta}
}

// masCall is the body of a MAS → Synapse call, as Synapse's request models
// read it (synapse/rest/synapse/mas/*.py: pydantic, strict strings and
// booleans).
type masCall struct {
	localpart string
	deviceID  string
	hasDevice bool
	devices   []string
	hasList   bool
	locked    lockChange
}

// lockChange is provision_user's "locked": true locks, false unlocks,
// absent or null leaves it; anything else Synapse refuses, and the proxy,
// should it succeed anyway, reads as a possible lock.
type lockChange uint8

const (
	lockUnchanged lockChange = iota
	lockSet
	lockCleared
	lockUnreadable
)

// parseMASCall reads a MAS call's body: a JSON object with a string
// "localpart". Keys are matched exactly, as pydantic does.
func parseMASCall(body []byte) (masCall, bool) {
	var m map[string]json.RawMessage
	var c masCall
	if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["localpart"], &c.localpart) != nil ||
		string(m["localpart"]) == "null" {
		return c, false
	}
	if raw, has := m["device_id"]; has && string(raw) != "null" {
		c.hasDevice = json.Unmarshal(raw, &c.deviceID) == nil
	}
	if raw, has := m["devices"]; has && string(raw) != "null" {
		c.hasList = json.Unmarshal(raw, &c.devices) == nil
	}
	switch raw, has := m["locked"]; {
	case !has || string(raw) == "null":
	case string(raw) == "true":
		c.locked = lockSet
	case string(raw) == "false":
		c.locked = lockCleared
	default:
		c.locked = lockUnreadable
	}
	return c, true
}

// forMASUser names the user a MAS call concerns and hands it to known.
// A body the proxy cannot read, or a server name not known yet (no positive
// answer seen, so this replica holds none), leaves only a flush, and only
// on a success the homeserver confirmed: an unknown outcome is anyone's to
// cause, and only MAS can make one of these calls succeed.
func forMASUser(o *outcome, d *decision, r tokencache.Reason, known func(c masCall, user string)) {
	if !masMayHavePerformed(o) {
		return
	}
	c, ok := parseMASCall(o.body)
	if !ok || !o.bodyOK || o.serverName == "" {
		if o.result == performed {
			d.flush(r)
		}
		return
	}
	known(c, "@"+c.localpart+":"+o.serverName)
}

// masDeleteDevice: POST /_synapse/mas/delete_device {"localpart",
// "device_id"}: Synapse deletes the device and its tokens.
func masDeleteDevice(o *outcome, d *decision) {
	forMASUser(o, d, reasonDevice, func(c masCall, user string) {
		if !c.hasDevice {
			d.dropUser(user, tokencache.TokenID{}, reasonDevice)
			return
		}
		d.dropDevice(user, c.deviceID, reasonDevice)
	})
}

// masSyncDevices: POST /_synapse/mas/sync_devices {"localpart", "devices"}:
// Synapse deletes every device of the user the list does not name (but the
// dehydrated one, which holds no token). A list that cannot be read drops
// the whole user.
func masSyncDevices(o *outcome, d *decision) {
	forMASUser(o, d, reasonDevice, func(c masCall, user string) {
		if !c.hasList || len(c.devices) > maxListedDevices {
			// A long list to keep is logged and shared as a whole
			// user: the cache's log of recent invalidations holds
			// what it is given.
			d.dropUser(user, tokencache.TokenID{}, reasonDevice)
			return
		}
		d.dropDevicesExcept(user, c.devices, reasonDevice)
	})
}

// masDeleteUser: POST /_synapse/mas/delete_user {"localpart", "erase"}:
// Synapse deactivates the account, which deletes every device and token.
func masDeleteUser(o *outcome, d *decision) {
	forMASUser(o, d, reasonDeactivate, func(_ masCall, user string) {
		d.dropUser(user, tokencache.TokenID{}, reasonDeactivate)
	})
}

// masProvisionUser: POST /_synapse/mas/provision_user {"localpart", …,
// "locked"}: "locked": true locks the user (see the top of this file),
// false unlocks (once Synapse confirmed it); the other fields (profile,
// emails) revoke nothing. The lock is kept by localpart, so it holds even
// before the server name is known.
func masProvisionUser(o *outcome, d *decision) {
	if !masMayHavePerformed(o) {
		return
	}
	c, ok := parseMASCall(o.body)
	ok = ok && o.bodyOK
	switch {
	case ok && c.locked == lockSet:
		d.locks = append(d.locks, c.localpart)
	case ok && c.locked == lockCleared:
		if o.result == performed {
			d.unlocks = append(d.unlocks, c.localpart)
		}
		return
	case ok && c.locked == lockUnchanged:
		return
	}
	forMASUser(o, d, reasonLock, func(_ masCall, user string) {
		d.dropUser(user, tokencache.TokenID{}, reasonLock)
	})
}

// masMayHavePerformed: Synapse performs a MAS call only for MAS's secret,
// so an unknown outcome (a timeout, a 5xx) counts only for a call that
// carried it; any client can send the same path with its own token and
// have it fail. A confirmed success counts whoever sent it (the secret
// configured here may be stale; Synapse's is the one that decides).
func masMayHavePerformed(o *outcome) bool {
	return o.result == performed || o.fromMAS
}

// masReactivateUser: POST /_synapse/mas/reactivate_user {"localpart"}:
// nothing to drop, and nothing to unlock: Synapse's activate_account
// (synapse/handlers/deactivate_account.py) clears the deactivation only and
// leaves a lock in place, so a locked user stays locked here too (only
// provision_user with "locked": false unlocks).
func masReactivateUser(*outcome, *decision) {}
