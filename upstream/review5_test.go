package upstream

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

// Review 5: adversarial checks of the hand-written HTTP/1.1 on the direct
// path (head.go, response.go).

func TestReview5HeadSaysCloseAsRequestWrite(t *testing.T) {
	// Request.Write adds "Connection: close" for req.Close unless the
	// first Connection value has the token close (net/http's hasToken:
	// space, comma or tab boundaries); head looked at every value, as a
	// comma list, so its bytes differed from Request.Write's.
	for _, conn := range [][]string{
		{"keep-alive", "close"},
		{"x close"},
		{"close"},
		{"Close, keep-alive"},
		{"close;q"},
		{"keep-alive"},
		nil,
	} {
		t.Run(fmt.Sprint(conn), func(t *testing.T) {
			newReq := func() *http.Request {
				req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://hs/x", nil)
				req.Close = true
				if conn != nil {
					req.Header["Connection"] = conn
				}
				return req
			}
			got, err := headOf(newReq())
			if err != nil {
				t.Fatal(err)
			}
			want, err := stdHeadOf(newReq())
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("head wrote\n%q\nRequest.Write wrote\n%q", got, want)
			}
		})
	}
}

func TestReview5AdversarialAnswers(t *testing.T) {
	// Answers a misbehaving homeserver could send: whatever
	// readPlainResponse reads must be what http.ReadResponse reads
	// (status, header, length, body, what is left); the rest it declines
	// without consuming anything (readBoth checks that).
	const ok = "HTTP/1.1 200 OK\r\n"
	for _, c := range []struct {
		name   string
		answer string
		plain  bool
	}{
		{"leading zeros", ok + "Content-Length: 007\r\n\r\n1234567rest", true},
		{"length all zeros", ok + "Content-Length: 000\r\n\r\nrest", true},
		{"length with tabs around", ok + "Content-Length:\t2\t\r\n\r\nokrest", true},
		{"length 18 digits", ok + "Content-Length: 000000000000000002\r\n\r\nok", true},
		{"length 19 digits", ok + "Content-Length: 0000000000000000002\r\n\r\nok", false},
		{"length over int64", ok + "Content-Length: 99999999999999999999\r\n\r\nok", false},
		{"length with a space inside", ok + "Content-Length: 1 2\r\n\r\nok", false},
		{"hex length", ok + "Content-Length: 0x2\r\n\r\nok", false},
		{"negative length", ok + "Content-Length: -1\r\n\r\nok", false},
		{"underscore in length", ok + "Content-Length: 1_0\r\n\r\nok", false},
		{"empty length", ok + "Content-Length: \r\n\r\nok", false},
		{"length then a folded line", ok + "Content-Length: 2\r\n 5\r\n\r\nokrest", false},
		{"folded length", ok + "Content-Length:\r\n 2\r\n\r\nok", false},
		{"length name with a tab", ok + "Content-Length\t: 2\r\n\r\nok", false},
		{"length name with NUL", ok + "Content-Length\x00: 2\r\n\r\nok", false},
		{"upper-case length name", ok + "CONTENT-LENGTH: 2\r\n\r\nok", true},
		{"equal lengths in two spellings", ok + "content-length: 2\r\nContent-Length: 2\r\n\r\nok", false},
		{"differing lengths in two spellings", ok + "content-length: 2\r\nCONTENT-LENGTH: 4\r\n\r\nokok", false},
		{"lower-case chunked", ok + "transfer-encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", false},
		{"upper-case chunked", ok + "TRANSFER-ENCODING: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", false},
		{"identity encoding", ok + "Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok", false},
		{"close in the second Connection line", ok + "Connection: keep-alive\r\nconnection: CLOSE\r\nContent-Length: 2\r\n\r\nok", false},
		{"close among tokens", ok + "Connection: upgrade,\tclose \r\nContent-Length: 2\r\n\r\nok", false},
		{"not quite close", ok + "Connection: closed\r\nContent-Length: 2\r\n\r\nok", true},
		{"lower-case pragma", ok + "pragma: no-cache\r\nContent-Length: 2\r\n\r\nok", false},
		{"no reason", "HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", true},
		{"empty reason", "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", true},
		{"reason with obs-text and tab", "HTTP/1.1 200 \xffO\tK\r\nContent-Length: 2\r\n\r\nok", true},
		{"HTTP/1.10", "HTTP/1.10 200 OK\r\nContent-Length: 2\r\n\r\nok", false},
		{"HTTP/1.1 in lower case", "http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false},
		{"four-digit status", "HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", false},
		{"status with a sign", "HTTP/1.1 +20 OK\r\nContent-Length: 2\r\n\r\nok", false},
		{"tab after the status", "HTTP/1.1 200\tOK\r\nContent-Length: 2\r\n\r\nok", false},
		{"status 199", "HTTP/1.1 199 X\r\nContent-Length: 2\r\n\r\nok", false},
		{"status 100 then the answer", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false},
		{"status 101", "HTTP/1.1 101 Switching Protocols\r\nContent-Length: 2\r\n\r\nok", false},
		{"status 599", "HTTP/1.1 599 X\r\nContent-Length: 2\r\n\r\nok", true},
		{"leading empty line", "\r\n" + ok + "Content-Length: 2\r\n\r\nok", false},
		{"CR CR LF line end", ok + "Content-Length: 2\r\r\n\r\nok", false},
		{"LF then CRLF ends the head early for textproto", ok + "Content-Length: 9\n\r\nContent-Length: 2\r\n\r\nok", false},
		{"head ended by LF LF before a CRLF CRLF in the body", ok + "Content-Length: 8\n\nab\r\n\r\ncd", false},
		{"empty name", ok + ": x\r\nContent-Length: 2\r\n\r\nok", false},
		{"line without a colon", ok + "Content-Length 2\r\nContent-Length: 2\r\n\r\nok", false},
		{"DEL in a value", ok + "X-A: \x7f\r\nContent-Length: 2\r\n\r\nok", false},
		{"non-ASCII name", ok + "X-\xc3\xa9: a\r\nContent-Length: 2\r\n\r\nok", false},
		{"colon in the value", ok + "X-A: b: c\r\nContent-Length: 2\r\n\r\nok", true},
		{"many repeated names", ok + strings.Repeat("Set-Cookie: a\r\nset-cookie: b\r\n", 100) + "Content-Length: 2\r\n\r\nok", true},
		{"body with the next head in it", ok + "Content-Length: 40\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			plain, std, plainBody, stdBody, stdErr := readBoth(t, c.answer, "GET")
			if (plain != nil) != c.plain {
				t.Fatalf("read here: %v, want %v", plain != nil, c.plain)
			}
			if plain != nil {
				sameAnswer(t, c.answer, plain, std, plainBody, stdBody, stdErr)
			}
		})
	}
}

