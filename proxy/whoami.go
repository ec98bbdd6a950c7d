package proxy

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
	"github.com/matrix-auth-proxy/matrix-auth-proxy/upstream"
)

// serveWhoami answers GET /account/whoami from the cache, asking the
// homeserver on a miss. A request the cache cannot judge (no token, both
// forms, a malformed header) goes to the homeserver untouched.
func (p *Proxy) serveWhoami(w http.ResponseWriter, r *http.Request, c *caller) {
	if !c.ok {
		p.rp.ServeHTTP(w, r)
		return
	}
	a, res := c.answer, c.result
	if res == tokencache.Miss {
		var err error
		if a, res, err = p.resolve(r, c.clientAddr(), c.key, c.creds); err != nil {
			p.lookupFailed(w, r, err)
			return
		}
	}
	p.m.lookupsByResult[res].Inc()
	writeAnswer(w, a)
}

// cached looks a request's answer up in the cache, without asking the
// homeserver. An ordinary user's token is found under its own key with one
// Get (the common case); answers that hold only for the client that got
// them (see bindsClient) are found under the key bound to the client's
// address, looked at only when that misses. A masqueraded request's answer
// is always bound, so only its bound key is looked at.
func (p *Proxy) cached(who *caller, key tokencache.Key, c credentials) (tokencache.Answer, tokencache.Result) {
	if c.masq.IsZero() {
		if a, res := p.cache.Get(key); res != tokencache.Miss {
			return a, res
		}
	}
	return p.cache.Get(p.hasher.Bind(key, who.clientAddr()))
}

// resolve gets the answer for a token from the cache or, sharing the call
// with concurrent requests for the same key from the same client, from the
// homeserver.
func (p *Proxy) resolve(r *http.Request, addr netip.Addr, key tokencache.Key, c credentials) (tokencache.Answer, tokencache.Result, error) {
	wr := upstream.WhoamiRequest{Token: c.token, Query: masqueradeQuery(c.masq), Forward: http.Header{}}
	p.setForwarded(wr.Forward, r)
	if ua := r.Header["User-Agent"]; len(ua) > 0 {
		// Synapse records the user agent per device; keep it the client's.
		wr.Forward["User-Agent"] = ua
	}
	bound := p.hasher.Bind(key, addr)
	return p.cache.ResolveBound(r.Context(), key, bound, func(ctx context.Context) (tokencache.Answer, error) {
		reply, err := p.lookups.Whoami(ctx, wr)
		if err != nil {
			return tokencache.Answer{}, err
		}
		p.m.upstreamWhoami.WithLabelValues(strconv.Itoa(reply.Status)).Inc()
		a, unknownToken := p.answerFor(reply, c.masq)
		a = p.masReview(ctx, key, wr.Token, a) // MAS: server name, locked users, expiry (mas.go)
		if unknownToken {
			// Passive invalidation: drop the positive answers held for
			// this token (other masquerade variants; through the bus, the
			// other replicas'). Negative answers, this one and the peers',
			// stay: a token's invalidation never drops them (tokencache.Scope).
			p.cache.InvalidateToken(key.Token, reasonUnknownToken)
		}
		return a, nil
	})
}

// lookupFailed answers a whoami the homeserver could not answer: 502 or 504,
// never 401 (that would log the client out over an outage).
func (p *Proxy) lookupFailed(w http.ResponseWriter, r *http.Request, err error) {
	kind := upstream.ErrorKind(err)
	if r.Context().Err() != nil {
		return // the client went away
	}
	if kind == upstream.KindCanceled {
		kind = upstream.KindOther
	}
	p.upstreamFailed(w, r, kind, err)
}

// answerFor turns the homeserver's whoami reply to a request masquerading
// as m into a cache answer, and says whether the homeserver called the
// token unknown. Only a 200 with a user_id is positive; only a 401
// M_UNKNOWN_TOKEN without soft_logout is negative (a soft-logged-out client
// may still refresh, Client-Server API "Soft logout"). Everything else (403
// for a forbidden masquerade, 429, 5xx) is handed back as it came and never
// stored; so is a 200 for another user or device than the masquerade asked
// for (Synapse ignores user_id for an ordinary user's token: storing that
// answer per user_id value would let one token fill the cache).
func (p *Proxy) answerFor(reply *upstream.Reply, m tokencache.Masquerade) (tokencache.Answer, bool) {
	// One copy at the body's exact size, which the cache keeps.
	body := string(reply.Body)
	switch reply.Status {
	case http.StatusOK:
		user, device, ok := parseWhoami(reply.Body)
		if ok && masqueradeHeld(m, user, device) {
			return tokencache.Answer{Kind: tokencache.Positive, UserID: user, DeviceID: device,
				Body: body, Meta: p.replays.intern(reply.Status, reply.Header, isGuest(reply.Body)),
				Bound: bindsClient(tokencache.Positive, device, m)}, false
		}
		// Not kept, but it still names the caller (see tokencache.Answer).
		a := uncacheable(reply, body)
		a.UserID, a.DeviceID = user, device
		return a, false
	case http.StatusUnauthorized:
		if errcode, soft, ok := parseError(reply.Body); ok && errcode == "M_UNKNOWN_TOKEN" {
			if soft {
				return uncacheable(reply, body), true
			}
			return tokencache.Answer{Kind: tokencache.Negative, Body: body,
				Meta: p.replays.intern(reply.Status, reply.Header, false), Bound: bindsClient(tokencache.Negative, "", m)}, true
		}
	}
	return uncacheable(reply, body), false
}

