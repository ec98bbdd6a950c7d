package proxy

import (
	"net/url"
	"strings"
	"unicode/utf8"
)

// How Synapse's stack reads the parts of a request the proxy must read the
// same way: Python's urllib.parse.unquote for path parameters, Twisted's
// parse_qs for query strings (and form bodies). Reading them the way Go's
// stricter parsers do would let a client show the proxy one request and the
// homeserver another.

// unquote decodes percent-escapes as Python's urllib.parse.unquote does: a
// malformed escape is kept as it is. With plus, '+' is a space (query
// strings, as Twisted's parse_qs reads them).
func unquote(s string, plus bool) string {
	if strings.IndexByte(s, '%') < 0 && (!plus || strings.IndexByte(s, '+') < 0) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
		case c == '+' && plus:
			b.WriteByte(' ')
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	default:
		return c - '0'
	}
}

// synapseQuery parses a raw query the way Synapse sees it (Twisted's
// parse_qs with keep_blank_values): pairs are split on '&' and ';', a pair
// without '=' is ignored, '+' is a space and a malformed escape stays as it
// is. Unlike url.ParseQuery it never fails, so a query Go would reject
// cannot hide a token or a parameter from the proxy.
func synapseQuery(raw string) url.Values {
	q := url.Values{}
	for len(raw) > 0 {
		var item string
		if i := strings.IndexAny(raw, "&;"); i >= 0 {
			item, raw = raw[:i], raw[i+1:]
		} else {
			item, raw = raw, ""
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			continue
		}
		k = unquote(k, true)
		q[k] = append(q[k], unquote(v, true))
	}
	return q
}

// replaceInvalidUTF8 is Python's bytes.decode("utf-8", "replace"): each
// maximal subpart of an ill-formed sequence (Unicode, table 3-8) becomes
// one U+FFFD.
func replaceInvalidUTF8(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r != utf8.RuneError || n > 1 {
			b.WriteString(s[i : i+n])
			i += n
			continue
		}
		b.WriteRune(utf8.RuneError)
		i += maximalSubpart(s[i:])
	}
	return b.String()
}

// maximalSubpart is the length of the ill-formed sequence at the start of
// s: a lead byte and the continuation bytes that could still have followed
// it, or 1.
func maximalSubpart(s string) int {
	lo, hi, need := byte(0x80), byte(0xBF), 0
	switch c := s[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		lo, need = 0xA0, 2
	case c == 0xED:
		hi, need = 0x9F, 2
	case c >= 0xE1 && c <= 0xEF:
		need = 2
	case c == 0xF0:
		lo, need = 0x90, 3
	case c == 0xF4:
		hi, need = 0x8F, 3
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	}
	n := 1
	for ; n <= need && n < len(s) && s[n] >= lo && s[n] <= hi; n++ {
		lo, hi = 0x80, 0xBF
	}
	return n
}