func TestReview5AnswerHeadInPieces(t *testing.T) {
	// A head that arrives a few bytes at a time is not whole in the
	// buffer: http.ReadResponse reads it, and the next answer on the
	// connection is still read from its start.
	const answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
	url, conns := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for i := 0; ; i++ {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			for j := 0; j < len(answer); j += 7 {
				if _, err := io.WriteString(c, answer[j:min(j+7, len(answer))]); err != nil {
					return
				}
			}
			if _, err := fmt.Fprintf(c, "body%d", i%10); err != nil {
				return
			}
		}
	})
	tr := newTransport(t)
	for i := range 20 {
		code, body, err := get(t, tr, url+"/x", nil)
		if err != nil || code != 200 || body != fmt.Sprintf("body%d", i%10) {
			t.Fatalf("answer %d: %d %q %v", i, code, body, err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1", n)
	}
}

// FuzzReview5HeadFields: with several fields, repeated values, a
// Connection field and req.Close, whatever head's check admits reads back
// as one head without body framing, carrying every field it was given
// (framing, Host and User-Agent aside), and is Request.Write's bytes when
// the names are canonical.
func FuzzReview5HeadFields(f *testing.F) {
	f.Add("Authorization", "Bearer syt_x", "accept", "*/*", "keep-alive, close", true)
	f.Add("Content-length", "5", "Transfer-encoding", "chunked", "x close", true)
	f.Add("X-A", " a\tb ", "X-A", "c", "close", false)
	f.Add("Accept", "*/*", "X-A", "b", "x close", true)
	f.Add("Accept", "*/*", "X-A", "b", "keep-alive", true)
	f.Fuzz(func(t *testing.T, n1, v1, n2, v2, connection string, close bool) {
		newReq := func() *http.Request {
			req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://hs/x", nil)
			req.Close = close
			req.Header = http.Header{n1: {v1, v2}, "Connection": {connection, v1}}
			req.Header[n2] = append(req.Header[n2], v2)
			return req
		}
		req := newReq()
		got, err := headOf(req)
		if err != nil {
			return
		}
		back, err := http.ReadRequest(bufio.NewReader(strings.NewReader(got)))
		if err != nil {
			t.Fatalf("head %q does not read back: %v", got, err)
		}
		if strings.Count(got, "\r\n\r\n") != 1 || back.ContentLength != 0 || len(back.TransferEncoding) != 0 ||
			back.Host != "hs" || back.RequestURI != "/x" {
			t.Fatalf("head %q reads back as %q to %q, length %d, encoding %q", got, back.RequestURI, back.Host,
				back.ContentLength, back.TransferEncoding)
		}
		// Where the Connection values name no close, head must add one
		// (where they do, it follows Request.Write, compared below).
		if close && !back.Close && !strings.Contains(strings.ToLower(connection+v1), "close") {
			t.Fatalf("head %q: asked to close, does not say so", got)
		}
		for k, vs := range req.Header {
			if excludedField(k) {
				continue
			}
			want := make([]string, len(vs))
			for i, v := range vs {
				want[i] = strings.Trim(v, " \t")
			}
			have := back.Header[http.CanonicalHeaderKey(k)]
			if k == http.CanonicalHeaderKey(k) && len(have) < len(want) ||
				len(have) > 0 && !strings.Contains(strings.Join(have, "\x00"), strings.Join(want, "\x00")) {
				t.Fatalf("head %q: %s read back as %q, want %q among them", got, k, have, want)
			}
		}
		if n1 == http.CanonicalHeaderKey(n1) && n2 == http.CanonicalHeaderKey(n2) {
			if std, err := stdHeadOf(newReq()); err == nil && std != got {
				t.Fatalf("head wrote\n%q\nRequest.Write wrote\n%q", got, std)
			}
		}
	})
}
