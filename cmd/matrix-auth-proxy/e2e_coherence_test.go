package main_test

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestE2ECoherence is the coherence driver of proxy/coherence_test.go with
// the real Synapse as the model. Two proxy replicas share a real Redis bus,
// each in front of the shared Synapse through its own relay (e2eCohRelay),
// which counts the replica's whoami lookups. Seeded-random operations
// (e2eCohKind) run through either replica, and after every step, for every
// token ever issued (header and query, the appservice's also masqueraded),
// a whoami through each replica must answer what Synapse answers, except
// where the README says the proxy cannot know (mayBeStale); and no replica
// may have looked up again, before its entry could expire, a live token of
// a user the step (or the one before) did not concern. E2E_COHERENCE_OPS
// sets the count (default 200), COHERENCE_SEED replays a seed. A failing
// sequence is shrunk (at most E2E_COHERENCE_SHRINK_RUNS runs, default 40)
// and printed as a test to paste; E2E_COHERENCE_LOGS=dir keeps the
// replicas' logs of the last failing run there.
func TestE2ECoherence(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	env := e2eCohSetup(t)
	seed := e2eCohEnvNum(t, "COHERENCE_SEED", uint64(time.Now().UnixNano()))
	t.Logf("COHERENCE_SEED=%d", seed)
	ops := e2eCohRandomOps(rand.New(rand.NewPCG(seed, 0)), int(e2eCohEnvNum(t, "E2E_COHERENCE_OPS", 200)))
	start := time.Now()
	err := env.run(t, ops)
	t.Logf("%d operations in %v", len(ops), time.Since(start).Round(time.Millisecond))
	if err == nil {
		return
	}
	t.Logf("COHERENCE_SEED=%d: %v\nshrinking…", seed, err)
	runs := int(e2eCohEnvNum(t, "E2E_COHERENCE_SHRINK_RUNS", 40))
	shrunk, serr := e2eCohShrink(ops, err, runs, time.Now().Add(4*time.Minute), func(ops []e2eCohOp) error { return env.run(t, ops) })
	t.Fatalf("COHERENCE_SEED=%d: %v\nshortest failing sequence found, as a test:\n\n%s", seed, err, e2eCohRegressionTest(shrunk, serr))
}

// e2eCohEnvNum reads a number from the environment, def if unset.
func e2eCohEnvNum(t *testing.T, name string, def uint64) uint64 {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return n
}

// e2eRunCoherence runs ops on a fresh rig (fresh users, the shared Synapse):
// what the printed regression tests call.
func e2eRunCoherence(t *testing.T, ops []e2eCohOp) error {
	t.Helper()
	return e2eCohSetup(t).run(t, ops)
}

// e2eCohKind is an operation of the language (operands A and B).
type e2eCohKind uint8

const (
	e2eOpLogin              e2eCohKind = iota // user A; B&0x7f: a device ID of e2eCohDevices (0: a new one), B&0x80: refreshable
	e2eOpWhoami                               // token A; B&1: in the query; B&2: masquerading as e2eCohRig.masq[B>>2]
	e2eOpLogout                               // token A; B&0x40: the client hangs up before the answer
	e2eOpLogoutAll                            // token A; B&0x40: hangs up
	e2eOpDeleteDevice                         // token A deletes the device of token B (UIA); B&1: without auth (refused); B&0x40: hangs up
	e2eOpDeleteDevices                        // the same with POST delete_devices
	e2eOpPassword                             // token A (UIA); B&1: without auth; B&2: logout_devices false; B&0x40: hangs up
	e2eOpDeactivate                           // token A (UIA); B&1: without auth; B&0x40: hangs up
	e2eOpAdminDeactivate                      // the admin deactivates user B; B&0x40: hangs up
	e2eOpAdminDeleteDevice                    // the admin deletes the device of token B; B&0x40: hangs up
	e2eOpAdminResetPassword                   // the admin resets the password of user B; B&2: logout_devices false
	e2eOpBehindBack                           // directly on Synapse: B%4: logout A, logout/all A, admin delete A's device, admin deactivate A's user
	e2eOpAdvance                              // time passes: (A%8+1)×250ms
	e2eOpUse                                  // token A makes a non-whoami request (GET devices)
	e2eOpRefresh                              // the refresh token of token A
	e2eOpRestart                              // the replica restarts
	e2eOpRedis                                // Redis goes away; it comes back at the next e2eOpRedis or e2eCohMaxDown steps later
	e2eOpBurst                                // concurrent clients: whoamis of token A through both replicas while, B%4: A syncs, logs out, its device logs in again, A logs out all
	e2eNumOps

	// e2eVia2, or-ed into a kind, sends the operation through replica 1.
	e2eVia2 e2eCohKind = 0x80
)

var e2eCohNames = [e2eNumOps]string{
	"e2eOpLogin", "e2eOpWhoami", "e2eOpLogout", "e2eOpLogoutAll", "e2eOpDeleteDevice", "e2eOpDeleteDevices",
	"e2eOpPassword", "e2eOpDeactivate", "e2eOpAdminDeactivate", "e2eOpAdminDeleteDevice", "e2eOpAdminResetPassword",
	"e2eOpBehindBack", "e2eOpAdvance", "e2eOpUse", "e2eOpRefresh", "e2eOpRestart", "e2eOpRedis", "e2eOpBurst",
}

// e2eCohOp is one operation.
type e2eCohOp struct {
	Kind e2eCohKind
	A, B uint8
}

func (o e2eCohOp) String() string {
	name := e2eCohNames[o.Kind&^e2eVia2%e2eNumOps]
	if o.Kind&e2eVia2 != 0 {
		name += " | e2eVia2"
	}
	return fmt.Sprintf("{%s, %d, %d}", name, o.A, o.B)
}

// e2eCohWeights: how often e2eCohRandomOps draws each kind.
var e2eCohWeights = [e2eNumOps]int{
	e2eOpLogin: 14, e2eOpWhoami: 8, e2eOpLogout: 8, e2eOpLogoutAll: 3, e2eOpDeleteDevice: 5, e2eOpDeleteDevices: 5,
	e2eOpPassword: 4, e2eOpDeactivate: 1, e2eOpAdminDeactivate: 1, e2eOpAdminDeleteDevice: 4, e2eOpAdminResetPassword: 2,
	e2eOpBehindBack: 6, e2eOpAdvance: 3, e2eOpUse: 8, e2eOpRefresh: 8, e2eOpRestart: 1, e2eOpRedis: 1, e2eOpBurst: 6,
}

func e2eCohRandomOps(rng *rand.Rand, n int) []e2eCohOp {
	total := 0
	for _, w := range e2eCohWeights {
		total += w
	}
	ops := make([]e2eCohOp, 0, n)
	for i := range n {
		k, x := e2eCohKind(0), rng.IntN(total)
		for ; x >= e2eCohWeights[k]; k++ {
			x -= e2eCohWeights[k]
		}
		if i < 4 {
			k = e2eOpLogin
		}
		if rng.IntN(2) == 0 {
			k |= e2eVia2
		}
		ops = append(ops, e2eCohOp{k, uint8(rng.UintN(256)), uint8(rng.UintN(256))})
	}
	return ops
}

