package upstream

import (
	"bufio"
	"errors"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"slices"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// head is the head of a body-less GET or HEAD (what direct admits), checked
// by check and then written by write as Request.Write writes it to a
// server, byte for byte: request line, Host, User-Agent (Go's default
// unless the header has one; an empty one sends none), Connection: close
// if req.Close, then the other fields sorted by name.
//
// check does Request.Write's and http.Transport's checks before anything
// is sent: header names must be tokens and values free of control
// characters other than tab, the request target free of control
// characters (and, stricter, of spaces, and a path), the Host valid or else sent
// empty. Host, User-Agent, Content-Length, Transfer-Encoding and Trailer
// fields of req.Header are never copied: Request.Write skips their
// canonical spellings, this any spelling, so no body framing can slip in.
//
// Request.Write costs a transferWriter, fmt formatting and a sorted copy of
// the header per request: about 4% of a passthrough's CPU on the sidecar's
// hot path (make bench, issue 15).
type head struct {
	req          *http.Request
	host, target string
	n            int
	small        [16]string // the names to copy, when they fit (the common case)
	more         []string   // all of them, when they do not
}

// check works out and checks what write will send.
func (h *head) check(req *http.Request) error {
	h.req = req
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	host, err := httpguts.PunycodeHostPort(host)
	if err != nil {
		return err
	}
	if !httpguts.ValidHostHeader(host) {
		// As Request.Write: an altered Host would be a smuggling vector,
		// an empty one is valid (RFC 9112, section 3.2).
		host = ""
	}
	h.host = removeZone(host)
	h.target = req.URL.RequestURI()
	if h.target[0] != '/' {
		return errBadTarget // not origin-form (RFC 9112, section 3.2.1)
	}
	for i := 0; i < len(h.target); i++ {
		if b := h.target[i]; b <= ' ' || b == 0x7f {
			return errBadTarget
		}
	}
	h.n, h.more = 0, nil
	for k, vs := range req.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return errBadFieldName
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return errBadFieldValue
			}
		}
		switch {
		case excludedField(k):
		case h.more != nil:
			h.more = append(h.more, k)
		case h.n == len(h.small):
			h.more = make([]string, h.n, 2*h.n)
			copy(h.more, h.small[:])
			h.more = append(h.more, k)
		default:
			h.small[h.n] = k
			h.n++
		}
	}
	slices.Sort(h.names())
	return nil
}

func (h *head) names() []string {
	if h.more != nil {
		return h.more
	}
	return h.small[:h.n]
}

// write writes the head checked by check.
func (h *head) write(w *bufio.Writer) error {
	req := h.req
	trace := httptrace.ContextClientTrace(req.Context())
	traced := trace != nil && trace.WroteHeaderField != nil
	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	w.WriteString(method)
	w.WriteByte(' ')
	w.WriteString(h.target)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(h.host)
	w.WriteString("\r\n")
	if traced {
		trace.WroteHeaderField("Host", []string{h.host})
	}
	ua := defaultUserAgent
	if vs, ok := req.Header["User-Agent"]; ok {
		ua = ""
		if len(vs) > 0 {
			ua = vs[0]
		}
	}
	if ua != "" { // before trimming, as Request.Write: " " sends an empty one
		ua = textproto.TrimString(ua)
		w.WriteString("User-Agent: ")
		w.WriteString(ua)
		w.WriteString("\r\n")
		if traced {
			trace.WroteHeaderField("User-Agent", []string{ua})
		}
	}
	if req.Close && !saysClose(req.Header["Connection"]) {
		w.WriteString("Connection: close\r\n")
		if traced {
			trace.WroteHeaderField("Connection", []string{"close"})
		}
	}
	for _, k := range h.names() {
		vs := req.Header[k]
		for _, v := range vs {
			w.WriteString(k)
			w.WriteString(": ")
			w.WriteString(textproto.TrimString(v))
			w.WriteString("\r\n")
		}
		if traced {
			trimmed := make([]string, len(vs))
			for i, v := range vs {
				trimmed[i] = textproto.TrimString(v)
			}
			trace.WroteHeaderField(k, trimmed)
		}
	}
	_, err := w.WriteString("\r\n")
	if trace != nil && trace.WroteHeaders != nil {
		trace.WroteHeaders()
	}
	return err
}

// saysClose is Request.Write's test before it adds "Connection: close"
// for req.Close (net/http's hasToken on the first value: "close" between
// spaces, commas or tabs, any case), so that head writes the same bytes.
// Either way the request says close; only repeats differ.
func saysClose(vs []string) bool {
	if len(vs) == 0 {
		return false
	}
	v := vs[0]
	const token = "close"
	for sp := 0; sp+len(token) <= len(v); sp++ {
		end := sp + len(token)
		if sp > 0 && !isTokenBoundary(v[sp-1]) || end < len(v) && !isTokenBoundary(v[end]) {
			continue
		}
		i := 0
		for i < len(token) && v[sp+i]|0x20 == token[i] { // token is lower-case letters
			i++
		}
		if i == len(token) {
			return true
		}
	}
	return false
}

func isTokenBoundary(b byte) bool { return b == ' ' || b == ',' || b == '\t' }

// defaultUserAgent is what Request.Write sends when the header names none.
const defaultUserAgent = "Go-http-client/1.1"

var (
	errBadTarget     = errors.New("upstream: request target not a path, or with a space or control character")
	errBadFieldName  = errors.New("upstream: invalid header field name")
	errBadFieldValue = errors.New("upstream: invalid header field value")
)

// excludedField says whether writeHead leaves a field of req.Header out:
// those it writes itself (Host, User-Agent) and body framing, which a
// body-less request must not carry.
func excludedField(k string) bool {
	switch len(k) {
	case len("Host"):
		return strings.EqualFold(k, "Host")
	case len("Trailer"):
		return strings.EqualFold(k, "Trailer")
	case len("User-Agent"):
		return strings.EqualFold(k, "User-Agent")
	case len("Content-Length"):
		return strings.EqualFold(k, "Content-Length")
	case len("Transfer-Encoding"):
		return strings.EqualFold(k, "Transfer-Encoding")
	}
	return false
}

// removeZone drops an IPv6 zone from a Host ("[fe80::1%en0]:80"), as
// Request.Write does: the zone means something only on this machine.
func removeZone(host string) string {
	if !strings.HasPrefix(host, "[") {
		return host
	}
	i := strings.LastIndex(host, "]")
	if i < 0 {
		return host
	}
	j := strings.LastIndex(host[:i], "%")
	if j < 0 {
		return host
	}
	return host[:j] + host[i:]
}
