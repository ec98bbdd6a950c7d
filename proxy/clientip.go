package proxy

import (
	"net/http"
	"net/netip"
	"strings"
)

// clientAddr finds the address of the client behind a request: the
// connection's peer, unless that peer is a trusted proxy (TRUSTED_PROXIES,
// e.g. the ingress controller); then the right-most X-Forwarded-For entry
// that is not itself trusted. Entries left of that one were written by the
// client and prove nothing, so a client cannot choose its address: not for
// rate limiting, not for what the homeserver records.
//
// If every entry is trusted, the left-most is the client. If an entry does
// not parse, the walk stops and the last trusted hop is the client: whatever
// is left of garbage is garbage too.
func clientAddr(r *http.Request, trusted []netip.Prefix) netip.Addr {
	peer := parseAddr(r.RemoteAddr)
	if !peer.IsValid() || !inAny(peer, trusted) {
		return peer
	}
	addr := peer
	xff := r.Header["X-Forwarded-For"]
	for i := len(xff) - 1; i >= 0; i-- {
		entries := strings.Split(xff[i], ",")
		for j := len(entries) - 1; j >= 0; j-- {
			a := parseAddr(strings.TrimSpace(entries[j]))
			if !a.IsValid() {
				return addr
			}
			addr = a
			if !inAny(a, trusted) {
				return a
			}
		}
	}
	return addr
}

// parseAddr reads "192.0.2.1", "192.0.2.1:1234", "2001:db8::1" or
// "[2001:db8::1]:443", and unmaps IPv4-mapped IPv6 addresses.
func parseAddr(s string) netip.Addr {
	// Pick the parser by shape first: a failed parse allocates its error,
	// and this runs on every request.
	if strings.HasPrefix(s, "[") || strings.Count(s, ":") == 1 {
		if ap, err := netip.ParseAddrPort(s); err == nil {
			return ap.Addr().Unmap().WithZone("")
		}
		return netip.Addr{}
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap().WithZone("")
	}
	return netip.Addr{}
}

func inAny(a netip.Addr, prefixes []netip.Prefix) bool {
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ParsePrefixes reads a comma-separated list of CIDRs (TRUSTED_PROXIES,
// RATE_LIMIT_EXEMPT_CIDRS). A bare address means just that address. It
// returns the first entry that does not parse.
func ParsePrefixes(list []string) ([]netip.Prefix, string, bool) {
	var out []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, netip.PrefixFrom(p.Addr().Unmap(), unmapBits(p)).Masked())
			continue
		}
		if a, err := netip.ParseAddr(s); err == nil {
			a = a.Unmap()
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		return nil, s, false
	}
	return out, "", true
}

// unmapBits converts the length of a prefix written as IPv4-mapped IPv6
// (::ffff:10.0.0.0/104) to its IPv4 length.
func unmapBits(p netip.Prefix) int {
	if p.Addr().Is4In6() {
		return max(p.Bits()-96, 0)
	}
	return p.Bits()
}