const (
	// e2eCohTTL is CACHE_TTL: short, so that what the proxy cannot see
	// converges within the run (and the check sees that it does).
	e2eCohTTL = 4 * time.Second
	// e2eCohDownTTL is REDIS_DOWN_CACHE_TTL.
	e2eCohDownTTL = 2 * time.Second
	// e2eCohMargin absorbs the clocks of three processes reading one
	// moment differently (a bound's edge, never a performance figure).
	e2eCohMargin = 150 * time.Millisecond
	// e2eCohMaxDown bounds an outage, in steps (reconnection backs off).
	e2eCohMaxDown = 6
	// e2eCohMaxTokens bounds the tokens a run issues (logins and
	// refreshes past it are skipped), so that the check stays bounded.
	e2eCohMaxTokens = 48
	// e2eCohBusTries bounds the re-checks of a replica waiting for the bus.
	e2eCohBusTries = 100
	// e2eCohDeadEvery: how often a long-dead token is checked, in steps.
	e2eCohDeadEvery = 4
)

// e2eCohDevices are the device IDs logins name: Synapse takes any string.
var e2eCohDevices = []string{"", "D0", "D1", "..", "a/b", "%2E", "é", "D 1"}

// e2eCohEnv is what every run of a test shares: Synapse, Redis, the hash key.
type e2eCohEnv struct {
	syn    *e2eSynapse
	redis  *e2eBusRedis
	key    string
	bridge []string // bridge users registered by the appservice
	client *http.Client
}

func e2eCohSetup(t *testing.T) *e2eCohEnv {
	t.Helper()
	e2eShort(t)
	e := &e2eCohEnv{redis: e2eBusStartRedis(t), syn: e2eSharedSynapse(t), key: e2eRandHex() + e2eRandHex()}
	e.syn.DumpOnFailure(t)
	e.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	t.Cleanup(e.client.CloseIdleConnections)
	for range 2 {
		name := e.syn.Bridge.Prefix + e2eRandHex()
		e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, e.syn.URL+"/_matrix/client/v3/register", e.syn.Bridge.Token,
			map[string]any{"type": "m.login.application_service", "username": name, "inhibit_login": true}))
		e.bridge = append(e.bridge, "@"+name+":localhost")
	}
	return e
}

// e2eCohCred names a credential (a token and masquerade) without holding
// the token: what the relay counts lookups by.
func e2eCohCred(token, asUser string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:12]) + "|" + asUser
}

// e2eCohRelay sits between one replica and Synapse. It records, by
// credential, when the replica last stored a positive answer (a cacheable
// whoami 200 it fetched), which token expiries it saw announced, and every
// lookup made before the stored answer could have expired: an entry that
// vanished. It can hold the answer to the next non-whoami call until
// released (a client hanging up).
type e2eCohRelay struct {
	srv    *httptest.Server
	once   sync.Once
	target string
	tr     *http.Transport
	mu     sync.Mutex
	// fetched: when the last cacheable answer reached the replica (no
	// earlier than the replica's own reading, so a lower bound).
	fetched map[string]time.Time
	exp     map[string]time.Time // by e2eCohCred(token, ""): no later than the replica's reading
	early   []string
	// earlyWhy explains each early lookup, for a failure's report.
	earlyWhy []string
	hold     *e2eCohHold
}

// e2eCohHold is a held call: arrived is closed once Synapse answered it,
// and the answer goes on when release is closed.
type e2eCohHold struct{ arrived, release chan struct{} }

func e2eCohStartRelay(t testing.TB, target string) *e2eCohRelay {
	r := &e2eCohRelay{target: target, tr: &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 16}}
	r.reset()
	r.srv = httptest.NewServer(r)
	t.Cleanup(r.close)
	return r
}

func (r *e2eCohRelay) close() {
	r.once.Do(func() {
		r.srv.Close()
		r.tr.CloseIdleConnections()
	})
}

// reset forgets what the replica knew (it restarted).
func (r *e2eCohRelay) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fetched, r.exp, r.early, r.earlyWhy = map[string]time.Time{}, map[string]time.Time{}, nil, nil
}

// takeEarly returns the credentials looked up too early since last asked.
func (r *e2eCohRelay) takeEarly() ([]string, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, why := r.early, r.earlyWhy
	r.early, r.earlyWhy = nil, nil
	return e, why
}

// knowsExp says whether the replica saw the token's expiry announced.
func (r *e2eCohRelay) knowsExp(token string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.exp[e2eCohCred(token, "")]
	return ok
}

func (r *e2eCohRelay) holdNext() *e2eCohHold {
	h := &e2eCohHold{arrived: make(chan struct{}), release: make(chan struct{})}
	r.mu.Lock()
	r.hold = h
	r.mu.Unlock()
	return h
}

