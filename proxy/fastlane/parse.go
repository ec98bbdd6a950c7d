package fastlane

import (
	"bytes"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// parseHead reads the request head in head (its blank line included) into
// req, when the head is one the fast lane serves: an HTTP/1.1 GET or HEAD
// in origin form, one valid Host, no body and no field that could announce
// one (Content-Length, Transfer-Encoding, Trailer, Expect), no Upgrade, every
// field a token name with a value of visible ASCII, space and tab, each
// line ending in CRLF. It reads them as net/http's server does, into the
// same Request fields (FuzzParseHead checks against net/http). Anything
// else returns false and goes to net/http, which decides what it is.
//
// The strings in req share one copy of head.
func parseHead(head []byte, req *http.Request) bool {
	// Request line.
	var method string
	switch {
	case bytes.HasPrefix(head, []byte("GET /")):
		method, head = http.MethodGet, head[4:]
	case bytes.HasPrefix(head, []byte("HEAD /")):
		method, head = http.MethodHead, head[5:]
	default:
		return false
	}
	eol := bytes.IndexByte(head, '\n')
	if eol < 0 {
		return false
	}
	line := head[:eol]
	const proto = " HTTP/1.1\r"
	if !bytes.HasSuffix(line, []byte(proto)) {
		return false
	}
	target := line[:len(line)-len(proto)]
	for _, b := range target {
		if b <= ' ' || b >= 0x7f {
			return false
		}
	}
	s := string(head) // the one copy
	rest := s[eol+1:]
	requestURI := s[:len(target)]
	u, err := url.ParseRequestURI(requestURI)
	if err != nil {
		return false
	}

	// Fields. Count them first: one slice backs every value, as in
	// net/textproto.
	n := bytes.Count(head[eol+1:], []byte("\n")) - 1
	if n < 1 {
		return false // no Host
	}
	h := make(http.Header, n)
	vals := make([]string, n)
	var host string
	hosts := 0
	for {
		eol := strings.IndexByte(rest, '\n')
		if eol < 1 || rest[eol-1] != '\r' {
			return false
		}
		line := rest[:eol-1]
		rest = rest[eol+1:]
		if line == "" {
			break
		}
		colon := strings.IndexByte(line, ':')
		if colon < 1 {
			return false
		}
		name := line[:colon]
		for i := 0; i < len(name); i++ {
			if !httpguts.IsTokenRune(rune(name[i])) {
				return false
			}
		}
		value := line[colon+1:]
		for i := 0; i < len(value); i++ {
			if b := value[i]; (b < ' ' && b != '\t') || b >= 0x7f {
				return false
			}
		}
		value = textproto.TrimString(value) // no CR or LF left to trim: spaces and tabs
		key := canonicalKey(name)
		switch key {
		case "Host":
			hosts++
			host = value
		case "Content-Length", "Transfer-Encoding", "Trailer", "Expect", "Upgrade":
			return false
		}
		if len(vals) == 0 {
			return false // more fields than lines: cannot be
		}
		vv := h[key]
		if vv == nil {
			vals[0] = value
			h[key] = vals[:1:1]
			vals = vals[1:]
		} else {
			h[key] = append(vv, value)
		}
	}
	if rest != "" || hosts != 1 || !httpguts.ValidHostHeader(host) {
		return false
	}
	if hp := h["Pragma"]; len(hp) > 0 && hp[0] == "no-cache" {
		if _, ok := h["Cache-Control"]; !ok {
			h["Cache-Control"] = []string{"no-cache"}
		}
	}
	conn := h["Connection"]
	if httpguts.HeaderValuesContainsToken(conn, "upgrade") {
		return false
	}
	delete(h, "Host")

	req.Method = method
	req.URL = u
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/1.1", 1, 1
	req.Header = h
	req.Body = http.NoBody
	req.Host = host
	req.RequestURI = requestURI
	req.Close = httpguts.HeaderValuesContainsToken(conn, "close")
	return true
}

// canonicalKey is textproto.CanonicalMIMEHeaderKey for a token name,
// without allocating for the names clients send most.
func canonicalKey(name string) string {
	if k, ok := commonKeys[name]; ok {
		return k
	}
	return textproto.CanonicalMIMEHeaderKey(name)
}

var commonKeys = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{"Accept", "Accept-Encoding", "Accept-Language", "Authorization", "Cache-Control",
		"Connection", "Content-Length", "Content-Type", "Cookie", "Host", "If-Modified-Since", "If-None-Match",
		"Origin", "Pragma", "Referer", "User-Agent", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
		"X-Real-Ip", "X-Request-Id", "Sec-Fetch-Mode", "Sec-Fetch-Site", "Sec-Fetch-Dest"} {
		m[k] = k
		m[strings.ToLower(k)] = k
	}
	return m
}()