// masqueradeHeld reports whether a whoami answer for user and device is the
// one masquerade m asked for (every parameter m carries is honoured).
func masqueradeHeld(m tokencache.Masquerade, user, device string) bool {
	return (m.UserID == "" || m.UserID == user) &&
		(m.DeviceID == "" || m.DeviceID == device) &&
		(m.MSC3202DeviceID == "" || m.MSC3202DeviceID == device)
}

// bindsClient says whether an answer may depend on the client's address,
// and so must only be served to that address again. Synapse checks an
// appservice token's ip_range_whitelist against the client address
// (Auth.get_appservice_user) and, outside it, calls the token unknown. An
// appservice's answers are the device-less ones and every masqueraded one;
// a negative answer may be one seen from outside the whitelist. An ordinary
// user's positive answer (with a device, not masqueraded) holds for every
// client, and is shared.
func bindsClient(k tokencache.Kind, device string, m tokencache.Masquerade) bool {
	return k == tokencache.Negative || device == "" || !m.IsZero()
}

func uncacheable(reply *upstream.Reply, body string) tokencache.Answer {
	h := reply.Header.Clone()
	for _, k := range [...]string{"Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "Date"} {
		delete(h, k)
	}
	setCORS(h)
	return tokencache.Answer{Kind: tokencache.Uncacheable, Body: body, Meta: &replay{status: reply.Status, header: h}}
}

// parseWhoami reads user_id and device_id from a whoami body. Keys are
// matched exactly (encoding/json would also accept "User_Id").
func parseWhoami(body []byte) (user, device string, ok bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return "", "", false
	}
	if json.Unmarshal(m["user_id"], &user) != nil || user == "" {
		return "", "", false
	}
	if raw, has := m["device_id"]; has && string(raw) != "null" && json.Unmarshal(raw, &device) != nil {
		return "", "", false
	}
	return user, device, true
}

// parseError reads errcode and soft_logout from a Matrix error body.
func parseError(body []byte) (errcode string, softLogout, ok bool) {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["errcode"], &errcode) != nil {
		return "", false, false
	}
	if raw, has := m["soft_logout"]; has {
		_ = json.Unmarshal(raw, &softLogout) // anything but true is not soft
	}
	return errcode, softLogout, true
}

// replay is how an answer is written back: its status and headers. Replays of
// cached answers are interned: the homeserver sends the same few headers with
// every answer, so a million entries share a handful of replays.
type replay struct {
	status int
	header http.Header // values are clipped: an append elsewhere copies
	// guest: the whoami answer says is_guest (read once, for forward-auth).
	guest bool
}

func writeAnswer(w http.ResponseWriter, a tokencache.Answer) {
	rp := a.Meta.(*replay)
	h := w.Header()
	for k, v := range rp.header {
		h[k] = v
	}
	w.WriteHeader(rp.status)
	_, _ = io.WriteString(w, a.Body)
}

// replayedHeaders are the headers of a cached answer worth replaying: what
// a client relies on. Per-request headers (Date, trace IDs, cookies) are not.
func replayedHeader(k string) bool {
	switch k {
	case "Content-Type", "Cache-Control", "Pragma", "Expires", "Vary", "Server":
		return true
	}
	return strings.HasPrefix(k, "Access-Control-")
}

type replayInterner struct {
	mu sync.Mutex
	m  map[string]*replay
}

// maxReplays bounds the interner against a homeserver that varies headers
// per answer; past it, replays are simply not shared.
const maxReplays = 256

func (in *replayInterner) intern(status int, src http.Header, guest bool) *replay {
	h := http.Header{}
	for k, v := range src {
		if replayedHeader(k) {
			h[k] = slices.Clip(slices.Clone(v))
		}
	}
	setCORS(h)
	var id strings.Builder
	id.WriteString(strconv.Itoa(status))
	if guest {
		id.WriteString(" guest")
	}
	for _, k := range slices.Sorted(maps.Keys(h)) {
		for _, v := range h[k] {
			id.WriteString("\n" + k + ": " + v)
		}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if rp, ok := in.m[id.String()]; ok {
		return rp
	}
	rp := &replay{status: status, header: h, guest: guest}
	if in.m == nil {
		in.m = map[string]*replay{}
	}
	if len(in.m) < maxReplays {
		in.m[id.String()] = rp
	}
	return rp
}