func (r *e2eCohRelay) ServeHTTP(w http.ResponseWriter, in *http.Request) {
	body, err := io.ReadAll(in.Body)
	if err != nil {
		http.Error(w, "relay: "+err.Error(), http.StatusBadGateway)
		return
	}
	whoami := in.Method == http.MethodGet && strings.HasSuffix(in.URL.Path, "/account/whoami")
	var cred, asUser string
	var hold *e2eCohHold
	r.mu.Lock()
	if whoami {
		q := in.URL.Query()
		tok := strings.TrimPrefix(in.Header.Get("Authorization"), "Bearer ")
		if tok == "" {
			tok = q.Get("access_token")
		}
		asUser = q.Get("user_id")
		cred = e2eCohCred(tok, asUser)
		if f, ok := r.fetched[cred]; ok {
			end := f.Add(e2eCohTTL)
			if x, ok := r.exp[e2eCohCred(tok, "")]; ok && x.Before(end) {
				end = x
			}
			if now := time.Now(); now.Before(end.Add(-e2eCohMargin)) {
				r.early = append(r.early, cred)
				r.earlyWhy = append(r.earlyWhy, fmt.Sprintf("%s: fetched at %s, expected to live until %s, looked up at %s",
					cred, f.Format("15:04:05.000"), end.Format("15:04:05.000"), now.Format("15:04:05.000")))
			}
		}
	} else {
		hold, r.hold = r.hold, nil
	}
	r.mu.Unlock()
	// Synapse gets a held call whole.
	resp, answer, err := e2eRelayForward(in, body, r.target, r.tr, hold != nil)
	if err != nil {
		http.Error(w, "relay: "+err.Error(), http.StatusBadGateway)
		return
	}
	var a struct {
		UserID      string `json:"user_id"`
		DeviceID    string `json:"device_id"`
		AccessToken string `json:"access_token"`
		ExpiresInMS int64  `json:"expires_in_ms"`
	}
	_ = json.Unmarshal(answer, &a)
	now := time.Now()
	r.mu.Lock()
	switch {
	case whoami && resp.StatusCode == http.StatusOK && a.UserID != "" && (asUser == "" || asUser == a.UserID):
		r.fetched[cred] = now
	case whoami:
		delete(r.fetched, cred)
	case resp.StatusCode == http.StatusOK && a.AccessToken != "" && a.ExpiresInMS > 0:
		r.exp[e2eCohCred(a.AccessToken, "")] = now.Add(time.Duration(a.ExpiresInMS) * time.Millisecond)
	}
	r.mu.Unlock()
	if hold != nil {
		close(hold.arrived)
		select {
		case <-hold.release:
		case <-time.After(20 * time.Second):
		}
	}
	for k, vs := range resp.Header {
		if !slices.Contains(e2eHopHeaders, http.CanonicalHeaderKey(k)) {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(answer)
}

// e2eCohTok is a token ever issued, and what the check knows of it.
type e2eCohTok struct {
	tok, refresh   string
	user           *e2eUser // nil: the appservice's token
	userID, device string
	// expLo, expHi bracket Synapse's expiry of a refreshable token.
	expLo, expHi time.Time
	dead         bool // Synapse said 401: for good
	diedAt       int  // the step when it died
	// Per replica: since when the README lets it answer a revoked token
	// (behindAt: revoked where no replica could see it; downAt: through
	// another replica while the bus was down), and when the token was last
	// used (a 401 then drops it).
	behindAt, downAt, usedAt [2]time.Time
	// staleAt: replica i was let answer it stale (the check then wants
	// to see it converge).
	staleAt [2]bool
}

// e2eCohRig is one run: two replicas, their relays, users, tokens.
type e2eCohRig struct {
	env   *e2eCohEnv
	t     *testing.T
	reps  [2]*e2eCohReplica
	admin *e2eUser
	users []*e2eUser
	masq  []string // who whoamis masquerade as: bridge users, a user outside the namespace, one never registered

	mu    sync.Mutex // guards toks, owner (bursts)
	toks  []*e2eCohTok
	owner map[string]string // credential → the user whose entry it is

	// seen counts what the run exercised (logged at its end).
	seen   map[string]int
	seenMu sync.Mutex

	via       int
	busDown   bool
	downSteps int
	trace     []string
	// The step under check: its start, and how its revocations count.
	stepStart time.Time
	behind    bool       // the proxy cannot see what this step revokes
	caller    *e2eCohTok // the token of a revoking call through a replica
}

type e2eCohReplica struct {
	px       *e2eProxy
	relay    *e2eCohRelay
	mu       sync.Mutex
	lastGood map[string]string // by credential: the last 200 it answered
}

func (e *e2eCohEnv) proxyEnv() map[string]string {
	return map[string]string{
		"CACHE_TTL": e2eCohTTL.String(), "REDIS_DOWN_CACHE_TTL": e2eCohDownTTL.String(),
		"REDIS_URL": "redis://" + e.redis.addr, "TOKEN_HASH_KEY": e.key, "RATE_LIMIT_RPS": "0",
	}
}

func (e *e2eCohEnv) newRig(t *testing.T) *e2eCohRig {
	t.Helper()
	if e.redis.cmd == nil {
		e.redis.Start(t) // a previous run left it down
	}
	r := &e2eCohRig{env: e, t: t, owner: map[string]string{}, seen: map[string]int{}}
	for i := range r.reps {
		rep := &e2eCohReplica{relay: e2eCohStartRelay(t, e.syn.URL), lastGood: map[string]string{}}
		rep.px = e2eStartProxy(t, rep.relay.srv.URL, e.proxyEnv())
		r.reps[i] = rep
	}
	e2eBusWaitUp(t, 1, r.reps[0].px, r.reps[1].px)
	r.admin = e.syn.Register(t, "coh-admin", true)
	for range 3 {
		r.users = append(r.users, e.syn.Register(t, "coh", false))
	}
	r.masq = append(slices.Clone(e.bridge), r.admin.ID, "@"+e.syn.Bridge.Prefix+"nobody:localhost")
	r.addTok(&e2eCohTok{tok: e.syn.Bridge.Token, userID: e.syn.Bridge.Sender})
	r.addTok(&e2eCohTok{tok: r.admin.Token, user: r.admin, userID: r.admin.ID})
	return r
}

func (r *e2eCohRig) close() {
	for _, rep := range r.reps {
		rep.px.Stop(r.t)
		rep.relay.close()
	}
}

func (r *e2eCohRig) count(what string) {
	r.seenMu.Lock()
	r.seen[what]++
	r.seenMu.Unlock()
}

func (r *e2eCohRig) addTok(tk *e2eCohTok) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.toks = append(r.toks, tk)
	r.owner[e2eCohCred(tk.tok, "")] = tk.userID
	if tk.user == nil {
		for _, m := range r.masq {
			r.owner[e2eCohCred(tk.tok, m)] = m
		}
	}
}

// tok is the token an operand names (the appservice's too); userTok one of
// a user's tokens from a login (not the admin's nor the appservice's).
func (r *e2eCohRig) tok(i uint8) *e2eCohTok {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.toks[int(i)%len(r.toks)]
}

func (r *e2eCohRig) userTok(i uint8) *e2eCohTok {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.toks) == 2 {
		return nil
	}
	return r.toks[2+int(i)%(len(r.toks)-2)]
}

// do sends a request through replica i.
func (r *e2eCohRig) do(i int, method, path, token string, body any) (e2eResp, error) {
	return e2eTry(context.Background(), r.env.client, method, r.reps[i].px.URL+path, token, body)
}

// send is do, or with hangUp a client that gives up once Synapse has
// performed the call, before its answer; it returns once the replica is
// done with the call.
func (r *e2eCohRig) send(i int, method, path, token string, body any, hangUp bool) (e2eResp, error) {
	if !hangUp {
		return r.do(i, method, path, token, body)
	}
	rep := r.reps[i]
	served := e2eFamilySum(r.t, rep.px.AdminURL, "matrix_auth_proxy_requests_total")
	h := rep.relay.holdNext()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = e2eTry(ctx, r.env.client, method, rep.px.URL+path, token, body)
	}()
	select {
	case <-h.arrived:
		cancel()
		<-done
		close(h.release)
		r.count("hang-ups after Synapse performed the call")
	case <-done: // answered without reaching Synapse
		rep.relay.mu.Lock()
		rep.relay.hold = nil
		rep.relay.mu.Unlock()
		return e2eResp{}, nil
	case <-time.After(20 * time.Second):
		return e2eResp{}, fmt.Errorf("%s %s: held call never reached Synapse", method, path)
	}
	for try := 0; e2eFamilySum(r.t, rep.px.AdminURL, "matrix_auth_proxy_requests_total") < served+1; try++ {
		if try == 400 {
			return e2eResp{}, fmt.Errorf("%s %s: the replica never finished a call whose client hung up", method, path)
		}
		time.Sleep(25 * time.Millisecond)
	}
	return e2eResp{}, nil
}

