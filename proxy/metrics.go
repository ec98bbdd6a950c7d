package proxy

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/tokencache"
)

// metrics are the proxy's Prometheus metrics. Every label takes values from a
// small fixed set: a route name, a status code, a result, a reason, an error
// kind. Never a token, user, room or raw path.
type metrics struct {
	requests          *prometheus.CounterVec
	duration          *prometheus.HistogramVec
	durationByRoute   [numRoutes]prometheus.Observer
	lookups           *prometheus.CounterVec
	lookupsByResult   [3]prometheus.Counter
	invalidations     *prometheus.CounterVec
	upstreamWhoami    *prometheus.CounterVec
	upstreamErrors    *prometheus.CounterVec
	upstreamErrByKind map[string]prometheus.Counter
	rateLimited       [2]prometheus.Counter // by limitedByUser, limitedByIP
	flushes           [numRoutes]prometheus.Counter
	bodiesUnread      prometheus.Counter
	authRequests      [numAuthResults]prometheus.Counter
	codeLabels        [600]string // "100" … "599", so labelling allocates nothing
	// byCode caches the requests_total child of each route and status, so
	// a request costs an atomic load instead of a label lookup. Filled on
	// first use: a child made up front would be a series in /metrics.
	byCode [numRoutes][600]atomic.Pointer[counter]
}

type counter struct{ prometheus.Counter }

// What a rate-limited request was keyed on.
const (
	limitedByUser = iota
	limitedByIP
)

const namespace = "matrix_auth_proxy"

func newMetrics(reg prometheus.Registerer, cacheLen func() int) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Client requests handled, by route and HTTP status code.",
		}, []string{"route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help:    "Time to answer client requests, by route (for proxied requests: until the response headers and body were handed on).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"route"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "token_cache_lookups_total",
			Help: "Token cache lookups: hit (valid token answered from memory), negative_hit (unknown token answered from memory), miss.",
		}, []string{"result"}),
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "token_cache_invalidations_total",
			Help: "Token cache entries dropped, by reason.",
		}, []string{"reason"}),
		upstreamWhoami: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "upstream_whoami_requests_total",
			Help: "whoami lookups the proxy sent to the homeserver, by HTTP status code of the answer.",
		}, []string{"code"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "upstream_errors_total",
			Help: "Requests to the homeserver that got no HTTP answer, by kind (timeout, refused, other).",
		}, []string{"kind"}),
	}
	limited := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "rate_limited_total",
		Help: "Requests answered 429 M_LIMIT_EXCEEDED by the proxy, by what they were keyed on: user (user+device of a known token) or ip.",
	}, []string{"key"})
	m.rateLimited[limitedByUser] = limited.WithLabelValues("user")
	m.rateLimited[limitedByIP] = limited.WithLabelValues("ip")
	entries := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "token_cache_entries",
		Help: "Answers held in the token cache (positive and negative).",
	}, func() float64 { return float64(cacheLen()) })
	flushes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "token_cache_flushes_total",
		Help: "Whole-cache flushes decided by this replica, by the route of the call that caused them: a successful revoking call that carries no token (a password reset by email) or names no device (OIDC back-channel logout).",
	}, []string{"route"})
	for n := range numRoutes {
		m.flushes[n] = flushes.WithLabelValues(n.String())
	}
	m.bodiesUnread = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "revoking_bodies_unread_total",
		Help: "Revoking calls forwarded without reading their body because the memory bound for bodies being read was reached; each invalidated the caller's whole user.",
	})
	auth := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "auth_requests_total",
		Help: "Forward-auth requests (AUTH_ADDR), by result: allowed, unauthenticated (401), forbidden (403, the policy refused a valid token), error (the homeserver did not answer, or an invalid policy), rate_limited (429).",
	}, []string{"result"})
	for r := range numAuthResults {
		m.authRequests[r] = auth.WithLabelValues(authResultLabels[r])
	}
	for _, c := range []prometheus.Collector{auth, m.requests, m.duration, m.lookups, m.invalidations, m.upstreamWhoami, m.upstreamErrors, limited, entries, flushes, m.bodiesUnread} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	// Resolve the children used on every request once, and make the
	// expected series exist from the start (a rate() over a series that
	// appears late misses its first increments). Status codes other than
	// these appear with their first request.
	for n := range numRoutes {
		m.durationByRoute[n] = m.duration.WithLabelValues(n.String())
		m.requests.WithLabelValues(n.String(), "200")
	}
	for _, code := range []string{"200", "401"} {
		m.upstreamWhoami.WithLabelValues(code)
	}
	for _, r := range []tokencache.Result{tokencache.Miss, tokencache.Hit, tokencache.NegativeHit} {
		m.lookupsByResult[r] = m.lookups.WithLabelValues(r.String())
	}
	for code := range m.codeLabels {
		m.codeLabels[code] = strconv.Itoa(code)
	}
	m.upstreamErrByKind = map[string]prometheus.Counter{}
	for _, k := range []string{"timeout", "refused", "other"} {
		m.upstreamErrByKind[k] = m.upstreamErrors.WithLabelValues(k)
	}
	for _, r := range []tokencache.Reason{reasonLogout, reasonLogoutAll, reasonDevice, reasonPassword,
		reasonDeactivate, reasonLogin, reasonLock, reasonSSOLogout, reasonAdmin, reasonUnknownToken, tokencache.ReasonCapacity, tokencache.ReasonExpired,
		tokencache.ReasonBus, tokencache.ReasonBusResync} {
		m.invalidations.WithLabelValues(string(r))
	}
	return m, nil
}

func (m *metrics) observe(route routeName, code int, seconds float64) {
	m.durationByRoute[route].Observe(seconds)
	if code < 0 || code >= len(m.codeLabels) {
		m.requests.WithLabelValues(route.String(), strconv.Itoa(code)).Inc()
		return
	}
	slot := &m.byCode[route][code]
	c := slot.Load()
	if c == nil {
		c = &counter{m.requests.WithLabelValues(route.String(), m.codeLabels[code])}
		slot.Store(c) // a race stores the same child twice: harmless
	}
	c.Inc()
}

func (m *metrics) upstreamError(kind string) {
	if c, ok := m.upstreamErrByKind[kind]; ok {
		c.Inc()
	}
}

func (m *metrics) dropped(reason tokencache.Reason, n int) {
	m.invalidations.WithLabelValues(string(reason)).Add(float64(n))
}
