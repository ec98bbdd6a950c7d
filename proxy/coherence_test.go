package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// The coherence check: operations run through the proxy against modelHS
// (model_test.go), and after every step, for every token ever issued, a
// whoami through the proxy must answer what the model answers, except
// where the README's "Limits" says the proxy cannot know; and a step must
// not make the entries of users it does not concern vanish (counted as
// whoami calls reaching the model).

// opKind is an operation of the language.
type opKind uint8

const (
	opLogin              opKind = iota // user A, device B (0: new), B&0x80 refreshable
	opWhoami                           // token A, B: header/query, masquerade
	opLogout                           // token A
	opLogoutAll                        // token A
	opDeleteDevice                     // token A deletes the device of token B; B&1: no auth (refused)
	opDeleteDevices                    // the same with POST delete_devices
	opPassword                         // token A; B&1: no auth, B&2: logout_devices false
	opDeactivate                       // token A; B&1: no auth
	opAdminDeactivate                  // token A deactivates user B (Synapse admin API)
	opAdminDeleteDevice                // token A deletes the device of token B (admin API)
	opMASDeleteDevice                  // MAS deletes the device of token B
	opMASDeleteUser                    // MAS deletes user B
	opBehindBack                       // on the homeserver directly: B%3 revokes token A, its device, its user
	opAdvance                          // time passes: A%90+1 seconds
	opUse                              // token A makes a non-whoami request (GET /sync)
	opRefresh                          // the refresh token of token A
	opRestart                          // the proxy restarts (empty cache)
	opRedisBounce                      // Redis goes away and comes back (with a bus)
	opMASSyncDevices                   // MAS keeps only the device of token B of its user
	opAdminResetPassword               // token A resets the password of user B (admin API); B&0x40: logout_devices false
	opBurst                            // concurrent clients: whoamis of token A through every replica while A logs out (B&1) or makes another request
	opGuest                            // a guest registers (POST /register?kind=guest)
	opMASLogin                         // MAS issues a token for user A, device B (expiring, told only by introspection)
	opMASLock                          // MAS: provision_user locks (A&1) or unlocks user B, or (A&2) reactivate_user
	opAdminLock                        // token A locks user B (B&0x80: unlocks) with the admin API, or (B&0x40) MSC4323's PUT …/admin/lock (404 on Synapse 1.163)
	opDehydrate                        // token A PUTs dehydrated device B (B&0x80: DELETEs it), MSC3814
	opAppservice                       // an appservice's token: A%4 logout, logout/all, a use, whoami; A&4 the fenced one, A&8 from inside its whitelist; as user B (B&0x80: none), A&16 with the device of token B
	opTokenless                        // no token: B&1 OIDC back-channel logout, else a password reset by email, for user A; B&2 refused
	opAdminUpdate                      // token A updates user B with PUT /_synapse/admin/v2/users: the body adminUpdates[B>>5] names
	opAdminSetAdmin                    // token A makes user B an admin (B&0x80: no longer one) with PUT /_synapse/admin/v1/users/{B}/admin
	opAdminDeleteDevices               // token A deletes the device of token B with the admin API's POST …/users/{userId}/delete_devices
	numOps

	// opVia2, or-ed into a kind, sends the operation through the second
	// replica (with several).
	opVia2 opKind = 0x80
)

var opNames = [numOps]string{
	"opLogin", "opWhoami", "opLogout", "opLogoutAll", "opDeleteDevice", "opDeleteDevices",
	"opPassword", "opDeactivate", "opAdminDeactivate", "opAdminDeleteDevice", "opMASDeleteDevice",
	"opMASDeleteUser", "opBehindBack", "opAdvance", "opUse", "opRefresh", "opRestart", "opRedisBounce",
	"opMASSyncDevices", "opAdminResetPassword", "opBurst", "opGuest", "opMASLogin", "opMASLock", "opAdminLock",
	"opDehydrate", "opAppservice", "opTokenless", "opAdminUpdate", "opAdminSetAdmin", "opAdminDeleteDevices",
}

// adminUpdates are the bodies of opAdminUpdate.
var adminUpdates = [...]string{
	`{"deactivated":true}`, `{"deactivated":false}`, `{"password":"x"}`, `{"password":"x","logout_devices":false}`,
	`{"displayname":"x"}`, `{"deactivated":true,"locked":true}`, `{"password":"x","locked":false}`, `{"admin":false}`,
}

type modelOp struct {
	Kind opKind
	A, B uint8
}

func (o modelOp) String() string {
	name := opNames[o.Kind&^opVia2%numOps]
	if o.Kind&opVia2 != 0 {
		name += " | opVia2"
	}
	return fmt.Sprintf("{%s, %d, %d}", name, o.A, o.B)
}

// maxModelOps bounds a sequence decoded from fuzz input.
const maxModelOps = 48

// decodeOps reads three bytes per operation.
func decodeOps(data []byte) []modelOp {
	var ops []modelOp
	for i := 0; i+2 < len(data) && len(ops) < maxModelOps; i += 3 {
		ops = append(ops, modelOp{opKind(data[i] % byte(numOps)), data[i+1], data[i+2]})
	}
	return ops
}

func encodeOps(ops []modelOp) []byte {
	var b []byte
	for _, o := range ops {
		b = append(b, byte(o.Kind), o.A, o.B)
	}
	return b
}

// hangUpOps are the operations whose B&0x40 makes the client hang up
// (they send with revoke).
var hangUpOps = map[opKind]bool{opLogout: true, opLogoutAll: true, opDeleteDevice: true, opDeleteDevices: true,
	opPassword: true, opDeactivate: true, opAdminDeactivate: true, opAdminDeleteDevice: true}

// modelDevices are the device IDs logins name: Synapse takes any string,
// and dot segments, slashes and escapes have hidden bugs before.
var modelDevices = []string{"D0", "D1", "D2", ".", "..", "a/b", "%2E", "é", "D 1"}

// client_ is the client API prefix an operand's top bits choose.
func (r *coherenceRig) client_(a uint8) string {
	return "/_matrix/client/" + [...]string{"v3", "r0", "unstable", "v3"}[a>>6] + "/"
}