// uia makes a call that needs user-interactive auth: the first round, and
// unless noAuth, the second with the user's password in the session.
func (r *e2eCohRig) uia(i int, method, path string, tk *e2eCohTok, body map[string]any, noAuth, hangUp bool) (e2eResp, error) {
	first, err := r.do(i, method, path, tk.tok, body)
	var ch struct {
		Session string `json:"session"`
	}
	_ = json.Unmarshal(first.Body, &ch)
	if err != nil || noAuth || first.Status != http.StatusUnauthorized || ch.Session == "" {
		return first, err
	}
	second := map[string]any{"auth": map[string]any{"type": "m.login.password", "session": ch.Session,
		"identifier": map[string]any{"type": "m.id.user", "user": tk.user.Name}, "password": tk.user.Password}}
	for k, v := range body {
		second[k] = v
	}
	return r.send(i, method, path, tk.tok, second, hangUp)
}

// login logs u in through replica i.
func (r *e2eCohRig) login(i int, u *e2eUser, device string, refresh bool) (e2eResp, error) {
	body := map[string]any{"type": "m.login.password", "identifier": map[string]any{"type": "m.id.user", "user": u.Name},
		"password": u.Password, "refresh_token": refresh}
	if device != "" {
		body["device_id"] = device
	}
	sent := time.Now()
	resp, err := r.do(i, http.MethodPost, "/_matrix/client/v3/login", "", body)
	r.issued(resp, u, sent)
	return resp, err
}

// issued records the token a login or refresh answered.
func (r *e2eCohRig) issued(resp e2eResp, u *e2eUser, sent time.Time) {
	var s struct {
		UserID       string `json:"user_id"`
		DeviceID     string `json:"device_id"`
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
		ExpiresInMS  int64  `json:"expires_in_ms"`
	}
	if resp.Status != http.StatusOK || json.Unmarshal(resp.Body, &s) != nil || s.AccessToken == "" {
		return
	}
	tk := &e2eCohTok{tok: s.AccessToken, refresh: s.RefreshToken, user: u, userID: u.ID, device: s.DeviceID}
	if s.ExpiresInMS > 0 {
		life := time.Duration(s.ExpiresInMS) * time.Millisecond
		tk.expLo, tk.expHi = sent.Add(life), time.Now().Add(life)
	}
	r.addTok(tk)
}

// use records a non-whoami use of tk through replica i: its 401 drops the
// token there, and, with the bus up, everywhere.
func (r *e2eCohRig) use(tk *e2eCohTok, i int) {
	now := time.Now()
	for k := range tk.usedAt {
		if k == i || !r.busDown {
			tk.usedAt[k] = now
			tk.behindAt[k] = time.Time{}
		}
	}
}

// replace swaps a deactivated user for a new one.
func (r *e2eCohRig) replace(id string) {
	for k, u := range r.users {
		if u.ID == id {
			r.users[k] = r.env.syn.Register(r.t, "coh", false)
		}
	}
}

func (r *e2eCohRig) user(i uint8) *e2eUser { return r.users[int(i)%len(r.users)] }

// e2eCohStep is what a step concerned: the users whose entries it may drop
// or re-fetch, and the replicas whose every entry it may drop.
type e2eCohStep struct {
	affected map[string]bool
	all      [2]bool
	busDown  bool // the bus was down at some point
}

