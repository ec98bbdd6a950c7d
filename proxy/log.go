package proxy

import (
	"net/url"
	"strings"
)

// What of a request's path and query reaches a log line.
//
// Matrix carries secrets in places a generic proxy would log: access tokens
// in ?access_token= (Client-Server API, "Using access tokens"), registration
// tokens in Synapse's admin path /_synapse/admin/v1/registration_tokens/{token}
// and in ?token= of the validity check, OIDC and CAS callbacks' code, state
// and ticket, 3PID validation token, client_secret and sid, consent HMACs
// (?h=), rendezvous and delayed-event IDs that are capabilities by
// themselves. A list of known-bad names always misses the next one, so the
// query is logged by allowlist (loggedQuery) and the path by a small table of
// secret-carrying segments (secretSegments) backed by a test of every
// segment's shape (secretShaped).

// redacted replaces what is not logged.
const redacted = "REDACTED"

// unparseableQuery replaces a query whose escapes do not decode: its parts
// cannot be told apart, any of them might be a token.
const unparseableQuery = "UNPARSEABLE-REDACTED"

// Bounds on what one log line carries of a query.
const (
	maxLoggedParams = 32  // parameters; more are summed up as "&..."
	maxLoggedValue  = 128 // bytes of one logged value, before escaping
	maxPlainName    = 32  // bytes of a name logged without its value
)

// queryPolicy is what of one query parameter is logged.
type queryPolicy uint8

const (
	// logName logs the name with its value replaced by redacted. It is what
	// every ordinary-looking name not in loggedQuery gets; listing a name as
	// logName only matters for names that do not look ordinary (camelCase).
	logName queryPolicy = iota + 1
	// logValue logs name and value: the value is not a secret and helps an
	// operator (a timeout, a page size, the user an appservice acts as).
	// Pagination and sync tokens (since, from, to, pos) are opaque but
	// grant nothing without an access token. A value shaped like a token
	// (tokenPrefixes) is still redacted.
	logValue
)

// loggedQuery lists the query parameters whose values are logged, and the
// few unusual names that are logged without their values. Read only.
var loggedQuery = map[string]queryPolicy{
	// Sync, pagination and long-polling (Client-Server API).
	"timeout": logValue, "since": logValue, "from": logValue, "to": logValue, "dir": logValue,
	"limit": logValue, "filter": logValue, "full_state": logValue, "set_presence": logValue,
	"pos": logValue, "membership": logValue, "not_membership": logValue, "at": logValue,
	"format": logValue, "type": logValue, "kind": logValue, "version": logValue,
	// Appservice masquerading (Application Service API, "Identity
	// assertion"; MSC3202): Matrix IDs and timestamps, not secrets.
	"user_id": logValue, "device_id": logValue, "org.matrix.msc3202.device_id": logValue, "ts": logValue,
	// Rooms, directory, federation-facing choices.
	"via": logValue, "server_name": logValue, "allow_remote": logValue, "server": logValue,
	// Media.
	"width": logValue, "height": logValue, "method": logValue, "animated": logValue,
	"allow_redirect": logValue, "timeout_ms": logValue,
	// Unusual names whose values are secrets or private (SSO login token,
	// SAML), logged by name so an operator still sees the shape of the call.
	"loginToken": logName, "redirectUrl": logName, "SAMLResponse": logName, "RelayState": logName,
}

// logQuery returns what of a raw query may be logged: allowlisted values
// (loggedQuery), other ordinary-looking names with redacted values, and
// redacted in place of a parameter that has no value or an odd name, which
// may itself be a token (?syt_...). Parameters are split at '&' and ';' as
// Synapse (Twisted) splits them, and keep their order. A query that does not
// decode is replaced whole.
func logQuery(raw string) string {
	if raw == "" {
		return ""
	}
	var b strings.Builder
	n := 0
	for pair := range strings.FieldsFuncSeq(raw, isQuerySep) {
		if n == maxLoggedParams {
			b.WriteString("&...")
			break
		}
		k, v, hasValue := strings.Cut(pair, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			return unparseableQuery
		}
		value, err := url.QueryUnescape(v)
		if err != nil {
			return unparseableQuery
		}
		if n > 0 {
			b.WriteByte('&')
		}
		n++
		policy := loggedQuery[name]
		switch {
		case policy == logValue && !hasTokenPrefix(value):
			b.WriteString(name)
			if hasValue {
				b.WriteByte('=')
				b.WriteString(url.QueryEscape(truncate(value, maxLoggedValue)))
			}
		case hasValue && (policy != 0 || plainName(name)):
			b.WriteString(name)
			b.WriteString("=" + redacted)
		default:
			b.WriteString(redacted)
		}
	}
	return b.String()
}

func isQuerySep(r rune) bool { return r == '&' || r == ';' }

// plainName says whether a query parameter's name looks like an ordinary
// Matrix parameter name and may be logged (without its value): short,
// lowercase, and not shaped like a token.
func plainName(s string) bool {
	if s == "" || len(s) > maxPlainName || hasTokenPrefix(s) {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' && c != '.' && c != '-' {
			return false
		}
	}
	return true
}

// truncate cuts s to at most n bytes, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// secretSegment is a path whose segment right after prefix is a secret.
type secretSegment struct {
	prefix []string // path segments, compared without case; "*" is any one
	keep   []string // values of the secret segment that name another endpoint
}

