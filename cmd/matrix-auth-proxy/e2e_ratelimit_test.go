package main_test

import (
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"
)

// e2eClientFrom returns an HTTP client whose connections come from ip (any
// address in 127.0.0.0/8 works on Linux without setup).
func e2eClientFrom(t testing.TB, ip string) *http.Client {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: dialer.DialContext}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// TestE2ETrustedProxyClientAddress: behind a trusted ingress, Synapse
// records the client the ingress saw; from an untrusted peer, a made-up
// X-Forwarded-For changes nothing.
func TestE2ETrustedProxyClientAddress(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	const ingress, outsider = "127.0.0.2", "127.0.0.3"
	px := e2eStartProxy(t, syn.URL, map[string]string{"TRUSTED_PROXIES": ingress + "/32"})
	admin := syn.Register(t, "trustadmin", true)
	u := syn.Register(t, "trusted", false)
	sess := e2eLogin(t, syn.URL, u, nil)

	// Through the ingress: the client wrote 6.6.6.6, the ingress appended
	// the address it saw, 198.51.100.23.
	viaIngress := e2eClientFrom(t, ingress)
	for _, path := range []string{"/_matrix/client/v3/account/whoami", "/_matrix/client/v3/devices"} {
		e2eWantStatus(t, e2eDo(t, viaIngress, http.MethodGet, px.URL+path, sess.Token, nil,
			"X-Forwarded-For", "6.6.6.6, 198.51.100.23"), http.StatusOK)
	}
	// Straight from an untrusted peer claiming to be someone else.
	e2eWantStatus(t, e2eDo(t, e2eClientFrom(t, outsider), http.MethodGet, px.URL+"/_matrix/client/v3/devices", sess.Token, nil,
		"X-Forwarded-For", "198.51.100.99"), http.StatusOK)

	var ips []string
	e2eEventually(t, 5*time.Second, "whois lists both client addresses", func() string {
		r := e2eDo(t, nil, http.MethodGet, syn.URL+"/_synapse/admin/v1/whois/"+e2ePath(u.ID), admin.Token, nil)
		ips = e2eCollectIPs(r.JSON(t))
		if !slices.Contains(ips, "198.51.100.23") || !slices.Contains(ips, outsider) {
			return fmt.Sprintf("connections %v", ips)
		}
		return ""
	})
	for _, bad := range []string{"6.6.6.6", "198.51.100.99", ingress} {
		if slices.Contains(ips, bad) {
			t.Errorf("Synapse recorded %s: connections %v", bad, ips)
		}
	}
}

// TestE2ERateLimit: the proxy's 429s are real M_LIMIT_EXCEEDED answers a
// Matrix client library honours (wait retry_after_ms / Retry-After, then
// succeed), and a spray of made-up tokens from one address stops reaching
// Synapse after the burst.
func TestE2ERateLimit(t *testing.T) {
	e2eShort(t)
	t.Parallel()
	syn := e2eSharedSynapse(t)
	syn.DumpOnFailure(t)
	const burst = 5
	px := e2eStartProxy(t, syn.URL, map[string]string{"RATE_LIMIT_RPS": "2", "RATE_LIMIT_BURST": strconv.Itoa(burst)})
	u := syn.Register(t, "limited", false)
	sess := e2eLogin(t, syn.URL, u, nil)

	t.Run("a client honouring retry_after_ms gets through", func(t *testing.T) {
		client := e2eClientFrom(t, "127.0.0.4")
		var limited e2eResp
		for i := range burst + 2 {
			r := e2eDo(t, client, http.MethodGet, px.URL+"/_matrix/client/v3/devices", sess.Token, nil)
			if r.Status == http.StatusTooManyRequests {
				limited = r
				break
			}
			e2eWantStatus(t, r, http.StatusOK)
			if i >= burst+1 {
				t.Fatalf("no 429 after %d requests", i+1)
			}
		}
		body := limited.JSON(t)
		ms, _ := body["retry_after_ms"].(float64)
		if limited.Errcode() != "M_LIMIT_EXCEEDED" || ms <= 0 {
			t.Fatalf("429 body %s", limited.Body)
		}
		ra, err := strconv.Atoi(limited.Header.Get("Retry-After"))
		if err != nil || ra < 1 || float64(ra)*1000 < ms {
			t.Errorf("Retry-After %q for retry_after_ms %v", limited.Header.Get("Retry-After"), ms)
		}
		if limited.Header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("no CORS header on the 429: %v", limited.Header)
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		e2eWantStatus(t, e2eDo(t, client, http.MethodGet, px.URL+"/_matrix/client/v3/devices", sess.Token, nil), http.StatusOK)
	})

	t.Run("a spray of made-up tokens stops at the burst", func(t *testing.T) {
		client := e2eClientFrom(t, "127.0.0.5")
		before := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_upstream_whoami_requests_total{code="401"}`)
		statuses := map[int]int{}
		for i := range 50 {
			statuses[e2eDo(t, client, http.MethodGet, px.URL+"/_matrix/client/v3/account/whoami", fmt.Sprintf("syt_spray_%d_%d", i, time.Now().UnixNano()), nil).Status]++
		}
		asked := e2eMetric(t, px.AdminURL, `matrix_auth_proxy_upstream_whoami_requests_total{code="401"}`) - before
		// The spray takes a moment, so the bucket refills a little (2/s).
		if asked > burst+2 || statuses[http.StatusTooManyRequests] < 50-burst-2 {
			t.Errorf("Synapse was asked %v times; answers %v", asked, statuses)
		}
	})
}