// step runs one operation.
func (r *e2eCohRig) step(o e2eCohOp) (st e2eCohStep, what string, err error) {
	st.affected = map[string]bool{r.admin.ID: true}
	st.busDown = r.busDown
	r.via = 0
	if o.Kind&e2eVia2 != 0 {
		r.via = 1
	}
	via := r.via
	kind := o.Kind &^ e2eVia2 % e2eNumOps
	r.behind, r.caller = false, nil
	hangUp := o.B&0x40 != 0
	// A revoking call by a user's token: its user is concerned; a client
	// that hangs up may never let the replica see a 401, so it is no use.
	revoking := func(tk *e2eCohTok) {
		st.affected[tk.userID] = true
		r.caller = tk
		if !hangUp {
			r.use(tk, via)
		}
	}
	var resp e2eResp
	ua := r.userTok(o.A)
	needUser := kind >= e2eOpLogout && kind <= e2eOpDeactivate || kind == e2eOpUse || kind == e2eOpRefresh ||
		kind == e2eOpBehindBack || kind == e2eOpBurst
	if needUser && ua == nil {
		return st, "(no user token yet)", nil
	}
	name := func(tk *e2eCohTok) string {
		return fmt.Sprintf("token #%d (%s %q)", slices.Index(r.toks, tk), tk.userID, tk.device)
	}
	client := "/_matrix/client/" + [...]string{"v3", "r0", "v3", "r0"}[o.A>>6]
	switch kind {
	case e2eOpLogin:
		u := r.user(o.A)
		st.affected[u.ID] = true
		if len(r.toks) >= e2eCohMaxTokens {
			return st, "login skipped (token cap)", nil
		}
		dev := e2eCohDevices[int(o.B&0x7f)%len(e2eCohDevices)]
		resp, err = r.login(via, u, dev, o.B&0x80 != 0)
		what = fmt.Sprintf("login %s device %q refreshable %t", u.ID, dev, o.B&0x80 != 0)
	case e2eOpWhoami:
		tk := r.tok(o.A)
		st.affected[tk.userID] = true
		q, tok := url.Values{}, tk.tok
		if o.B&1 != 0 {
			q.Set("access_token", tok)
			tok = ""
		}
		if o.B&2 != 0 {
			m := r.masq[int(o.B>>2)%len(r.masq)]
			q.Set("user_id", m)
			st.affected[m] = true
		}
		resp, err = r.do(via, http.MethodGet, client+"/account/whoami?"+q.Encode(), tok, nil)
		what = fmt.Sprintf("whoami %s, query %t, as %q", name(tk), o.B&1 != 0, q.Get("user_id"))
	case e2eOpLogout:
		revoking(ua)
		resp, err = r.send(via, http.MethodPost, client+"/logout", ua.tok, map[string]any{}, hangUp)
		what = "logout " + name(ua)
	case e2eOpLogoutAll:
		revoking(ua)
		resp, err = r.send(via, http.MethodPost, client+"/logout/all", ua.tok, map[string]any{}, hangUp)
		what = "logout/all " + name(ua)
	case e2eOpDeleteDevice, e2eOpDeleteDevices:
		revoking(ua)
		victim := r.tok(o.B)
		if kind == e2eOpDeleteDevice {
			resp, err = r.uia(via, http.MethodDelete, client+"/devices/"+e2ePath(victim.device), ua, map[string]any{}, o.B&1 != 0, hangUp)
			what = "DELETE devices/" + victim.device
		} else {
			resp, err = r.uia(via, http.MethodPost, client+"/delete_devices", ua, map[string]any{"devices": []string{victim.device}}, o.B&1 != 0, hangUp)
			what = "delete_devices " + victim.device
		}
		what += " by " + name(ua)
	case e2eOpPassword:
		revoking(ua)
		next := ua.user.Password + "x"
		resp, err = r.uia(via, http.MethodPost, client+"/account/password", ua, map[string]any{"new_password": next, "logout_devices": o.B&2 == 0}, o.B&1 != 0, hangUp)
		// A hung-up call's outcome is Synapse's: ask it.
		if err == nil && (resp.Status == http.StatusOK || hangUp && r.probePassword(ua.user, next)) {
			ua.user.Password = next
		}
		what = fmt.Sprintf("password change by %s, logout_devices %t", name(ua), o.B&2 == 0)
	case e2eOpDeactivate:
		revoking(ua)
		resp, err = r.uia(via, http.MethodPost, client+"/account/deactivate", ua, map[string]any{}, o.B&1 != 0, hangUp)
		r.replaceIfGone(ua.user)
		what = "deactivate by " + name(ua)
	case e2eOpAdminDeactivate:
		u := r.user(o.B)
		st.affected[u.ID] = true
		resp, err = r.send(via, http.MethodPost, "/_synapse/admin/v1/deactivate/"+e2ePath(u.ID), r.admin.Token, map[string]any{"erase": false}, hangUp)
		r.replaceIfGone(u)
		what = "admin deactivate " + u.ID
	case e2eOpAdminDeleteDevice:
		victim := r.userTok(o.B)
		if victim == nil {
			return st, "(no user token yet)", nil
		}
		st.affected[victim.userID] = true
		resp, err = r.send(via, http.MethodDelete, "/_synapse/admin/v2/users/"+e2ePath(victim.userID)+"/devices/"+e2ePath(victim.device), r.admin.Token, nil, hangUp)
		what = "admin delete device of " + name(victim)
	case e2eOpAdminResetPassword:
		u := r.user(o.B)
		st.affected[u.ID] = true
		next := u.Password + "y"
		resp, err = r.do(via, http.MethodPost, "/_synapse/admin/v1/reset_password/"+e2ePath(u.ID), r.admin.Token, map[string]any{"new_password": next, "logout_devices": o.B&2 == 0})
		if resp.Status == http.StatusOK {
			u.Password = next
		}
		what = fmt.Sprintf("admin reset password of %s, logout_devices %t", u.ID, o.B&2 == 0)
	case e2eOpBehindBack:
		st.affected[ua.userID] = true
		r.behind = true
		syn := r.env.syn
		switch o.B % 4 {
		case 0:
			resp, err = e2eTry(context.Background(), r.env.client, http.MethodPost, syn.URL+"/_matrix/client/v3/logout", ua.tok, map[string]any{})
			what = "logout"
		case 1:
			resp, err = e2eTry(context.Background(), r.env.client, http.MethodPost, syn.URL+"/_matrix/client/v3/logout/all", ua.tok, map[string]any{})
			what = "logout/all"
		case 2:
			resp, err = e2eTry(context.Background(), r.env.client, http.MethodDelete, syn.URL+"/_synapse/admin/v2/users/"+e2ePath(ua.userID)+"/devices/"+e2ePath(ua.device), r.admin.Token, nil)
			what = "admin delete device"
		default:
			resp, err = e2eTry(context.Background(), r.env.client, http.MethodPost, syn.URL+"/_synapse/admin/v1/deactivate/"+e2ePath(ua.userID), r.admin.Token, map[string]any{"erase": false})
			r.replaceIfGone(ua.user)
			what = "admin deactivate"
		}
		what = "behind the proxy's back: " + what + " of " + name(ua)
	case e2eOpAdvance:
		d := time.Duration(int(o.A)%8+1) * 250 * time.Millisecond
		time.Sleep(d)
		what = fmt.Sprintf("%v pass", d)
	case e2eOpUse:
		st.affected[ua.userID] = true
		r.use(ua, via)
		resp, err = r.do(via, http.MethodGet, client+"/devices", ua.tok, nil)
		what = "GET devices by " + name(ua)
	case e2eOpRefresh:
		// A refresh carries no access token: no use of it.
		st.affected[ua.userID] = true
		if ua.refresh == "" || len(r.toks) >= e2eCohMaxTokens {
			return st, "refresh skipped (no refresh token, or token cap)", nil
		}
		// Synapse deletes earlier tokens of the session: the README's
		// "refresh" limit (until their announced expiry, or CACHE_TTL).
		r.behind = true
		sent := time.Now()
		resp, err = r.do(via, http.MethodPost, client+"/refresh", "", map[string]any{"refresh_token": ua.refresh})
		r.issued(resp, ua.user, sent)
		what = "refresh of " + name(ua)
	case e2eOpRestart:
		rep := r.reps[via]
		rep.px.Stop(r.t)
		rep.relay.reset()
		rep.px = e2eStartProxy(r.t, rep.relay.srv.URL, r.env.proxyEnv())
		rep.mu.Lock()
		clear(rep.lastGood)
		rep.mu.Unlock()
		if !r.busDown {
			e2eBusWaitUp(r.t, 1, rep.px)
		}
		st.all[via] = true
		what = "restart"
	case e2eOpRedis:
		r.redisToggle(&st)
		what = fmt.Sprintf("Redis up %t", !r.busDown)
	case e2eOpBurst:
		st.affected[ua.userID] = true
		what, err = r.burst(o, ua)
		what += " with whoamis of " + name(ua)
	}
	if r.busDown && kind != e2eOpRedis {
		if r.downSteps++; r.downSteps >= e2eCohMaxDown {
			r.redisToggle(&st)
			what += "; Redis back"
		}
	}
	if err == nil && resp.Status != 0 {
		what += fmt.Sprintf(": %d %s", resp.Status, resp.Errcode())
	}
	return st, fmt.Sprintf("via %d: %s", via, what), err
}

// replaceIfGone replaces u if Synapse says it is deactivated.
func (r *e2eCohRig) replaceIfGone(u *e2eUser) {
	if u == nil || !slices.Contains(r.users, u) {
		return
	}
	resp, err := e2eTry(context.Background(), r.env.client, http.MethodGet, r.env.syn.URL+"/_synapse/admin/v2/users/"+e2ePath(u.ID), r.admin.Token, nil)
	var a struct {
		Deactivated bool `json:"deactivated"`
	}
	if err == nil && json.Unmarshal(resp.Body, &a) == nil && a.Deactivated {
		r.replace(u.ID)
	}
}

// probePassword says whether Synapse takes pw for u (logging in directly,
// then out again).
func (r *e2eCohRig) probePassword(u *e2eUser, pw string) bool {
	resp, err := e2eTry(context.Background(), r.env.client, http.MethodPost, r.env.syn.URL+"/_matrix/client/v3/login", "",
		map[string]any{"type": "m.login.password", "identifier": map[string]any{"type": "m.id.user", "user": u.Name}, "password": pw})
	var s struct {
		AccessToken string `json:"access_token"`
	}
	if err != nil || resp.Status != http.StatusOK || json.Unmarshal(resp.Body, &s) != nil {
		return false
	}
	_, _ = e2eTry(context.Background(), r.env.client, http.MethodPost, r.env.syn.URL+"/_matrix/client/v3/logout", s.AccessToken, map[string]any{})
	return true
}

// redisToggle stops Redis or starts it again, and waits until both
// replicas' buses say so.
func (r *e2eCohRig) redisToggle(st *e2eCohStep) {
	if r.busDown {
		r.env.redis.Start(r.t)
		e2eBusWaitUp(r.t, 1, r.reps[0].px, r.reps[1].px)
		r.busDown = false
		// Both flushed on reconnection: nothing is stale any more.
		for _, tk := range r.toks {
			tk.downAt = [2]time.Time{}
		}
	} else {
		r.env.redis.Kill(r.t)
		e2eBusWaitUp(r.t, 0, r.reps[0].px, r.reps[1].px)
		r.busDown, r.downSteps = true, 0
	}
	st.all = [2]bool{true, true}
	st.busDown = true
}