// secretSegments lists the paths that carry a secret in a segment (grep
// Synapse's rest/ for path parameters, and read what each one grants).
// Read only.
var secretSegments = [...]secretSegment{
	// Synapse admin API, registration tokens: GET/PUT/DELETE
	// /_synapse/admin/v1/registration_tokens/{token}; POST .../new creates.
	{prefix: []string{"_synapse", "admin", "*", "registration_tokens"}, keep: []string{"new"}},
	// MSC4108 rendezvous sessions: whoever knows the ID reads and writes
	// the session, without authentication.
	{prefix: []string{"_synapse", "client", "rendezvous"}},
	{prefix: []string{"_matrix", "client", "*", "org.matrix.msc4108", "rendezvous"}},
	// MSC4388 rendezvous: GET/PUT/DELETE .../rendezvous/{id} need no token.
	{prefix: []string{"_matrix", "client", "*", "io.element.msc4388", "rendezvous"}},
	// MSC4140 delayed events: cancel, restart and send need only the delay
	// ID (Synapse generates syd_...).
	{prefix: []string{"_matrix", "client", "*", "org.matrix.msc4140", "delayed_events"}},
}

// logPath returns an escaped request path with the segments that carry
// secrets replaced by redacted: the segments secretSegments names, and any
// segment shaped like a token (secretShaped). Empty segments are skipped
// when matching secretSegments, so //_synapse/admin/... is caught too.
func logPath(p string) string {
	var out []byte // nil until something is redacted: most paths are logged as they are
	alive := uint64(1)<<len(secretSegments) - 1
	k := 0 // index of the current segment among the non-empty ones
	for start := 0; start <= len(p); {
		end := strings.IndexByte(p[start:], '/')
		if end < 0 {
			end = len(p)
		} else {
			end += start
		}
		seg := p[start:end]
		secret := false
		if seg != "" {
			secret, alive = matchSegment(seg, k, alive)
			secret = secret || secretShaped(seg)
			k++
		}
		if secret && out == nil {
			out = append(make([]byte, 0, len(p)), p[:start]...)
		}
		if out != nil {
			if secret {
				out = append(out, redacted...)
			} else {
				out = append(out, seg...)
			}
			if end < len(p) {
				out = append(out, '/')
			}
		}
		start = end + 1
	}
	if out == nil {
		return p
	}
	return string(out)
}

// matchSegment advances the secretSegments still matching (alive, a bit per
// row) by the k-th non-empty segment seg, and says whether seg is the secret
// one of a row that matched all its prefix.
func matchSegment(seg string, k int, alive uint64) (bool, uint64) {
	secret := false
	for i := range secretSegments {
		bit := uint64(1) << i
		if alive&bit == 0 {
			continue
		}
		row := &secretSegments[i]
		switch {
		case k < len(row.prefix):
			if !segmentIs(seg, row.prefix[k]) {
				alive &^= bit
			}
		case k == len(row.prefix):
			secret = secret || !keeps(row.keep, seg)
			alive &^= bit
		}
	}
	return secret, alive
}

// segmentIs compares an escaped path segment with a pattern segment, without
// case and after unescaping: Synapse would not route registration%5Ftokens,
// but the log must not depend on that.
func segmentIs(seg, pattern string) bool {
	if pattern == "*" || strings.EqualFold(seg, pattern) {
		return true
	}
	if strings.IndexByte(seg, '%') < 0 {
		return false
	}
	u, err := url.PathUnescape(seg)
	return err == nil && strings.EqualFold(u, pattern)
}

func keeps(keep []string, seg string) bool {
	for _, k := range keep {
		if seg == k {
			return true
		}
	}
	return false
}

// tokenPrefixes start the tokens Synapse and MAS hand out: Synapse access,
// refresh and login tokens and delayed-event IDs (syt_, syr_, syl_, syd_),
// MAS access, refresh and compatibility tokens (mat_, mar_, mct_, mcr_), and
// the base64 of a macaroon's first packet (MDAx), which older Synapses used
// for access and login tokens.
var tokenPrefixes = [...]string{"syt_", "syr_", "syl_", "syd_", "mat_", "mar_", "mct_", "mcr_", "MDAx"}

func hasTokenPrefix(s string) bool {
	for _, p := range tokenPrefixes {
		if len(s) >= len(p) && strings.EqualFold(s[:len(p)], p) {
			return true
		}
	}
	return false
}

// minRandomLen is the length from which a segment of random-looking
// characters is taken for a secret. Synapse's media IDs (24 letters), device
// IDs (10) and room IDs (a sigil, so never random-looking) stay readable.
const minRandomLen = 32

// secretShaped says whether a path segment looks like a token wherever it
// appears: it starts like one (tokenPrefixes), or it is long and made only of
// the characters of base64 and random strings, mixing at least two of upper
// case, lower case and digits. Matrix IDs (with their sigil and ':'), event
// types and unstable prefixes (with '.') never look like that.
func secretShaped(seg string) bool {
	if strings.IndexByte(seg, '%') >= 0 {
		if u, err := url.PathUnescape(seg); err == nil {
			seg = u
		}
	}
	if hasTokenPrefix(seg) {
		return true
	}
	if len(seg) < minRandomLen {
		return false
	}
	var upper, lower, digit int
	for i := range len(seg) {
		switch c := seg[i]; {
		case c >= 'A' && c <= 'Z':
			upper = 1
		case c >= 'a' && c <= 'z':
			lower = 1
		case c >= '0' && c <= '9':
			digit = 1
		case c == '_' || c == '-' || c == '~' || c == '=' || c == '+':
		default:
			return false
		}
	}
	return upper+lower+digit >= 2
}