// revoke sends a revoking call; with o.B&0x40 the client hangs up once the
// homeserver has the call, before its answer, and revoke returns when the
// proxy has finished with the call.
func (r *coherenceRig) revoke(o modelOp, method, path, tok, body string) (int, string, error) {
	if o.B&0x40 == 0 {
		return r.do(method, path, tok, body)
	}
	hold := &modelHold{arrived: make(chan struct{}), release: make(chan struct{})}
	r.hs.mu.Lock()
	r.hs.hold = hold
	r.hs.mu.Unlock()
	defer func() {
		r.hs.mu.Lock()
		r.hs.hold = nil
		r.hs.mu.Unlock()
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, r.replicas[r.via].front.URL+path, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	r.replicas[r.via].sent.Add(1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := r.client.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	select {
	case <-hold.arrived:
		cancel()
		<-done
		close(hold.release)
	case <-done: // refused before it reached the homeserver
		return 0, "", nil
	}
	// The replica counts a request once it is done with it, after its
	// client has the answer: it is done with every request sent to it
	// when it counted as many.
	for try := 0; r.requestsServed() < float64(r.replicas[r.via].sent.Load()); try++ {
		if try == 2000 {
			return 0, "", fmt.Errorf("the proxy never finished a call whose client hung up")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, "", nil
}

// requestsServed is the requests the current replica has answered.
func (r *coherenceRig) requestsServed() float64 {
	mfs, _ := r.replicas[r.via].reg.Gather()
	var n float64
	for _, mf := range mfs {
		if mf.GetName() == "matrix_auth_proxy_requests_total" {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

const (
	modelTTL         = 2 * time.Minute
	modelNegativeTTL = 10 * time.Second
)

// coherenceRig is one or more proxy replicas in front of a modelHS, and
// what the check knows about each token.
type coherenceRig struct {
	clock    *fakeClock
	hs       *modelHS
	cfg      Config
	replicas []*coherenceReplica
	// via is the replica the current step goes through.
	via    int
	client *http.Client
	tr     *http.Transport
	// inside connects from modelFencedAddr, the one address the fenced
	// appservice's ip_range_whitelist admits.
	inside   *http.Client
	insideTr *http.Transport
	// redis, when set, is the bus the replicas share (coherence_replicas_test.go).
	redis *coherenceRedis
	// trace, if set, is told of each step (for debugging a sequence);
	// not of the requests of a burst (concurrent).
	trace      func(string)
	concurrent bool
	// refused: the last request of the step was refused (4xx but a
	// 401 that is not a user-interactive auth challenge).
	refused bool
	// pubOff: what earlier instances of each replica published.
	pubOff []float64
	// per access token:
	behindAt map[string]time.Time // revoked behind the proxy's back, not used since
	lastGood map[string]string    // the last positive answer the proxy gave, by check key
	// err401Until: per user, until when a wrong 401 is allowed for the
	// user's tokens (a negative answer cached while MAS had them locked).
	err401Until map[string]time.Time
	cached      map[string]bool // positive at the last check (so cached)
}

// coherenceReplica is one proxy.
type coherenceReplica struct {
	front *httptest.Server
	// auth is its forward-auth listener.
	auth *httptest.Server
	// expKnown: the replica saw the token's expiry announced.
	expKnown map[string]bool
	// stopBus stops its bus, if any, and waits for it; busUp says whether
	// it is up (nil: no bus).
	stopBus func()
	busUp   func() bool
	reg     *prometheus.Registry
	// explicit: the explicit invalidations this instance handed its bus.
	explicit atomic.Int64
	// sent: the requests the rig sent to this instance.
	sent atomic.Int64
	// startPub: what each replica had published when this one started.
	startPub []float64
	// appliedBase: what this one had applied then.
	appliedBase float64
}

func newCoherenceRig(tb testing.TB) *coherenceRig { return newCoherenceRigN(tb, 1, nil) }

func newCoherenceRigN(tb testing.TB, n int, redis *coherenceRedis) *coherenceRig {
	tb.Helper()
	return newCoherenceRigWith(tb, n, redis, func(*Config) {})
}

// newCoherenceRigWith is newCoherenceRigN with a change to the replicas'
// configuration.
func newCoherenceRigWith(tb testing.TB, n int, redis *coherenceRedis, change func(*Config)) *coherenceRig {
	tb.Helper()
	r := &coherenceRig{clock: &fakeClock{t: time.Unix(1_700_000_000, 0)}, redis: redis,
		behindAt: map[string]time.Time{}, lastGood: map[string]string{}, cached: map[string]bool{}, err401Until: map[string]time.Time{}}
	r.hs = newModelHS(r.clock.Now)
	hasher, err := tokencache.NewHasher([]byte("test hash key, 32 bytes long...."))
	if err != nil {
		tb.Fatal(err)
	}
	u, _ := url.Parse(r.hs.srv.URL)
	r.cfg = Config{
		Upstream: u, Transport: upstream.NewTransport(5 * time.Second), Hasher: hasher,
		Cache: tokencache.Config{Size: 1000, TTL: modelTTL, NegativeTTL: modelNegativeTTL,
			LookupTimeout: 5 * time.Second, Now: r.clock.Now},
		ServerName: modelServer, MASSecret: modelMASToken, Introspector: r.hs,
	}
	change(&r.cfg)
	r.tr = &http.Transport{}
	r.client = &http.Client{Transport: r.tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(modelFencedAddr)}}
	r.insideTr = &http.Transport{DialContext: dialer.DialContext}
	r.inside = &http.Client{Transport: r.insideTr, CheckRedirect: r.client.CheckRedirect}
	r.replicas = make([]*coherenceReplica, n)
	r.pubOff = make([]float64, n)
	for i := range n {
		r.start(tb, i)
	}
	if redis != nil {
		r.waitBuses(tb)
		for i := range n {
			r.rebase(tb, i)
		}
	}
	return r
}

// start starts replica i, afresh.
func (r *coherenceRig) start(tb testing.TB, i int) {
	tb.Helper()
	rep := &coherenceReplica{expKnown: map[string]bool{}, stopBus: func() {}}
	cfg := r.cfg
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	publish := r.attachBus(tb, &cfg, reg, rep)
	p, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	publish(p)
	rep.front = httptest.NewServer(p)
	rep.auth = httptest.NewServer(p.ForwardAuth())
	rep.reg = reg
	r.replicas[i] = rep
}

// stop stops replica i.
func (r *coherenceRig) stop(i int) {
	r.replicas[i].front.Close()
	r.replicas[i].auth.Close()
	r.replicas[i].stopBus()
}

func (r *coherenceRig) close() {
	for i := range r.replicas {
		r.stop(i)
	}
	r.tr.CloseIdleConnections()
	r.insideTr.CloseIdleConnections()
	if t, ok := r.cfg.Transport.(interface{ CloseIdleConnections() }); ok {
		t.CloseIdleConnections()
	}
	r.hs.srv.Close()
}

// do sends a request through the proxy.
func (r *coherenceRig) do(method, path, tok, body string) (int, string, error) {
	return r.doVia(r.via, method, path, tok, body)
}

func (r *coherenceRig) doVia(i int, method, path, tok, body string) (int, string, error) {
	return r.doFrom(i, r.client, method, path, tok, body)
}

// doFrom sends a request through replica i with client c.
func (r *coherenceRig) doFrom(i int, c *http.Client, method, path, tok, body string) (int, string, error) {
	req, err := http.NewRequest(method, r.replicas[i].front.URL+path, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	r.replicas[i].sent.Add(1)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if !r.concurrent && err == nil {
		// A refusal: a 4xx other than a 401 that is no user-interactive
		// auth challenge (that one is passive invalidation's).
		r.refused = resp.StatusCode >= 400 && resp.StatusCode < 500 &&
			(resp.StatusCode != 401 || strings.Contains(string(b), `"flows"`))
	}
	if r.trace != nil && !strings.Contains(path, "/whoami") && !r.concurrent {
		r.trace(fmt.Sprintf("  %s %s via %d: %d %s", method, path, i, resp.StatusCode, b))
	}
	return resp.StatusCode, string(b), err
}

// token is the access token an operand names (0 is the appservice's,
// the one past the last issued the fenced appservice's).
func (r *coherenceRig) token(i uint8) *modelToken {
	r.hs.mu.Lock()
	defer r.hs.mu.Unlock()
	if n := int(i) % (len(r.hs.tokens) + 1); n < len(r.hs.tokens) {
		return r.hs.tokens[n]
	}
	return r.hs.fence
}

func modelUser(i uint8) string { return modelUsers[int(i)%len(modelUsers)] }

// step runs one operation; it returns the users whose entries the step may
// drop or re-fetch (nil with all: every user's).
func (r *coherenceRig) step(tb testing.TB, o modelOp) (affected map[string]bool, all bool, err error) {
	affected = map[string]bool{}
	r.via = 0
	if o.Kind&opVia2 != 0 {
		r.via = 1 % len(r.replicas)
	}
	o.Kind = o.Kind &^ opVia2 % numOps
	a, b := r.token(o.A), r.token(o.B)
	r.refused = false
	if r.trace != nil {
		r.trace(fmt.Sprintf("%v via %d: a=%s (%s %s) b=%s (%s %s)", o, r.via, a.tok, a.user, a.device, b.tok, b.user, b.device))
	}
	// A client that hangs up may never let the proxy see the homeserver's
	// 401 (a call the proxy does not take for a revoking one is canceled
	// with its client): such a use does not end a stale answer.
	hangsUp := o.B&0x40 != 0 && hangUpOps[o.Kind]
	use := func(t *modelToken) {
		affected[t.user] = true
		if !hangsUp {
			delete(r.behindAt, t.tok)
		}
	}
	uia := func(noAuth bool) string {
		if noAuth {
			return ""
		}
		return fmt.Sprintf(`"auth":{"type":"m.login.password","password":%q}`, hsPassword)
	}
	withAuth := func(fields ...string) string {
		var nonEmpty []string
		for _, f := range fields {
			if f != "" {
				nonEmpty = append(nonEmpty, f)
			}
		}
		return "{" + strings.Join(nonEmpty, ",") + "}"
	}
	before := r.liveSet()
	switch o.Kind {
	case opLogin:
		user := modelUser(o.A)
		affected[user] = true
		dev := ""
		if o.B&0x7f != 0 {
			d, _ := json.Marshal(modelDevices[int(o.B&0x7f)%len(modelDevices)])
			dev = `,"device_id":` + string(d)
		}
		body := fmt.Sprintf(`{"type":"m.login.password","user":%q,"password":%q,"refresh_token":%t%s}`, user, hsPassword, o.B&0x80 != 0, dev)
		status, resp, e := r.do("POST", "/_matrix/client/v3/login", "", body)
		if e != nil {
			return nil, false, e
		}
		if status == 200 {
			var lr struct {
				AccessToken string `json:"access_token"`
			}
			_ = json.Unmarshal([]byte(resp), &lr)
			r.replicas[r.via].expKnown[lr.AccessToken] = true
		}
	case opWhoami:
		// A whoami is not a use: it does not end a stale answer.
		affected[a.user] = true
		path := whoamiV3
		q := url.Values{}
		if o.B&1 != 0 {
			q.Set("access_token", a.tok)
		}
		if o.B&2 != 0 {
			u := modelUser(o.B >> 2)
			q.Set("user_id", u)
			affected[u] = true
		}
		tok := a.tok
		if o.B&1 != 0 {
			tok = ""
		}
		if len(q) > 0 {
			path += "?" + q.Encode()
		}
		if _, _, e := r.do("GET", path, tok, ""); e != nil {
			return nil, false, e
		}
	case opLogout:
		use(a)
		expired := r.hs.answer(a.tok, "").errcode == "M_UNKNOWN_TOKEN" && r.hs.answer(a.tok, "").soft
		_, _, err = r.revoke(o, "POST", r.client_(o.A)+"logout", a.tok, "{}")
		if expired {
			// README: a logout with an expired token drops its own
			// answers; its device's other tokens live until their
			// announced expiry or CACHE_TTL.
			r.markBehind(before)
		}
	case opLogoutAll:
		use(a)
		expired := r.hs.answer(a.tok, "").errcode == "M_UNKNOWN_TOKEN" && r.hs.answer(a.tok, "").soft
		_, _, err = r.revoke(o, "POST", r.client_(o.A)+"logout/all", a.tok, "{}")
		if expired {
			// README: with an expired token the user cannot be named.
			r.markBehind(before)
		}
	case opDeleteDevice:
		use(a)
		_, _, err = r.revoke(o, "DELETE", r.client_(o.A)+"devices/"+url.PathEscape(b.device), a.tok, withAuth(uia(o.B&1 != 0)))
	case opDeleteDevices:
		use(a)
		dev, _ := json.Marshal(b.device)
		_, _, err = r.revoke(o, "POST", r.client_(o.A)+"delete_devices", a.tok, withAuth(`"devices":[`+string(dev)+`]`, uia(o.B&1 != 0)))
	case opPassword:
		use(a)
		lo := ""
		if o.B&2 != 0 {
			lo = `"logout_devices":false`
		}
		_, _, err = r.revoke(o, "POST", r.client_(o.A)+"account/password", a.tok, withAuth(`"new_password":"x"`, lo, uia(o.B&1 != 0)))
	case opDeactivate:
		use(a)
		_, _, err = r.revoke(o, "POST", r.client_(o.A)+"account/deactivate", a.tok, withAuth(uia(o.B&1 != 0)))
	case opAdminDeactivate:
		use(a)
		u := modelUser(o.B)
		affected[u] = true
		_, _, err = r.revoke(o, "POST", "/_synapse/admin/v1/deactivate/"+url.PathEscape(u), a.tok, `{"erase":false}`)
	case opAdminDeleteDevice:
		use(a)
		affected[b.user] = true
		_, _, err = r.revoke(o, "DELETE", "/_synapse/admin/v2/users/"+url.PathEscape(b.user)+"/devices/"+url.PathEscape(b.device), a.tok, "")
	case opMASDeleteDevice:
		affected[b.user] = true
		_, _, err = r.do("POST", "/_synapse/mas/delete_device", modelMASToken,
			fmt.Sprintf(`{"localpart":%q,"device_id":%q}`, localpartOf(b.user), b.device))
	case opMASDeleteUser:
		u := modelUser(o.B)
		affected[u] = true
		_, _, err = r.do("POST", "/_synapse/mas/delete_user", modelMASToken, fmt.Sprintf(`{"localpart":%q,"erase":false}`, localpartOf(u)))
	case opMASSyncDevices:
		affected[b.user] = true
		dev, _ := json.Marshal(b.device)
		_, _, err = r.do("POST", "/_synapse/mas/sync_devices", modelMASToken,
			fmt.Sprintf(`{"localpart":%q,"devices":[%s]}`, localpartOf(b.user), dev))
	case opAdminResetPassword:
		use(a)
		u := modelUser(o.B)
		affected[u] = true
		_, _, err = r.do("POST", "/_synapse/admin/v1/reset_password/"+url.PathEscape(u), a.tok,
			fmt.Sprintf(`{"new_password":"x","logout_devices":%t}`, o.B&0x40 == 0))
	case opBurst:
		// Checked at the next quiescent point, when every request is
		// answered: a lookup that raced the logout must not have cached
		// the token again.
		affected[a.user] = true
		delete(r.behindAt, a.tok)
		r.concurrent = true
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := range 2 * len(r.replicas) {
			wg.Go(func() {
				if _, _, e := r.doVia(i%len(r.replicas), "GET", whoamiV3, a.tok, ""); e != nil {
					errs <- e
				}
			})
		}
		wg.Go(func() {
			method, path, body := "GET", "/_matrix/client/v3/sync", ""
			if o.B&1 != 0 {
				method, path, body = "POST", "/_matrix/client/v3/logout", "{}"
			}
			if _, _, e := r.doVia(r.via, method, path, a.tok, body); e != nil {
				errs <- e
			}
		})
		wg.Wait()
		r.concurrent = false
		close(errs)
		err = <-errs
	case opGuest:
		status, resp, e := r.do("POST", "/_matrix/client/v3/register?kind=guest", "", `{}`)
		if e != nil {
			return nil, false, e
		}
		var rr struct {
			UserID string `json:"user_id"`
		}
		if status == 200 && json.Unmarshal([]byte(resp), &rr) == nil {
			affected[rr.UserID] = true
		}
	case opMASLogin:
		// MAS issues the token itself: the proxy sees none of it until
		// the token is used.
		user := modelUser(o.A)
		affected[user] = true
		r.hs.issueMAS(user, modelDevices[int(o.B)%len(modelDevices)])
	case opMASLock:
		u := modelUser(o.B)
		affected[u] = true
		path, body := "/_synapse/mas/provision_user", fmt.Sprintf(`{"localpart":%q,"locked":%t}`, localpartOf(u), o.A&1 != 0)
		if o.A&2 != 0 {
			path, body = "/_synapse/mas/reactivate_user", fmt.Sprintf(`{"localpart":%q}`, localpartOf(u))
		}
		r.hs.mu.Lock()
		wasLocked := r.hs.masLocked[u]
		r.hs.mu.Unlock()
		status, _, e := r.do("POST", path, modelMASToken, body)
		if e != nil {
			return nil, false, e
		}
		if status == 200 && wasLocked && o.A&3 == 0 {
			// Unlocked: a negative answer cached during the lock lives
			// out NEGATIVE_TTL (Synapse's own introspection cache holds
			// the inactive answer longer).
			r.err401Until[u] = r.clock.Now().Add(modelNegativeTTL)
		}
	case opAdminLock:
		use(a)
		u := modelUser(o.B)
		affected[u] = true
		path := "/_synapse/admin/v2/users/" + url.PathEscape(u)
		if o.B&0x40 != 0 {
			path = "/_matrix/client/v1/admin/lock/" + url.PathEscape(u)
		}
		_, _, err = r.do("PUT", path, a.tok, fmt.Sprintf(`{"locked":%t}`, o.B&0x80 == 0))
	case opAdminUpdate:
		use(a)
		u := modelUser(o.B & 0x1f)
		affected[u] = true
		_, _, err = r.do("PUT", "/_synapse/admin/v2/users/"+url.PathEscape(u), a.tok, adminUpdates[o.B>>5])
	case opAdminSetAdmin:
		use(a)
		u := modelUser(o.B & 0x7f)
		affected[u] = true
		_, _, err = r.do("PUT", "/_synapse/admin/v1/users/"+url.PathEscape(u)+"/admin", a.tok, fmt.Sprintf(`{"admin":%t}`, o.B&0x80 == 0))
	case opAdminDeleteDevices:
		use(a)
		affected[b.user] = true
		dev, _ := json.Marshal(b.device)
		_, _, err = r.do("POST", "/_synapse/admin/v2/users/"+url.PathEscape(b.user)+"/delete_devices", a.tok, `{"devices":[`+string(dev)+`]}`)
	case opDehydrate:
		use(a)
		if o.B&0x80 != 0 {
			_, _, err = r.do("DELETE", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", a.tok, "")
			break
		}
		d, _ := json.Marshal(modelDevices[int(o.B&0x7f)%len(modelDevices)])
		_, _, err = r.do("PUT", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", a.tok,
			fmt.Sprintf(`{"device_id":%s,"device_data":{"algorithm":"m.dehydration.v1"}}`, d))
	case opAppservice:
		as := r.hs.tokens[0]
		if o.A&4 != 0 {
			as = r.hs.fence
		}
		use(as)
		q := url.Values{}
		if o.B&0x80 == 0 {
			u := modelUser(o.B)
			q.Set("user_id", u)
			affected[u] = true
		}
		if o.A&16 != 0 {
			q.Set("device_id", b.device)
			affected[b.user] = true
		}
		method, path, body := "POST", "/_matrix/client/v3/logout", "{}"
		switch o.A % 4 {
		case 1:
			path = "/_matrix/client/v3/logout/all"
		case 2:
			method, path, body = "GET", "/_matrix/client/v3/sync", ""
		case 3:
			method, path, body = "GET", whoamiV3, ""
		}
		if len(q) > 0 {
			path += "?" + q.Encode()
		}
		c := r.client
		if o.A&8 != 0 {
			c = r.inside
		}
		_, _, err = r.doFrom(r.via, c, method, path, as.tok, body)
	case opTokenless:
		u := modelUser(o.A)
		var status int
		if o.B&1 != 0 {
			lt := "valid:" + u
			if o.B&2 != 0 {
				lt = "forged"
			}
			status, _, err = r.do("POST", "/_synapse/client/oidc/backchannel_logout", "", url.Values{"logout_token": {lt}}.Encode())
		} else {
			sid := u
			if o.B&2 != 0 {
				sid = "nobody"
			}
			status, _, err = r.do("POST", "/_matrix/client/v3/account/password", "",
				fmt.Sprintf(`{"new_password":"y","auth":{"type":"m.login.email.identity","threepid_creds":{"sid":%q}}}`, sid))
		}
		if err != nil || status != 200 {
			// Refused: it concerns nobody.
			return affected, false, err
		}
		// README: a success flushes (no token names the user).
		return nil, true, nil
	case opBehindBack:
		affected[a.user] = true
		r.hs.mu.Lock()
		switch o.B % 3 {
		case 0:
			r.hs.revokeWhere(func(t *modelToken) bool { return t == a })
		case 1:
			r.hs.revokeWhere(func(t *modelToken) bool { return t.user == a.user && t.device == a.device })
		default:
			r.hs.revokeWhere(func(t *modelToken) bool { return t.user == a.user })
		}
		r.hs.mu.Unlock()
		r.markBehind(before)
	case opAdvance:
		r.clock.Advance(time.Duration(int(o.A)%90+1) * time.Second)
		return nil, true, nil
	case opUse:
		use(a)
		_, _, err = r.do("GET", "/_matrix/client/v3/sync", a.tok, "")
	case opRefresh:
		// A refresh carries no access token: not a use of a.
		affected[a.user] = true
		if a.refresh == "" {
			return affected, false, nil
		}
		status, resp, e := r.do("POST", "/_matrix/client/v3/refresh", "", fmt.Sprintf(`{"refresh_token":%q}`, a.refresh))
		if e != nil {
			return nil, false, e
		}
		if status == 200 {
			var rr struct {
				AccessToken string `json:"access_token"`
			}
			_ = json.Unmarshal([]byte(resp), &rr)
			r.replicas[r.via].expKnown[rr.AccessToken] = true
		}
		// README: the access token a refresh deletes lives until its
		// announced expiry or CACHE_TTL.
		r.markBehind(before)
	case opRestart:
		if err := r.quiesce(tb); err != nil {
			return nil, false, err
		}
		r.stop(r.via)
		if r.redis != nil {
			r.pubOff[r.via] = r.cumPublished(tb, r.via)
		}
		r.start(tb, r.via)
		r.waitBuses(tb)
		if r.redis != nil {
			r.rebase(tb, r.via)
		}
		return nil, true, nil
	case opRedisBounce:
		if r.redis == nil {
			return affected, false, nil
		}
		r.redis.bounce(tb, r)
		return nil, true, nil
	}
	if r.refused {
		// README: a revocation whose outcome the proxy saw refused
		// drops nothing, not even the caller's entries.
		clear(affected)
	}
	return affected, false, err
}

// liveSet is the set of tokens the model holds valid (ignoring expiry).
func (r *coherenceRig) liveSet() map[*modelToken]bool {
	r.hs.mu.Lock()
	defer r.hs.mu.Unlock()
	live := map[*modelToken]bool{}
	for _, t := range r.hs.tokens {
		if !t.revoked {
			live[t] = true
		}
	}
	return live
}

// markBehind records the tokens revoked since before as revoked behind the
// proxy's back.
func (r *coherenceRig) markBehind(before map[*modelToken]bool) {
	for t := range before {
		if t.revoked {
			r.behindAt[t.tok] = r.clock.Now()
		}
	}
}

// checkKey is one question the check asks: a whoami of a token,
// optionally masquerading, in the header or in the query, from the usual
// client address or from the one the fenced appservice's whitelist
// admits; or (fa) the forward-auth listener's answer for the token.
type checkKey struct {
	tok    *modelToken
	asUser string
	// asDevice is a device_id masquerade (MSC3202, as Synapse 1.163
	// reads it); msc3202 sends it under its unstable name, which
	// Synapse ignores.
	asDevice string
	msc3202  bool
	query    bool
	inside   bool
	fa       bool
	// faAdmin: forward-auth for a service only admins may use.
	faAdmin bool
}

func (k checkKey) ask() modelAsk {
	q := modelAsk{tok: k.tok.tok, asUser: k.asUser, hasUser: k.asUser != "", from: "127.0.0.1"}
	if k.asDevice != "" && !k.msc3202 {
		q.asDevice, q.hasDevice = k.asDevice, true
	}
	if k.inside {
		q.from = modelFencedAddr
	}
	return q
}

func (k checkKey) String() string {
	name := k.tok.tok
	switch {
	case k.faAdmin:
		name = "forward-auth (admin=true) of " + name
	case k.fa:
		name = "forward-auth of " + name
	}
	if k.query {
		name += " (query)"
	}
	if k.asUser != "" {
		name += " as " + k.asUser
	}
	if k.asDevice != "" {
		name += " device " + k.asDevice
		if k.msc3202 {
			name += " (unstable MSC3202 name)"
		}
	}
	if k.inside {
		name += " from " + modelFencedAddr
	}
	return name
}

func (r *coherenceRig) checkKeys() []checkKey {
	r.hs.mu.Lock()
	defer r.hs.mu.Unlock()
	var keys []checkKey
	bridged := map[string][]string{} // devices of live bridge tokens
	for _, t := range r.hs.tokens {
		keys = append(keys, checkKey{tok: t}, checkKey{tok: t, query: true}, checkKey{tok: t, fa: true}, checkKey{tok: t, fa: true, faAdmin: true})
		if !t.revoked && strings.HasPrefix(t.user, "@bridge_") && len(bridged[t.user]) < 2 && !slices.Contains(bridged[t.user], t.device) {
			bridged[t.user] = append(bridged[t.user], t.device)
		}
	}
	as := r.hs.tokens[0]
	for _, u := range []string{"@bridge_a:hs", "@bridge_b:hs", "@u1:hs"} {
		keys = append(keys, checkKey{tok: as, asUser: u})
	}
	keys = append(keys, checkKey{tok: as, asUser: "@bridge_a:hs", asDevice: "NODEV"},
		checkKey{tok: as, asUser: "@bridge_a:hs", asDevice: "D1", msc3202: true})
	for _, u := range []string{"@bridge_a:hs", "@bridge_b:hs"} {
		for _, d := range bridged[u] {
			keys = append(keys, checkKey{tok: as, asUser: u, asDevice: d})
		}
	}
	f := r.hs.fence
	keys = append(keys, checkKey{tok: f}, checkKey{tok: f, inside: true}, checkKey{tok: f, inside: true, asUser: "@fenced_a:hs"},
		checkKey{tok: f, inside: true, asUser: "@bridge_a:hs"}, checkKey{tok: f, asUser: "@fenced_a:hs"}, checkKey{tok: f, fa: true})
	return keys
}

// concerns says whether a step that concerns the users in affected
// concerns t: its user, or, for an appservice, any user it masquerades as.
func concerns(affected map[string]bool, t *modelToken) bool {
	if affected[t.user] {
		return true
	}
	if t.appservice {
		prefix := "@bridge_"
		if t.fenced {
			prefix = "@fenced_"
		}
		for u := range affected {
			if strings.HasPrefix(u, prefix) || (!t.fenced && u == "@u1:hs") {
				return true
			}
		}
	}
	return false
}

// check asks every key through the proxy and compares with the model.
func (r *coherenceRig) check(affected map[string]bool, all bool, callsBefore map[string]int) error {
	now := r.clock.Now()
	for i := range r.replicas {
		for _, k := range r.checkKeys() {
			err := r.checkOne(i, k, now, affected, all)
			// Another replica learns of the step over the bus, a moment
			// later: it is checked again until it agrees, a bounded number
			// of times (a quiescent point, not a deadline).
			for try := 0; err != nil && r.redis != nil && i != r.via && try < coherenceBusTries; try++ {
				time.Sleep(20 * time.Millisecond)
				err = r.checkOne(i, k, now, affected, all)
			}
			if err != nil {
				if len(r.replicas) > 1 {
					err = fmt.Errorf("replica %d: %w", i, err)
				}
				return err
			}
		}
	}
	// Entries of users the step does not concern must still be there.
	if !all {
		for _, k := range r.checkKeys() {
			if k.asUser != "" || k.asDevice != "" || k.query || k.fa || k.inside || !r.cached[k.tok.tok] || concerns(affected, k.tok) {
				continue
			}
			if a := r.hs.ask(k.ask()); a.status != 200 {
				continue
			}
			if n := r.hs.whoamiCount(k.tok.tok) - callsBefore[k.tok.tok+"||127.0.0.1"]; n > 0 {
				return fmt.Errorf("the step made the entry of %s (%s), whom it does not concern, vanish (%d re-fetches)", k.tok.tok, k.tok.user, n)
			}
		}
	}
	clear(r.cached)
	for _, k := range r.checkKeys() {
		if k.asUser == "" && k.asDevice == "" && !k.query && !k.fa && !k.inside && r.hs.ask(k.ask()).status == 200 {
			r.cached[k.tok.tok] = true
		}
	}
	return nil
}

// coherenceBusTries bounds the re-checks of a replica waiting for the bus.
const coherenceBusTries = 250

// checkOne asks one question through replica i and compares with the
// model. A wrong 401 is told apart by whom it hits: a token the step does
// not concern (never allowed: the proxy errs only for the caller in
// question), or the caller's (allowed only where the README says so).
func (r *coherenceRig) checkOne(i int, k checkKey, now time.Time, affected map[string]bool, all bool) error {
	var gotA modelAnswer
	if k.fa {
		st, hdr, err := r.forwardAuth(i, k.tok.tok, k.faAdmin)
		if err != nil {
			return err
		}
		gotA = modelAnswer{status: st, user: hdr.Get(headerUserID), device: hdr.Get(headerDeviceID), guest: hdr.Get(headerIsGuest) == "true"}
	} else {
		q := url.Values{}
		if k.asUser != "" {
			q.Set("user_id", k.asUser)
		}
		if k.asDevice != "" {
			name := paramDeviceID
			if k.msc3202 {
				name = paramMSC3202DeviceID
			}
			q.Set(name, k.asDevice)
		}
		tok := k.tok.tok
		if k.query {
			q.Set("access_token", tok)
			tok = ""
		}
		path := whoamiV3
		if len(q) > 0 {
			path += "?" + q.Encode()
		}
		var status int
		var body string
		var err error
		if k.inside {
			status, body, err = r.doFrom(i, r.inside, "GET", path, tok, "")
		} else {
			status, body, err = r.doVia(i, "GET", path, tok, "")
		}
		if err != nil {
			return err
		}
		var got struct {
			UserID   string `json:"user_id"`
			DeviceID string `json:"device_id"`
			IsGuest  bool   `json:"is_guest"`
		}
		_ = json.Unmarshal([]byte(body), &got)
		gotA = modelAnswer{status: status, user: got.UserID, device: got.DeviceID, guest: got.IsGuest}
	}
	wantA := r.hs.ask(k.ask())
	if k.fa {
		// Forward-auth reads no masquerade, and answers 401 for any
		// token the homeserver refuses; admin=true refuses others
		// than admins with 403.
		r.hs.mu.Lock()
		admin := r.hs.admins[wantA.user]
		r.hs.mu.Unlock()
		switch {
		case wantA.status != 200:
			wantA = modelAnswer{status: 401}
		case k.faAdmin && !admin:
			wantA = modelAnswer{status: 403}
		}
	}
	gotS, want := gotA.String(), wantA.String()
	key := fmt.Sprintf("%d|%v", i, k)
	if gotS != want {
		// A stale answer: a positive one (for admin=true, a refusal
		// to a valid non-admin too) repeated.
		positive := gotA.status == 200 || (k.faAdmin && gotA.status == 403)
		if wantA.status != 200 && positive && gotS == r.lastGood[key] && r.mayBeStale(i, k.tok, now) {
			return nil
		}
		if gotA.status == 401 && (wantA.status == 200 || (k.faAdmin && wantA.status == 403)) {
			// A negative answer cached while MAS had the user locked
			// outlives the unlock, whatever steps come next (Synapse's
			// own introspection cache keeps the inactive answer two
			// minutes).
			if now.Before(r.err401Until[k.tok.user]) {
				return nil
			}
			if !all && !concerns(affected, k.tok) {
				return fmt.Errorf("%s (%s): proxy says 401, homeserver %s, for a token the step does not concern (errs towards 401, but not only for the caller in question)", k, k.tok.user, want)
			}
			return fmt.Errorf("%s (%s): proxy says 401, homeserver %s (errs towards 401, but wrongly)", k, k.tok.user, want)
		}
		return fmt.Errorf("%s (%s): proxy says %q, homeserver %q", k, k.tok.user, gotS, want)
	}
	if gotA.status == 200 || (k.faAdmin && gotA.status == 403) {
		r.lastGood[key] = gotS
	}
	return nil
}

// forwardAuth asks replica i's forward-auth listener about tok, for a
// service that admits guests.
func (r *coherenceRig) forwardAuth(i int, tok string, admin bool) (int, http.Header, error) {
	policy := "guests=allow"
	if admin {
		policy += "&admin=true"
	}
	req, err := http.NewRequest("GET", r.replicas[i].auth.URL+"/auth?"+policy, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("X-Forwarded-Uri", "/protected/service")
	req.Header.Set("X-Forwarded-Method", "GET")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header, nil
}

// mayBeStale says whether the README lets the proxy still answer a
// positive whoami for t, which the homeserver no longer accepts.
func (r *coherenceRig) mayBeStale(i int, t *modelToken, now time.Time) bool {
	// MAS's tokens: the proxy asks MAS for their expiry.
	expKnown := r.replicas[i].expKnown[t.tok] || t.mas
	expired := !t.exp.IsZero() && now.After(t.exp)
	if at, ok := r.behindAt[t.tok]; ok && now.Before(at.Add(modelTTL)) && !(expKnown && expired) {
		return true
	}
	// Expiry the proxy did not see announced: a positive answer cached
	// before the expiry lives at most CACHE_TTL.
	return expired && !expKnown && now.Before(t.exp.Add(modelTTL))
}

func (r *coherenceRig) calls() map[string]int {
	r.hs.mu.Lock()
	defer r.hs.mu.Unlock()
	return maps.Clone(r.hs.whoamis)
}

// runCoherence runs ops and returns the first violation, naming the step.
func runCoherence(tb testing.TB, ops []modelOp) error {
	tb.Helper()
	r := newCoherenceRig(tb)
	defer r.close()
	return r.run(tb, ops)
}

// runCoherenceLearning is runCoherence with replicas that are not told the
// server name: they learn it from their first positive answer, and a MAS
// call before that can only flush.
func runCoherenceLearning(tb testing.TB, ops []modelOp) error {
	tb.Helper()
	r := newCoherenceRigWith(tb, 1, nil, func(c *Config) { c.ServerName = "" })
	defer r.close()
	return r.run(tb, ops)
}

func (r *coherenceRig) run(tb testing.TB, ops []modelOp) error {
	tb.Helper()
	r.waitBuses(tb)
	if err := r.check(nil, true, nil); err != nil {
		return fmt.Errorf("before any step: %w", err)
	}
	if err := r.quiesce(tb); err != nil {
		return err
	}
	for i, o := range ops {
		before := r.calls()
		affected, all, err := r.step(tb, o)
		if err == nil {
			err = r.quiesce(tb)
		}
		if err != nil {
			return fmt.Errorf("step %d %v: %w", i, o, err)
		}
		if err := r.check(affected, all, before); err != nil {
			return fmt.Errorf("after step %d %v: %w", i, o, err)
		}
		// What the check itself sent over the bus is carried before the
		// next step, so that it is not taken for the next step's doing.
		if err := r.quiesce(tb); err != nil {
			return fmt.Errorf("after step %d %v: %w", i, o, err)
		}
	}
	return nil
}

// shrinkOps finds a shorter sequence that still fails: it drops operations
// one at a time, then simplifies operands, within a bounded number of runs.
func shrinkOps(ops []modelOp, maxRuns int, run func([]modelOp) error) ([]modelOp, error) {
	err := run(ops)
	if err == nil {
		return ops, nil
	}
	runs := 1
	for changed := true; changed && runs < maxRuns; {
		changed = false
		for i := len(ops) - 1; i >= 0 && runs < maxRuns; i-- {
			cand := append(append([]modelOp(nil), ops[:i]...), ops[i+1:]...)
			runs++
			if e := run(cand); e != nil {
				ops, err, changed = cand, e, true
			}
		}
		for i := range ops {
			for _, simplify := range []func(modelOp) modelOp{
				func(o modelOp) modelOp { o.A = 0; return o },
				func(o modelOp) modelOp { o.B = 0; return o },
			} {
				simpler := simplify(ops[i])
				if simpler == ops[i] || runs >= maxRuns {
					continue
				}
				cand := append([]modelOp(nil), ops...)
				cand[i] = simpler
				runs++
				if e := run(cand); e != nil {
					ops, err, changed = cand, e, true
				}
			}
		}
	}
	return ops, err
}

// regressionTest prints ops as a unit test to paste; runner is the
// function that runs them (runCoherence, runCoherenceReplicas).
func regressionTest(ops []modelOp, err error, runner string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "// %v\nfunc TestCoherenceRegression(t *testing.T) {\n\tops := []modelOp{\n", err)
	for _, o := range ops {
		fmt.Fprintf(&b, "\t\t%v,\n", o)
	}
	fmt.Fprintf(&b, "\t}\n\tif err := %s(t, ops); err != nil {\n\t\tt.Fatal(err)\n\t}\n}\n", runner)
	return b.String()
}

// FuzzCoherence decodes its input into operations and checks the proxy
// against the model after each. Its seed corpus (testdata/fuzz/
// FuzzCoherence) runs in go test; go test -fuzz FuzzCoherence ./proxy
// explores further.
func FuzzCoherence(f *testing.F) {
	for _, seed := range coherenceSeeds {
		f.Add(encodeOps(seed))
	}
	for _, seed := range learningSeeds {
		f.Add(append(encodeOps(seed), 0))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ops := decodeOps(data)
		// An input one byte longer than its operations runs replicas
		// that learn the server name.
		run, runner := runCoherence, "runCoherence"
		if len(data)%3 == 1 {
			run, runner = runCoherenceLearning, "runCoherenceLearning"
		}
		if err := run(t, ops); err != nil {
			shrunk, serr := shrinkOps(ops, 300, func(ops []modelOp) error { return run(t, ops) })
			if serr == nil {
				serr = fmt.Errorf("did not fail again when re-run (timing-dependent): %w", err)
			}
			t.Fatalf("%v\nshortest failing sequence found, as a test:\n\n%s", err, regressionTest(shrunk, serr, runner))
		}
	})
}

// coherenceSeeds are sequences that reach each operation at least once.
var coherenceSeeds = [][]modelOp{
	{{opLogin, 1, 0}, {opLogin, 2, 1}, {opWhoami, 1, 0}, {opLogout, 1, 0}, {opWhoami, 2, 1}},
	{{opLogin, 1, 1}, {opLogin, 1, 2}, {opLogoutAll, 1, 0}, {opLogin, 2, 0}, {opUse, 3, 0}},
	{{opLogin, 1, 1}, {opLogin, 1, 2}, {opDeleteDevice, 1, 3}, {opDeleteDevice, 1, 2}, {opDeleteDevices, 1, 1}, {opDeleteDevices, 1, 2}},
	{{opLogin, 1, 1}, {opLogin, 1, 2}, {opLogin, 2, 0}, {opPassword, 1, 1}, {opPassword, 1, 0}, {opPassword, 3, 2}},
	{{opLogin, 1, 0}, {opLogin, 2, 0}, {opDeactivate, 1, 1}, {opDeactivate, 1, 0}, {opDeactivate, 2, 0}},
	{{opLogin, 0, 0}, {opLogin, 1, 0}, {opLogin, 3, 0}, {opAdminDeactivate, 2, 0}, {opAdminDeactivate, 1, 1}, {opAdminDeleteDevice, 1, 3}},
	{{opLogin, 1, 1}, {opLogin, 3, 0}, {opMASDeleteDevice, 0, 1}, {opMASDeleteUser, 0, 3}, {opWhoami, 0, 2 | 3<<2}},
	{{opLogin, 1, 0}, {opLogin, 2, 0}, {opBehindBack, 1, 0}, {opAdvance, 30, 0}, {opUse, 1, 0}, {opBehindBack, 2, 2}, {opAdvance, 89, 0}, {opAdvance, 89, 0}},
	{{opLogin, 1, 0x81}, {opAdvance, 10, 0}, {opRefresh, 1, 0}, {opRefresh, 2, 0}, {opAdvance, 25, 0}, {opWhoami, 3, 0}, {opAdvance, 60, 0}},
	{{opLogin, 1, 0x80}, {opLogin, 2, 0}, {opRestart, 0, 0}, {opAdvance, 40, 0}, {opWhoami, 1, 1}, {opAdvance, 89, 0}, {opAdvance, 89, 0}},
	// Odd device IDs, through every version prefix.
	{{opLogin, 1, 3}, {opLogin, 1, 4}, {opLogin, 1, 5}, {opLogin, 2, 6}, {opLogin, 2, 7}, {opLogin, 0, 8},
		{opDeleteDevice, 1, 2}, {opDeleteDevice, 65, 3}, {opDeleteDevices, 129, 4}, {opAdminDeleteDevice, 6, 5}, {opAdminDeleteDevice, 198, 3}, {opLogout, 4, 0}},
	// Clients hanging up before the answer.
	{{opLogin, 1, 0}, {opLogin, 2, 0}, {opLogin, 1, 1}, {opLogin, 0, 0}, {opLogin, 2, 2}, {opLogout, 1, 0x40}, {opLogoutAll, 2, 0x40},
		{opDeleteDevice, 3, 0x40}, {opPassword, 5, 0x40}, {opDeactivate, 5, 0x40}, {opAdminDeactivate, 4, 0x40 | 1}, {opDeleteDevice, 3, 0x41}},
	{{opLogin, 0, 0}, {opLogin, 1, 1}, {opLogin, 1, 2}, {opLogin, 0, 3}, {opMASSyncDevices, 0, 2}, {opAdminResetPassword, 1, 0x41},
		{opAdminResetPassword, 1, 1}, {opAdminResetPassword, 1, 0}, {opLogin, 2, 0}, {opAdminResetPassword, 5, 2}},
	{{opLogin, 1, 0}, {opLogin, 2, 0}, {opBurst, 1, 0}, {opBurst, 1, 1}, {opBehindBack, 2, 0}, {opBurst, 2, 0}},
	{{opLogin, 4, 0}, {opWhoami, 0, 2 | 4<<2}, {opWhoami, 0, 2 | 1<<2}, {opAdminDeactivate, 0, 4}, {opLogin, 0, 0}, {opAdminDeactivate, 2, 4}},
	// Guests, and a guest trying a revoking call.
	{{opLogin, 1, 0}, {opGuest, 0, 0}, {opWhoami, 2, 0}, {opLogout, 2, 0}, {opDeactivate, 2, 0}, {opUse, 2, 0}},
	// MAS: tokens it issues expire, told only by introspection; locks,
	// unlocks, reactivation.
	{{opMASLogin, 1, 1}, {opLogin, 2, 0}, {opMASLogin, 1, 2}, {opWhoami, 1, 0}, {opAdvance, 40, 0}, {opWhoami, 3, 1}, {opAdvance, 15, 0},
		{opMASLock, 1, 2}, {opWhoami, 2, 0}, {opMASLock, 0, 2}, {opAdvance, 5, 0}, {opMASLock, 1, 2}, {opMASDeleteUser, 0, 2}, {opMASLock, 2, 2}, {opLogin, 2, 0}},
	// Locks through the admin API and MSC4323 (which Synapse 1.163 does
	// not serve), a locked user logging out.
	{{opLogin, 0, 0}, {opLogin, 1, 1}, {opLogin, 2, 0}, {opAdminLock, 1, 1}, {opWhoami, 2, 0}, {opAdminLock, 1, 0x40 | 2}, {opLogout, 2, 0},
		{opAdminLock, 1, 0x80 | 1}, {opAdminLock, 2, 1}, {opAdminLock, 1, 0x40 | 0x80 | 2}},
	// Dehydrated devices: replacing one deletes the previous device,
	// even when it has the same ID.
	{{opLogin, 1, 1}, {opLogin, 1, 2}, {opLogin, 2, 0}, {opDehydrate, 1, 2}, {opDehydrate, 1, 2}, {opDehydrate, 1, 3}, {opDehydrate, 3, 0x80}, {opDehydrate, 3, 0x80}},
	// Appservices: masquerading users and devices, the fenced one from
	// both sides of its whitelist.
	{{opLogin, 3, 1}, {opLogin, 3, 2}, {opLogin, 4, 0}, {opLogin, 5, 0}, {opAppservice, 3, 3}, {opAppservice, 16 | 3, 1}, {opAppservice, 16, 1},
		{opAppservice, 2, 0x80}, {opAppservice, 8 | 4 | 3, 5}, {opAppservice, 4 | 2, 0x80}, {opAppservice, 8 | 4 | 2, 0x80}, {opAppservice, 8 | 4 | 1, 5}, {opAppservice, 1, 4}},
	// An appservice logging out a bridged user's device (device_id
	// masquerade), then the user.
	{{opLogin, 3, 1}, {opLogin, 3, 2}, {opLogin, 4, 0}, {opLogin, 5, 0}, {opLogin, 1, 0}, {opAppservice, 16 | 3, 9}, {opAppservice, 16, 9},
		{opAppservice, 16 | 3, 9}, {opAppservice, 16 | 1, 15}},
	// The admin API's user update: deactivating, reactivating, a new
	// password with and without logging out, nothing that revokes, a
	// refused body, the admin's own user.
	{{opLogin, 0, 1}, {opLogin, 1, 1}, {opLogin, 1, 2}, {opLogin, 2, 1}, {opAdminUpdate, 1, 2<<5 | 1}, {opAdminUpdate, 1, 4<<5 | 2},
		{opAdminUpdate, 1, 5<<5 | 2}, {opAdminUpdate, 1, 3<<5 | 2}, {opAdminUpdate, 1, 2<<5 | 0}, {opAdminUpdate, 1, 0<<5 | 2},
		{opAdminUpdate, 1, 1<<5 | 2}, {opLogin, 2, 0}, {opAdminUpdate, 1, 6<<5 | 2}, {opAdminUpdate, 1, 7<<5 | 1}},
	// A refused call from another address than the check's: the
	// appservice's answers are kept per client address, so its caller
	// lookup is no dropped entry (found by the random driver).
	{{opAppservice, 249, 232}}, {{opAppservice, 19, 133}},
	// Admin status, which forward-auth's admin=true reads, and the admin
	// API's delete_devices.
	{{opLogin, 0, 0}, {opLogin, 1, 1}, {opLogin, 1, 2}, {opLogin, 2, 0}, {opAdminSetAdmin, 1, 1}, {opAdminDeleteDevices, 2, 3},
		{opAdminSetAdmin, 2, 0x80}, {opAdminSetAdmin, 1, 0x80}, {opAdminSetAdmin, 3, 0x80 | 1}, {opAdminDeleteDevices, 1, 2}, {opAdminUpdate, 1, 7<<5 | 2}},
	// A negative answer cached during a MAS lock outlives the unlock
	// (found by the random driver: the check took it for the next step's
	// doing).
	{{opMASLogin, 105, 0}, {opMASLock, 237, 249}, {opMASLock, 0, 249}, {opLogout, 0, 0}},
	// Logging out with an expired token: Synapse deletes the device (or,
	// with logout/all, the user's every device), which the proxy cannot
	// name.
	{{opLogin, 1, 0x81}, {opAdvance, 19, 0}, {opRefresh, 1, 0}, {opAdvance, 14, 0}, {opWhoami, 2, 0}, {opLogout, 1, 0}, {opAdvance, 19, 0}},
	{{opLogin, 1, 0x81}, {opLogin, 1, 2}, {opWhoami, 2, 0}, {opAdvance, 35, 0}, {opLogoutAll, 1, 0}, {opAdvance, 89, 0}, {opAdvance, 40, 0}},
	// Calls without a token: refused ones drop nothing, successes flush.
	{{opLogin, 1, 0}, {opLogin, 2, 0}, {opTokenless, 1, 2}, {opTokenless, 1, 3}, {opWhoami, 2, 0}, {opTokenless, 1, 0}, {opLogin, 2, 1}, {opTokenless, 2, 1}},
}

// learningSeeds run with replicas that learn the server name: MAS's calls
// before any positive answer, after one, and after a restart forgot it.
var learningSeeds = [][]modelOp{
	{{opLogin, 1, 0}, {opMASDeleteDevice, 0, 1}, {opLogin, 2, 1}, {opWhoami, 2, 0}, {opMASLock, 1, 3}, {opMASDeleteUser, 0, 1},
		{opRestart, 0, 0}, {opMASSyncDevices, 0, 2}, {opLogin, 3, 0}, {opWhoami, 3, 0}, {opMASLock, 0, 4}},
	{{opMASLogin, 1, 1}, {opMASLock, 1, 1}, {opWhoami, 1, 0}, {opMASLock, 0, 1}, {opLogin, 2, 0}, {opWhoami, 2, 0}, {opMASLock, 1, 1}},
}

// The check must see what it is there to see: a stale answer the README
// does not allow, and a step that made other users' entries vanish.
func TestCoherenceCheckCatches(t *testing.T) {
	tests := []struct {
		name   string
		break_ func(r *coherenceRig) (affected map[string]bool)
		want   string
	}{
		{
			name: "a revocation the check was not told is behind the proxy's back",
			break_: func(r *coherenceRig) map[string]bool {
				r.hs.mu.Lock()
				r.hs.revokeWhere(func(t *modelToken) bool { return t.user == "@u1:hs" })
				r.hs.mu.Unlock()
				return map[string]bool{"@u1:hs": true}
			},
			want: `proxy says "200 @u1:hs D1 guest=false", homeserver "401"`,
		},
		{
			name: "a step concerning @u1 that empties the cache",
			break_: func(r *coherenceRig) map[string]bool {
				r.stop(0)
				r.start(t, 0)
				return map[string]bool{"@u1:hs": true}
			},
			want: "whom it does not concern, vanish",
		},
		{
			name: "a step concerning @u1 after which @u2's token gets a wrong 401",
			break_: func(r *coherenceRig) map[string]bool {
				wrong401(t, r, 2)
				return map[string]bool{"@u1:hs": true}
			},
			want: "for a token the step does not concern",
		},
		{
			name: "a step concerning @u2 after which @u2's token gets a wrong 401",
			break_: func(r *coherenceRig) map[string]bool {
				wrong401(t, r, 2)
				return map[string]bool{"@u2:hs": true}
			},
			want: "errs towards 401, but wrongly",
		},
		{
			name: "forward-auth's admin=true answer outliving a demotion behind the proxy's back",
			break_: func(r *coherenceRig) map[string]bool {
				// The setup's check cached @u0's admin status.
				r.hs.mu.Lock()
				r.hs.admins[modelAdmin] = false
				r.hs.mu.Unlock()
				return map[string]bool{modelAdmin: true}
			},
			want: `forward-auth (admin=true) of syt_u0_3 (@u0:hs): proxy says "200 @u0:hs NEW3 guest=false", homeserver "403"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newCoherenceRig(t)
			defer r.close()
			for _, o := range []modelOp{{opLogin, 1, 1}, {opLogin, 2, 2}, {opLogin, 0, 0}} {
				if _, _, err := r.step(t, o); err != nil {
					t.Fatal(err)
				}
			}
			if err := r.check(nil, true, nil); err != nil {
				t.Fatal(err)
			}
			before := r.calls()
			affected := tt.break_(r)
			err := r.check(affected, false, before)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("check says %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// wrong401 makes the proxy answer 401 for token i, which the model still
// holds valid: revoked for a moment, used (passive invalidation), asked (a
// negative answer is cached), revived.
func wrong401(t *testing.T, r *coherenceRig, i uint8) {
	t.Helper()
	tok := r.token(i)
	r.hs.mu.Lock()
	tok.revoked = true
	r.hs.mu.Unlock()
	if st, _, err := r.do("GET", "/_matrix/client/v3/sync", tok.tok, ""); err != nil || st != 401 {
		t.Fatalf("sync of a revoked token: %d %v", st, err)
	}
	if st, _, err := r.do("GET", whoamiV3, tok.tok, ""); err != nil || st != 401 {
		t.Fatalf("whoami of a revoked token: %d %v", st, err)
	}
	r.hs.mu.Lock()
	tok.revoked = false
	r.hs.mu.Unlock()
}

func TestShrinkOpsPrintsShortestSequence(t *testing.T) {
	// A stand-in failure: a logout followed, later, by a deactivation.
	fails := func(ops []modelOp) error {
		seen := false
		for _, o := range ops {
			seen = seen || o.Kind == opLogout
			if seen && o.Kind == opDeactivate {
				return fmt.Errorf("failed")
			}
		}
		return nil
	}
	var ops []modelOp
	for i := range 20 {
		ops = append(ops, modelOp{opKind(i % int(numOps)), uint8(i), uint8(3 * i)})
	}
	ops = append(ops, modelOp{opDeactivate, 7, 9})
	got, err := shrinkOps(ops, 1000, fails)
	want := []modelOp{{opLogout, 0, 0}, {opDeactivate, 0, 0}}
	if err == nil || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("shrunk to %v (%v), want %v", got, err, want)
	}
	test := regressionTest(got, err, "runCoherence")
	for _, line := range []string{"func TestCoherenceRegression(t *testing.T) {", "{opLogout, 0, 0},", "{opDeactivate, 0, 0},", "runCoherence(t, ops)"} {
		if !strings.Contains(test, line) {
			t.Errorf("printed test lacks %q:\n%s", line, test)
		}
	}
}

// A client hanging up: the call reaches the homeserver, the client is gone
// before the answer, and the proxy still drops the token.
func TestCoherenceHangUp(t *testing.T) {
	r := newCoherenceRig(t)
	defer r.close()
	if _, _, err := r.step(t, modelOp{opLogin, 1, 1}); err != nil {
		t.Fatal(err)
	}
	if err := r.check(nil, true, nil); err != nil {
		t.Fatal(err)
	}
	tok := r.token(1)
	var arrived chan struct{}
	r.hs.mu.Lock()
	r.hs.onHold = func(h *modelHold) { arrived = h.arrived }
	r.hs.mu.Unlock()
	if _, _, err := r.step(t, modelOp{opLogout, 1, 0x40}); err != nil {
		t.Fatal(err)
	}
	if arrived == nil {
		t.Fatal("the logout was not held at the homeserver")
	}
	if a := r.hs.answer(tok.tok, ""); a.status != 401 {
		t.Fatalf("the homeserver did not log out: %v", a)
	}
	if err := r.check(nil, true, nil); err != nil {
		t.Fatal(err)
	}
}