// burst runs, at once, whoamis of tk through both replicas (header and
// query) and one call by tk: the state after every answer is checked.
func (r *e2eCohRig) burst(o e2eCohOp, tk *e2eCohTok) (string, error) {
	var what string
	var call func() (e2eResp, error)
	variant := o.B % 4
	if variant == 2 && len(r.toks) >= e2eCohMaxTokens {
		variant = 0 // no more logins
	}
	switch variant {
	case 0:
		what = "GET sync"
		r.use(tk, r.via)
		call = func() (e2eResp, error) {
			return r.do(r.via, http.MethodGet, "/_matrix/client/v3/sync?timeout=0", tk.tok, nil)
		}
	case 1:
		what = "logout"
		r.use(tk, r.via)
		r.caller = tk
		call = func() (e2eResp, error) {
			return r.do(r.via, http.MethodPost, "/_matrix/client/v3/logout", tk.tok, map[string]any{})
		}
	case 2:
		what = "login on its device"
		call = func() (e2eResp, error) { return r.login(r.via, tk.user, tk.device, o.B&0x80 != 0) }
	default:
		what = "logout/all"
		r.use(tk, r.via)
		r.caller = tk
		call = func() (e2eResp, error) {
			return r.do(r.via, http.MethodPost, "/_matrix/client/v3/logout/all", tk.tok, map[string]any{})
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 6 {
		wg.Go(func() {
			path := "/_matrix/client/v3/account/whoami"
			tok := tk.tok
			if i >= 4 {
				path += "?access_token=" + url.QueryEscape(tok)
				tok = ""
			}
			if _, err := r.do(i%2, http.MethodGet, path, tok, nil); err != nil {
				errs <- err
			}
		})
	}
	var resp e2eResp
	wg.Go(func() {
		var err error
		if resp, err = call(); err != nil {
			errs <- err
		}
	})
	wg.Wait()
	close(errs)
	return fmt.Sprintf("burst: %s (%d)", what, resp.Status), <-errs
}

// run runs ops on a fresh rig and returns the first violation.
func (e *e2eCohEnv) run(t *testing.T, ops []e2eCohOp) (err error) {
	t.Helper()
	r := e.newRig(t)
	defer r.close()
	defer func() {
		if dir := os.Getenv("E2E_COHERENCE_LOGS"); err != nil && dir != "" {
			for i, rep := range r.reps {
				if b, err := os.ReadFile(rep.px.LogPath); err == nil {
					_ = os.WriteFile(fmt.Sprintf("%s/replica%d.log", dir, i), b, 0o644)
				}
			}
		}
		if err != nil {
			tail := r.trace[max(0, len(r.trace)-25):]
			var f *e2eCohFailure
			if errors.As(err, &f) {
				f.Err = fmt.Errorf("%w\nlast steps:\n%s", f.Err, strings.Join(tail, "\n"))
			}
		}
	}()
	prev := e2eCohStep{all: [2]bool{true, true}}
	for _, rep := range r.reps {
		_, _ = rep.relay.takeEarly()
	}
	var spent [e2eNumOps + 1]time.Duration // by kind; the last: checks
	defer func() {
		var b strings.Builder
		for k, d := range spent {
			if d > 0 {
				name := "checks"
				if k < int(e2eNumOps) {
					name = e2eCohNames[k]
				}
				fmt.Fprintf(&b, " %s %v", name, d.Round(time.Millisecond))
			}
		}
		r.seenMu.Lock()
		defer r.seenMu.Unlock()
		for _, k := range slices.Sorted(maps.Keys(r.seen)) {
			fmt.Fprintf(&b, "\n  %s: %d", k, r.seen[k])
		}
		t.Logf("time spent:%s; %d tokens", b.String(), len(r.toks))
	}()
	for i, o := range ops {
		r.stepStart = time.Now()
		st, what, err := r.step(o)
		checkStart := time.Now()
		spent[o.Kind&^e2eVia2%e2eNumOps] += checkStart.Sub(r.stepStart)
		r.trace = append(r.trace, fmt.Sprintf("%d %v %s %s", i, o, r.stepStart.Format("15:04:05.000"), what))
		if err != nil {
			return &e2eCohFailure{i, fmt.Errorf("step %d %v: %w", i, o, err)}
		}
		if err := r.check(st, prev); err != nil {
			return &e2eCohFailure{i, fmt.Errorf("after step %d %v (%s): %w", i, o, what, err)}
		}
		spent[e2eNumOps] += time.Since(checkStart)
		prev = st
	}
	return nil
}

// e2eCohKey is one whoami the check asks: a token, optionally
// masquerading.
type e2eCohKey struct {
	tk     *e2eCohTok
	asUser string
}

// check asks, for every token ever issued, Synapse and then each replica
// (the header; the query form through one of them, in turn), and then the
// relays whether any replica looked up again a live entry it held for a
// user neither this step nor the one before concerned.
func (r *e2eCohRig) check(st, prev e2eCohStep) error {
	r.mu.Lock()
	toks := slices.Clone(r.toks)
	r.mu.Unlock()
	live := map[string]bool{} // credentials Synapse answers 200 for
	var liveMu sync.Mutex
	work := make(chan *e2eCohTok)
	errs := make([]error, len(toks))
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for tk := range work {
				keys := []e2eCohKey{{tk: tk}}
				if tk.user == nil {
					for _, m := range r.masq {
						keys = append(keys, e2eCohKey{tk, m})
					}
				}
				for _, k := range keys {
					ok, err := r.checkKey(k)
					if err != nil {
						errs[slices.Index(toks, tk)] = err
						break
					}
					if ok {
						liveMu.Lock()
						live[e2eCohCred(tk.tok, k.asUser)] = true
						liveMu.Unlock()
					}
				}
			}
		})
	}
	step := len(r.trace) - 1
	for n, tk := range toks {
		// A dead token stays dead at Synapse; the replicas' answers for it
		// are checked for a few steps after its death, then on every
		// e2eCohDeadEvery-th step (each asks the homeserver again: see
		// the README's passive invalidations).
		if !tk.dead || step-tk.diedAt < 3 || (step+n)%e2eCohDeadEvery == 0 {
			work <- tk
		}
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for i, rep := range r.reps {
		early, why := rep.relay.takeEarly()
		for k, cred := range early {
			who := r.owner[cred]
			if !live[cred] || who == "" || st.affected[who] || prev.affected[who] || st.all[i] || prev.all[i] || st.busDown || prev.busDown {
				continue
			}
			idx := -1
			for n, tk := range toks {
				if e2eCohCred(tk.tok, "") == strings.SplitN(cred, "|", 2)[0]+"|" {
					idx = n
				}
			}
			return fmt.Errorf("replica %d: the step made an entry of %s (token #%d), whom it does not concern, vanish (%s)", i, who, idx, why[k])
		}
	}
	return nil
}

