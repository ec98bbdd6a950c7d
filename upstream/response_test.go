package upstream

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// nginxAnswer is the passthrough answer of make bench's upstream.
const nginxAnswer = "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 16:03:59 GMT\r\n" +
	"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n" +
	"Cache-Control: no-cache, no-store, must-revalidate\r\nAccess-Control-Allow-Origin: *\r\n" +
	"Synapse-Trace-Id: 7cba54c05d6d0b395efddd512229b014\r\n\r\n{}"

// readBoth reads answer with readPlainResponse and with http.ReadResponse.
// plain is nil when readPlainResponse declined; then nothing of the answer
// must have been consumed, which the standard reading checks by reading it
// from the same buffer.
func readBoth(t *testing.T, answer, method string) (plain, std *http.Response, plainBody, stdBody []byte, stdErr error) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://hs/x", nil)
	br := bufio.NewReaderSize(strings.NewReader(answer), 32<<10)
	_, _ = br.Peek(1)
	plain, ok := readPlainResponse(br, req)
	if ok {
		var err error
		plainBody, err = io.ReadAll(plain.Body)
		if err != nil {
			plainBody = append(plainBody, []byte("<"+err.Error()+">")...)
		}
		if rest, _ := io.ReadAll(br); len(rest) > 0 {
			plainBody = append(plainBody, []byte("<rest "+string(rest)+">")...)
		}
	} else if br.Buffered() != min(len(answer), 32<<10) {
		t.Fatalf("declined after consuming %d bytes", min(len(answer), 32<<10)-br.Buffered())
	}
	br = bufio.NewReaderSize(strings.NewReader(answer), 32<<10)
	std, stdErr = http.ReadResponse(br, req)
	if stdErr == nil {
		var err error
		stdBody, err = io.ReadAll(std.Body)
		if err != nil {
			stdBody = append(stdBody, []byte("<"+err.Error()+">")...)
		}
		if rest, _ := io.ReadAll(br); len(rest) > 0 {
			stdBody = append(stdBody, []byte("<rest "+string(rest)+">")...)
		}
	}
	return plain, std, plainBody, stdBody, stdErr
}

// sameAnswer fails t unless what readPlainResponse read is what
// http.ReadResponse read.
func sameAnswer(t *testing.T, answer string, plain, std *http.Response, plainBody, stdBody []byte, stdErr error) {
	t.Helper()
	if stdErr != nil {
		t.Fatalf("readPlainResponse accepted what http.ReadResponse refuses (%v): %q", stdErr, answer)
	}
	type fields struct {
		Status                             string
		StatusCode, ProtoMajor, ProtoMinor int
		Proto                              string
		Header                             http.Header
		ContentLength                      int64
		TransferEncoding                   []string
		Close, Uncompressed                bool
		Trailer                            http.Header
		NoBody                             bool
	}
	of := func(r *http.Response) fields {
		return fields{r.Status, r.StatusCode, r.ProtoMajor, r.ProtoMinor, r.Proto, r.Header, r.ContentLength,
			r.TransferEncoding, r.Close, r.Uncompressed, r.Trailer, r.Body == http.NoBody}
	}
	if got, want := of(plain), of(std); !reflect.DeepEqual(got, want) {
		t.Fatalf("answer %q:\nreadPlainResponse %+v\nhttp.ReadResponse %+v", answer, got, want)
	}
	if !bytes.Equal(plainBody, stdBody) {
		t.Fatalf("answer %q: body %q, http.ReadResponse's %q", answer, plainBody, stdBody)
	}
}

