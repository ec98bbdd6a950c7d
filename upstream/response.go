package upstream

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/textproto"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// readPlainResponse reads the answer to a GET the way http.ReadResponse
// would, for the one shape nearly every answer on the direct path has: an
// HTTP/1.1 head already whole in br's buffer, a final status other than
// 204 and 304, a Content-Length and nothing that changes how the body is
// framed or how the connection ends. For anything else it returns false
// having consumed nothing, and the caller reads the answer with
// http.ReadResponse, which knows every other case; FuzzReadPlainResponse
// checks that whatever this accepts, http.ReadResponse reads the same.
//
// It is stricter than http.ReadResponse, never looser: one space after
// the version, header names that are tokens (canonicalized as textproto
// does), values of the bytes textproto admits, CRLF line ends, no folded
// lines, one Content-Length of digits, no Transfer-Encoding, Trailer,
// Pragma or Connection: close. Whole-head parsing costs one string for
// the head (names and values are slices of it), the map and one slice of
// values, where textproto made a string per value: the answer's head was
// about 7% of a passthrough's CPU (make bench, issue 15).
func readPlainResponse(br *bufio.Reader, req *http.Request) (*http.Response, bool) {
	if req.Method != http.MethodGet {
		return nil, false
	}
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, crlf2)
	if end < 0 {
		return nil, false
	}
	head := string(buf[:end+2]) // every line with its CRLF
	line, rest, _ := strings.Cut(head, "\r\n")
	if len(line) < len("HTTP/1.1 200") || line[:len("HTTP/1.1 ")] != "HTTP/1.1 " ||
		len(line) > len("HTTP/1.1 200") && line[len("HTTP/1.1 200")] != ' ' {
		return nil, false
	}
	status := line[len("HTTP/1.1 "):]
	code := 0
	for i := range 3 {
		d := status[i]
		if d < '0' || d > '9' {
			return nil, false
		}
		code = code*10 + int(d-'0')
	}
	if code < 200 || code > 599 || code == http.StatusNoContent || code == http.StatusNotModified {
		return nil, false
	}
	for i := 0; i < len(status); i++ {
		if b := status[i]; b < ' ' && b != '\t' || b == 0x7f {
			return nil, false
		}
	}

	lines := strings.Count(rest, "\r\n")
	h := make(http.Header, lines)
	values := make([]string, lines)
	length, lengths := int64(0), 0
	for rest != "" {
		line, rest, _ = strings.Cut(rest, "\r\n")
		name, value, ok := strings.Cut(line, ":")
		if !ok || !httpguts.ValidHeaderFieldName(name) {
			return nil, false // also a folded line: it starts with a space or tab
		}
		for i := 0; i < len(value); i++ {
			if b := value[i]; b < ' ' && b != '\t' || b == 0x7f {
				return nil, false
			}
		}
		value = strings.Trim(value, " \t")
		name = canonicalName(name)
		switch name {
		case "Transfer-Encoding", "Trailer", "Pragma":
			return nil, false
		case "Content-Length":
			lengths++
			if length, ok = parseLength(value); !ok || lengths > 1 {
				return nil, false
			}
		case "Connection":
			if httpguts.HeaderValuesContainsToken([]string{value}, "close") {
				return nil, false
			}
		}
		if vs := h[name]; vs != nil {
			h[name] = append(vs, value)
			continue
		}
		values[0] = value
		h[name], values = values[:1:1], values[1:]
	}
	if lengths != 1 {
		return nil, false // no length: the body ends when the connection does
	}
	_, _ = br.Discard(end + 4)
	resp := &http.Response{Status: status, StatusCode: code, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, ContentLength: length, Request: req, Body: http.NoBody}
	if length > 0 {
		resp.Body = &fixedBody{r: br, n: length}
	}
	return resp, true
}

var crlf2 = []byte("\r\n\r\n")

// canonicalName is textproto.CanonicalMIMEHeaderKey without its copy for a
// name already canonical, as nearly all are.
func canonicalName(name string) string {
	upper := true
	for i := 0; i < len(name); i++ {
		c := name[i]
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			return textproto.CanonicalMIMEHeaderKey(name)
		}
		upper = c == '-'
	}
	return name
}

// parseLength parses a Content-Length of digits only (no sign, no spaces
// inside), short enough not to overflow.
func parseLength(s string) (int64, bool) {
	if s == "" || len(s) > 18 {
		return 0, false
	}
	n := int64(0)
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(s[i]-'0')
	}
	return n, true
}

// fixedBody is a body of a known length, read from the connection's
// buffer: like http.ReadResponse's, it reports io.EOF with its last bytes
// and io.ErrUnexpectedEOF when the connection ends before them. Closing
// it is the caller's business (body in transport.go).
type fixedBody struct {
	r *bufio.Reader
	n int64
}

func (b *fixedBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.r.Read(p)
	b.n -= int64(n)
	switch {
	case b.n == 0:
		err = io.EOF
	case err == io.EOF:
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *fixedBody) Close() error { return nil }