// checkKey compares replica answers with Synapse's for one key; it
// reports whether Synapse accepts the token.
func (r *e2eCohRig) checkKey(k e2eCohKey) (bool, error) {
	tk := k.tk
	q := url.Values{}
	if k.asUser != "" {
		q.Set("user_id", k.asUser)
	}
	path := "/_matrix/client/v3/account/whoami?" + q.Encode()
	want := e2eResp{Status: http.StatusUnauthorized}
	asked := time.Now()
	if !tk.dead {
		var err error
		if want, err = e2eTry(context.Background(), r.env.client, http.MethodGet, r.env.syn.URL+path, tk.tok, nil); err != nil {
			return false, err
		}
		if want.Status == http.StatusUnauthorized && k.asUser == "" {
			r.died(tk, want)
		}
	}
	forms := []struct {
		replica int
		query   bool
	}{{0, false}, {1, false}, {len(r.trace) % 2, true}}
	for _, f := range forms {
		p, tok := path, tk.tok
		if f.query {
			p += "&access_token=" + url.QueryEscape(tok)
			tok = ""
		}
		// Header and query forms share one entry.
		key := e2eCohCred(tk.tok, k.asUser)
		var got e2eResp
		var complaint string
		for try := 0; ; try++ {
			var err error
			if got, err = r.do(f.replica, http.MethodGet, p, tok, nil); err != nil {
				return false, err
			}
			if complaint = r.judge(f.replica, key, tk, asked, got, want); complaint == "" {
				break
			}
			// Another replica learns of the step over the bus, a moment
			// later: it is asked again until it agrees, a bounded number
			// of times (a quiescent point, not a deadline).
			if try == 0 {
				r.count("answers the other replica corrected after the bus")
			}
			if f.replica == r.via || r.busDown || try == e2eCohBusTries {
				return false, fmt.Errorf("replica %d, whoami of token #%d (%s %q) as %q, query %t: %s",
					f.replica, slices.Index(r.toks, tk), tk.userID, tk.device, k.asUser, f.query, complaint)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if got.Status == http.StatusOK {
			rep := r.reps[f.replica]
			rep.mu.Lock()
			rep.lastGood[key] = e2eCohWho(got)
			rep.mu.Unlock()
		}
	}
	return want.Status == http.StatusOK, nil
}

// died records that Synapse no longer accepts tk, and what the README
// lets each replica answer for it meanwhile.
func (r *e2eCohRig) died(tk *e2eCohTok, answer e2eResp) {
	tk.dead, tk.diedAt = true, len(r.trace)-1
	var body struct {
		SoftLogout bool `json:"soft_logout"`
	}
	_ = json.Unmarshal(answer.Body, &body)
	if body.SoftLogout {
		r.count("tokens expired")
		return // expired: see mayBeStale
	}
	r.count("tokens revoked")
	// A revoking call with an expired token (Synapse lets it log out)
	// names only that token: what else it revokes, no replica sees.
	unnamed := r.caller != nil && r.caller != tk && !r.caller.expLo.IsZero() && time.Now().After(r.caller.expLo.Add(-e2eCohMargin))
	for i := range tk.behindAt {
		if r.behind || unnamed {
			tk.behindAt[i] = r.stepStart
		}
		if r.busDown && i != r.via {
			tk.downAt[i] = r.stepStart
		}
	}
}

// judge compares a replica's answer with Synapse's, asked at asked; ""
// if the README allows it.
func (r *e2eCohRig) judge(i int, key string, tk *e2eCohTok, asked time.Time, got, want e2eResp) string {
	now := time.Now()
	gotS, wantS := e2eCohWho(got), e2eCohWho(want)
	if gotS == wantS {
		if tk.staleAt[i] && got.Status == http.StatusUnauthorized {
			tk.staleAt[i] = false
			r.count("stale answers that ended within their bound")
		}
		return ""
	}
	// Near a refreshable token's expiry either answer may be right.
	nearExp := !tk.expLo.IsZero() && now.After(tk.expLo.Add(-e2eCohMargin)) && asked.Before(tk.expHi.Add(e2eCohMargin))
	if nearExp && got.Status == http.StatusUnauthorized && want.Status == http.StatusOK {
		r.count("401s at the edge of an expiry")
		return ""
	}
	if got.Status == http.StatusOK && want.Status == http.StatusUnauthorized {
		rep := r.reps[i]
		rep.mu.Lock()
		last := rep.lastGood[key]
		rep.mu.Unlock()
		if why := r.mayBeStale(i, tk, now); gotS == last && (nearExp || why != "") {
			r.count("stale answers allowed: " + cmp.Or(why, "at the edge of an expiry"))
			tk.staleAt[i] = true
			return ""
		}
		return fmt.Sprintf("replica says %s (last good %q), Synapse %d %s: stale beyond what the README allows", gotS, last, want.Status, want.Body)
	}
	if got.Status == http.StatusUnauthorized && want.Status == http.StatusOK {
		return fmt.Sprintf("replica says 401 %s, Synapse %s (errs towards 401, but wrongly)", got.Body, wantS)
	}
	return fmt.Sprintf("replica says %s %s, Synapse %s %s", gotS, got.Body, wantS, want.Body)
}

// mayBeStale says why the README lets replica i still answer a positive
// whoami for tk, which Synapse no longer accepts ("": it does not).
func (r *e2eCohRig) mayBeStale(i int, tk *e2eCohTok, now time.Time) string {
	expKnown := r.reps[i].relay.knowsExp(tk.tok)
	expired := !tk.expLo.IsZero() && now.After(tk.expHi.Add(e2eCohMargin))
	// Revoked where no replica could see it: until CACHE_TTL, its next
	// use, or its announced expiry.
	if at := tk.behindAt[i]; !at.IsZero() && now.Before(at.Add(e2eCohTTL+e2eCohMargin)) && !(expKnown && expired) {
		return "revoked behind the proxy's back"
	}
	// Through another replica while the bus was down: until
	// REDIS_DOWN_CACHE_TTL (or the flush when it is back).
	if at := tk.downAt[i]; !at.IsZero() && now.Before(at.Add(e2eCohDownTTL+e2eCohMargin)) {
		return "revoked through the other replica, bus down"
	}
	// An expiry the replica did not see announced: an answer cached
	// before it lives until CACHE_TTL, or the token's next use.
	if !tk.expLo.IsZero() && now.After(tk.expLo) && !expKnown && now.Before(tk.expHi.Add(e2eCohTTL+e2eCohMargin)) &&
		tk.usedAt[i].Before(tk.expHi.Add(e2eCohMargin)) {
		return "expiry not announced to it"
	}
	return ""
}

// e2eCohWho is a whoami answer as compared: the status, and for a 200
// the user and device.
func e2eCohWho(r e2eResp) string {
	if r.Status != http.StatusOK {
		return strconv.Itoa(r.Status)
	}
	var w struct {
		UserID   string `json:"user_id"`
		DeviceID string `json:"device_id"`
	}
	_ = json.Unmarshal(r.Body, &w)
	return fmt.Sprintf("200 %s %q", w.UserID, w.DeviceID)
}

// e2eCohFailure is a run's violation, at step Step.
type e2eCohFailure struct {
	Step int
	Err  error
}

func (f *e2eCohFailure) Error() string { return f.Err.Error() }
func (f *e2eCohFailure) Unwrap() error { return f.Err }

// e2eCohShrink finds a shorter sequence than ops that still fails (ops
// failed with err): it cuts what follows the failing step, drops chunks of
// operations (halves, quarters…, from the end), then zeroes operands, within
// maxRuns more runs and until deadline. It returns the shortest and its
// failure, which says so if nothing failed again (timing-dependent).
func e2eCohShrink(ops []e2eCohOp, err error, maxRuns int, deadline time.Time, run func([]e2eCohOp) error) ([]e2eCohOp, error) {
	runs, failedAgain := 0, false
	more := func() bool { return runs < maxRuns && time.Now().Before(deadline) }
	cut := func() {
		var f *e2eCohFailure
		if errors.As(err, &f) && f.Step+1 < len(ops) {
			ops = ops[:f.Step+1]
		}
	}
	cut()
	try := func(cand []e2eCohOp) bool {
		runs++
		if e := run(cand); e != nil {
			ops, err, failedAgain = cand, e, true
			cut()
			return true
		}
		return false
	}
	for chunk := max(len(ops)/2, 1); more(); chunk = max(chunk/2, 1) {
		changed := false
		for i := len(ops) - chunk; i > -chunk && more(); i -= chunk {
			if lo := max(i, 0); lo < len(ops) && try(slices.Delete(slices.Clone(ops), lo, min(lo+chunk, len(ops)))) {
				changed = true
			}
		}
		if chunk == 1 && !changed {
			break
		}
	}
	for i := 0; i < len(ops) && more(); i++ {
		for _, simplify := range []func(o e2eCohOp) e2eCohOp{
			func(o e2eCohOp) e2eCohOp { o.Kind &^= e2eVia2; return o },
			func(o e2eCohOp) e2eCohOp { o.A = 0; return o },
			func(o e2eCohOp) e2eCohOp { o.B = 0; return o },
		} {
			if i < len(ops) && simplify(ops[i]) != ops[i] && more() {
				cand := slices.Clone(ops)
				cand[i] = simplify(ops[i])
				try(cand)
			}
		}
	}
	if runs > 0 && !failedAgain {
		err = fmt.Errorf("did not fail again when re-run (timing-dependent): %w", err)
	}
	return ops, err
}

// e2eCohRegressionTest prints ops as a test to paste into this file.
func e2eCohRegressionTest(ops []e2eCohOp, err error) string {
	var b strings.Builder
	msg := strings.SplitN(err.Error(), "\n", 2)[0]
	fmt.Fprintf(&b, "// %s\nfunc TestE2ECoherenceRegression(t *testing.T) {\n\te2eShort(t)\n\tops := []e2eCohOp{\n", msg)
	for _, o := range ops {
		fmt.Fprintf(&b, "\t\t%v,\n", o)
	}
	b.WriteString("\t}\n\tif err := e2eRunCoherence(t, ops); err != nil {\n\t\tt.Fatal(err)\n\t}\n}\n")
	return b.String()
}

// The shrinker keeps what a failure needs and prints it as a test.
func TestE2ECoherenceShrink(t *testing.T) {
	// A stand-in failure: a logout, later a refresh through replica 1; it
	// reports the step where it fails.
	fails := func(ops []e2eCohOp) error {
		seen := false
		for i, o := range ops {
			seen = seen || o.Kind&^e2eVia2 == e2eOpLogout
			if seen && o.Kind == e2eOpRefresh|e2eVia2 {
				return &e2eCohFailure{i, fmt.Errorf("failed")}
			}
		}
		return nil
	}
	ops := e2eCohRandomOps(rand.New(rand.NewPCG(1, 2)), 60)
	ops = append(ops, e2eCohOp{e2eOpLogout | e2eVia2, 7, 9}, e2eCohOp{e2eOpRefresh | e2eVia2, 3, 4}, e2eCohOp{e2eOpLogin, 1, 1})
	got, err := e2eCohShrink(ops, fails(ops), 1000, time.Now().Add(time.Minute), fails)
	want := []e2eCohOp{{e2eOpLogout, 0, 0}, {e2eOpRefresh | e2eVia2, 0, 0}}
	if err == nil || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("shrunk to %v (%v), want %v", got, err, want)
	}
	// A failure that does not come back is reported as such.
	if _, err := e2eCohShrink(ops, &e2eCohFailure{3, fmt.Errorf("once")}, 10, time.Now().Add(time.Minute), func([]e2eCohOp) error { return nil }); err == nil || !strings.Contains(err.Error(), "did not fail again") {
		t.Errorf("a failure that did not come back: %v", err)
	}
	test := e2eCohRegressionTest(got, err)
	for _, line := range []string{"func TestE2ECoherenceRegression(t *testing.T) {", "{e2eOpLogout, 0, 0},", "{e2eOpRefresh | e2eVia2, 0, 0},", "e2eRunCoherence(t, ops)"} {
		if !strings.Contains(test, line) {
			t.Errorf("printed test lacks %q:\n%s", line, test)
		}
	}
}

// The check must see what it is there to see: a stale answer the README
// does not allow, and a step that made another user's entries vanish.
func TestE2ECoherenceCheckCatches(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	env := e2eCohSetup(t)
	tests := []struct {
		name string
		// break_ does, without telling the check, what the proxy would do
		// wrong (or could not know); it returns the user it concerns.
		break_ func(r *e2eCohRig) string
		want   string
	}{
		{
			name: "a revocation the check was not told is behind the proxy's back",
			break_: func(r *e2eCohRig) string {
				tk := r.toks[2]
				e2eWant2xx(t, e2eDo(t, nil, http.MethodPost, env.syn.URL+"/_matrix/client/v3/logout", tk.tok, map[string]any{}))
				return tk.userID
			},
			want: "stale beyond what the README allows",
		},
		{
			name: "a step concerning one user that empties a replica's cache",
			break_: func(r *e2eCohRig) string {
				rep := r.reps[0]
				rep.px.Stop(t)
				rep.px = e2eStartProxy(t, rep.relay.srv.URL, env.proxyEnv())
				e2eBusWaitUp(t, 1, rep.px)
				return r.toks[2].userID
			},
			want: "whom it does not concern, vanish",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := env.newRig(t)
			defer r.close()
			none := e2eCohStep{affected: map[string]bool{}}
			for _, o := range []e2eCohOp{{e2eOpLogin, 0, 0}, {e2eOpLogin, 1, 0}, {e2eOpWhoami, 2, 0}} {
				r.stepStart = time.Now()
				st, what, err := r.step(o)
				r.trace = append(r.trace, what)
				if err == nil {
					err = r.check(st, none)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			who := tt.break_(r)
			r.trace = append(r.trace, "broken")
			st := e2eCohStep{affected: map[string]bool{who: true}}
			err := r.check(st, st)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("check says %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