func TestReadPlainResponse(t *testing.T) {
	for _, c := range []struct {
		name   string
		answer string
		method string
		plain  bool // read here rather than by http.ReadResponse
	}{
		{name: "nginx's passthrough answer", answer: nginxAnswer, plain: true},
		{name: "then the next answer, left in the buffer", answer: nginxAnswer + "HTTP/1.1 200 OK\r\n", plain: true},
		{name: "empty body", answer: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", plain: true},
		{name: "no reason", answer: "HTTP/1.1 404\r\nContent-Length: 1\r\n\r\nx", plain: true},
		{name: "error", answer: "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1\r\n\r\nx", plain: true},
		{name: "lower-case names", answer: "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nx-a: b\r\nX-a: c\r\n\r\nx", plain: true},
		{name: "repeated names", answer: "HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nContent-Length: 1\r\nSet-Cookie: b\r\n\r\nx", plain: true},
		{name: "values trimmed", answer: "HTTP/1.1 200 OK\r\nX-A: \t a b \t\r\nX-B:\r\nContent-Length:  1 \r\n\r\nx", plain: true},
		{name: "obs-text kept", answer: "HTTP/1.1 200 OK\r\nX-A: caf\xc3\xa9\r\nContent-Length: 1\r\n\r\nx", plain: true},
		{name: "body cut short", answer: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", plain: true},
		{name: "HEAD: to http.ReadResponse", answer: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method: "HEAD"},
		{name: "chunked", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"},
		{name: "chunked and a length", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"},
		{name: "no length", answer: "HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nuntil the end"},
		{name: "two lengths", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"},
		{name: "two different lengths", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx"},
		{name: "signed length", answer: "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx"},
		{name: "length with a comma", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\nx"},
		{name: "Connection: close", answer: "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"},
		{name: "Connection: keep-alive, close", answer: "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\nx"},
		{name: "Trailer", answer: "HTTP/1.1 200 OK\r\nTrailer: X\r\nContent-Length: 1\r\n\r\nx"},
		{name: "Pragma", answer: "HTTP/1.1 200 OK\r\nPragma: no-cache\r\nContent-Length: 1\r\n\r\nx"},
		{name: "HTTP/1.0", answer: "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"},
		{name: "two spaces", answer: "HTTP/1.1  200 OK\r\nContent-Length: 1\r\n\r\nx"},
		{name: "103 first", answer: "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"},
		{name: "204", answer: "HTTP/1.1 204 No Content\r\nContent-Length: 1\r\n\r\n"},
		{name: "304", answer: "HTTP/1.1 304 Not Modified\r\nContent-Length: 1\r\n\r\n"},
		{name: "status 600", answer: "HTTP/1.1 600 X\r\nContent-Length: 1\r\n\r\nx"},
		{name: "folded line", answer: "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 1\r\n\r\nx"},
		{name: "space before the colon", answer: "HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 1\r\n\r\nx"},
		{name: "bare LF", answer: "HTTP/1.1 200 OK\nContent-Length: 1\n\nx"},
		{name: "bare LF inside", answer: "HTTP/1.1 200 OK\r\nX-A: a\nContent-Length: 9\r\nContent-Length: 1\r\n\r\nx"},
		{name: "bare CR inside", answer: "HTTP/1.1 200 OK\r\nX-A: a\rContent-Length: 9\r\nContent-Length: 1\r\n\r\nx"},
		{name: "NUL in a value", answer: "HTTP/1.1 200 OK\r\nX-A: a\x00\r\nContent-Length: 1\r\n\r\nx"},
		{name: "head not whole yet", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			method := c.method
			if method == "" {
				method = "GET"
			}
			plain, std, plainBody, stdBody, stdErr := readBoth(t, c.answer, method)
			if (plain != nil) != c.plain {
				t.Fatalf("read here: %v, want %v", plain != nil, c.plain)
			}
			if plain != nil {
				sameAnswer(t, c.answer, plain, std, plainBody, stdBody, stdErr)
			}
		})
	}
}

func TestFixedBodyEndsWithItsLength(t *testing.T) {
	// io.EOF comes with the last bytes, so that the connection goes back
	// to the pool without another read; bytes after them stay unread.
	br := bufio.NewReader(iotest.OneByteReader(strings.NewReader("abcNEXT")))
	b := &fixedBody{r: br, n: 3}
	var got []byte
	p := make([]byte, 8)
	for {
		n, err := b.Read(p)
		got = append(got, p[:n]...)
		if err != nil {
			if err != io.EOF || string(got) != "abc" {
				t.Fatalf("read %q, then %v", got, err)
			}
			break
		}
	}
	if rest, _ := io.ReadAll(br); string(rest) != "NEXT" {
		t.Errorf("left %q, want NEXT", rest)
	}
	short := &fixedBody{r: bufio.NewReader(strings.NewReader("ab")), n: 3}
	if _, err := io.ReadAll(short); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("cut short: %v, want io.ErrUnexpectedEOF", err)
	}
}

// FuzzReadPlainResponse: whatever readPlainResponse reads, http.ReadResponse
// reads the same way (status, header, framing, body, what is left after
// it); whatever it declines, it has not consumed.
func FuzzReadPlainResponse(f *testing.F) {
	f.Add(nginxAnswer)
	f.Add("HTTP/1.1 200 OK\r\ncontent-length: 1\r\nx-a: b\r\nX-a: c\r\n\r\nx")
	f.Add("HTTP/1.1 404\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
	f.Add("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n1\r\nx\r\n0\r\n\r\n")
	f.Add("HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 1\r\n\r\nx")
	f.Add("HTTP/1.1 200 \x01\r\nConnection: keep-alive, close\r\nContent-Length: 01\r\n\r\nx")
	f.Fuzz(func(t *testing.T, answer string) {
		plain, std, plainBody, stdBody, stdErr := readBoth(t, answer, "GET")
		if plain != nil {
			sameAnswer(t, answer, plain, std, plainBody, stdBody, stdErr)
		}
	})
}

// BenchmarkReadAnswer: nginx's passthrough answer read by readPlainResponse
// and by http.ReadResponse.
func BenchmarkReadAnswer(b *testing.B) {
	req, _ := http.NewRequest("GET", "http://hs/x", nil)
	for _, c := range []struct {
		name string
		read func(*bufio.Reader) (*http.Response, error)
	}{
		{"plain", func(br *bufio.Reader) (*http.Response, error) {
			resp, ok := readPlainResponse(br, req)
			if !ok {
				return nil, errors.New("declined")
			}
			return resp, nil
		}},
		{"http.ReadResponse", func(br *bufio.Reader) (*http.Response, error) { return http.ReadResponse(br, req) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			sr := strings.NewReader(nginxAnswer)
			br := bufio.NewReaderSize(sr, 32<<10)
			for b.Loop() {
				sr.Reset(nginxAnswer)
				br.Reset(sr)
				_, _ = br.Peek(1)
				resp, err := c.read(br)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
			}
		})
	}
}
