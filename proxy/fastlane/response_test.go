package fastlane

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// op is one thing a handler does to its ResponseWriter.
type op struct {
	kind   byte // h: set header, H: Header() after WriteHeader then set, c: WriteHeader, w: write n bytes, s: WriteString, f: flush, p: panic, a: ErrAbortHandler
	k, v   string
	code   int
	n      int
	method string
}

func scriptHandler(ops []op) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, o := range ops {
			switch o.kind {
			case 'h', 'H':
				if o.v == "" {
					w.Header().Del(o.k)
				} else {
					w.Header().Add(o.k, o.v)
				}
			case 'c':
				w.WriteHeader(o.code)
			case 'w':
				body := bytes.Repeat([]byte("a"), o.n)
				if o.v != "" {
					body = []byte(o.v)
				}
				_, _ = w.Write(body)
			case 's':
				_, _ = io.WriteString(w, o.v)
			case 'f':
				_ = http.NewResponseController(w).Flush()
			case 'p':
				panic("boom")
			case 'a':
				panic(http.ErrAbortHandler)
			}
		}
	})
}

var dateRE = regexp.MustCompile(`Date: [A-Za-z]{3}, \d\d [A-Za-z]{3} \d{4} \d\d:\d\d:\d\d GMT\r\n`)

// exchange sends raw to a server at addr, then a closing request, and
// returns every byte the server sent until it closed.
func exchange(t testing.TB, addr, raw string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, raw+"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	b, _ := io.ReadAll(c)
	return dateRE.ReplaceAllString(string(b), "Date: X\r\n")
}

// pair runs h on a net/http server and on a fast-lane server.
func pair(t testing.TB, h http.Handler) (plain, fast string) {
	plain, fast, _ = pairServer(t, h)
	return plain, fast
}

func pairServer(t testing.TB, h http.Handler) (plain, fast string, fs *Server) {
	t.Helper()
	quiet := log.New(io.Discard, "", 0)
	mk := func() *http.Server {
		return &http.Server{Handler: h, ErrorLog: quiet, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute}
	}
	l1, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s1, s2 := mk(), New(mk())
	go func() { _ = s1.Serve(l1) }()
	go func() { _ = s2.Serve(l2) }()
	t.Cleanup(func() { _ = s1.Close(); _ = s2.Close() })
	return l1.Addr().String(), l2.Addr().String(), s2
}

func responseCases() []struct {
	name string
	ops  []op
} {
	type c = struct {
		name string
		ops  []op
	}
	return []c{
		{"empty", nil},
		{"short body", []op{{kind: 'w', n: 10}}},
		{"json", []op{{kind: 'h', k: "Content-Type", v: "application/json"}, {kind: 's', v: `{"user_id":"@a:b"}`}}},
		{"sniffed html", []op{{kind: 'w', v: "<html><body>x</body></html>"}}},
		{"exact 2048", []op{{kind: 'w', n: 2048}}},
		{"2049 chunked", []op{{kind: 'w', n: 2049}}},
		{"big", []op{{kind: 'w', n: 10000}, {kind: 'w', n: 3}}},
		{"flushed", []op{{kind: 'w', n: 5}, {kind: 'f'}, {kind: 'w', n: 7}}},
		{"flush first", []op{{kind: 'f'}, {kind: 'w', n: 7}}},
		{"content-length", []op{{kind: 'h', k: "Content-Length", v: "5"}, {kind: 'w', n: 5}}},
		{"content-length short", []op{{kind: 'h', k: "Content-Length", v: "9"}, {kind: 'w', n: 5}}},
		{"content-length long", []op{{kind: 'h', k: "Content-Length", v: "3"}, {kind: 'w', n: 5}}},
		{"content-length invalid", []op{{kind: 'h', k: "Content-Length", v: "x"}, {kind: 'w', n: 5}}},
		{"content-length and chunked", []op{{kind: 'h', k: "Content-Length", v: "5"}, {kind: 'h', k: "Transfer-Encoding", v: "chunked"}, {kind: 'w', n: 5}}},
		{"te identity", []op{{kind: 'h', k: "Transfer-Encoding", v: "identity"}, {kind: 'w', n: 5}}},
		{"te chunked", []op{{kind: 'h', k: "Transfer-Encoding", v: "chunked"}, {kind: 'w', n: 5}}},
		{"connection close", []op{{kind: 'h', k: "Connection", v: "close"}, {kind: 'w', n: 5}}},
		{"content-encoding", []op{{kind: 'h', k: "Content-Encoding", v: "gzip"}, {kind: 'w', n: 5}}},
		{"204 with body", []op{{kind: 'c', code: 204}, {kind: 'w', n: 5}}},
		{"304", []op{{kind: 'h', k: "Content-Type", v: "text/plain"}, {kind: 'h', k: "Content-Length", v: "10"}, {kind: 'c', code: 304}}},
		{"401 json", []op{{kind: 'h', k: "Content-Type", v: "application/json"}, {kind: 'c', code: 401}, {kind: 's', v: `{"errcode":"M_UNKNOWN_TOKEN"}`}}},
		{"unknown status", []op{{kind: 'c', code: 299}, {kind: 'w', n: 2}}},
		{"status 999", []op{{kind: 'c', code: 999}}},
		{"early hints", []op{{kind: 'h', k: "Link", v: "</a>; rel=preload"}, {kind: 'c', code: 103}, {kind: 'c', code: 200}, {kind: 'w', n: 3}}},
		{"superfluous", []op{{kind: 'c', code: 201}, {kind: 'c', code: 500}, {kind: 'w', n: 3}}},
		{"header after WriteHeader", []op{{kind: 'h', k: "A", v: "1"}, {kind: 'c', code: 200}, {kind: 'H', k: "B", v: "2"}, {kind: 'w', n: 3}}},
		{"header after WriteHeader untouched before", []op{{kind: 'c', code: 200}, {kind: 'H', k: "B", v: "2"}, {kind: 'w', n: 3}}},
		{"trailers announced", []op{{kind: 'h', k: "Trailer", v: "X-T, X-U"}, {kind: 'w', n: 3}, {kind: 'H', k: "X-T", v: "t"}, {kind: 'H', k: "X-U", v: "u"}}},
		{"trailers prefixed", []op{{kind: 'w', n: 3}, {kind: 'H', k: http.TrailerPrefix + "X-T", v: "t"}}},
		{"trailers forbidden", []op{{kind: 'h', k: "Trailer", v: "Content-Length, X-A"}, {kind: 'w', n: 3}}},
		{"odd header values", []op{{kind: 'h', k: "X-A", v: " spaced\tvalue "}, {kind: 'h', k: "X-B", v: "line\nbreak"}, {kind: 'h', k: "bad name", v: "x"}}},
		{"many headers", []op{{kind: 'h', k: "Z", v: "1"}, {kind: 'h', k: "A", v: "2"}, {kind: 'h', k: "A", v: "3"}, {kind: 'h', k: "M", v: "4"}}},
		{"date set", []op{{kind: 'h', k: "Date", v: "yesterday"}}},
		{"panic before", []op{{kind: 'p'}}},
		{"panic after write", []op{{kind: 'w', n: 10}, {kind: 'p'}}},
		{"panic after flush", []op{{kind: 'w', n: 10}, {kind: 'f'}, {kind: 'p'}}},
		{"abort", []op{{kind: 'w', n: 3000}, {kind: 'a'}}},
		{"101 without upgrade", []op{{kind: 'c', code: 101}}},
	}
}

var requestHeads = []string{
	"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
	"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
	"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n",
}

// TestResponseMatchesNetHTTP: for each handler and request, a fast-lane
// server sends what net/http sends, byte for byte (Date aside).
func TestResponseMatchesNetHTTP(t *testing.T) {
	for _, tc := range responseCases() {
		for _, head := range requestHeads {
			t.Run(tc.name+"/"+strings.Fields(head)[0]+fmt.Sprint(strings.Contains(head, "lose")), func(t *testing.T) {
				plain, fast, fs := pairServer(t, scriptHandler(tc.ops))
				want, got := exchange(t, plain, head), exchange(t, fast, head)
				if got != want {
					t.Errorf("fast lane sent\n%q\nnet/http\n%q", got, want)
				}
				if fs.served.Load() == 0 || fs.handed.Load() != 0 {
					t.Errorf("fast lane served %d requests and handed %d connections to net/http; want all served", fs.served.Load(), fs.handed.Load())
				}
			})
		}
	}
}

// FuzzResponseMatchesNetHTTP: handler scripts decoded from the input.
func FuzzResponseMatchesNetHTTP(f *testing.F) {
	f.Add([]byte("hAw3"), uint8(0))
	f.Add([]byte("c4w9f"), uint8(1))
	f.Add([]byte("hTwHUp"), uint8(2))
	f.Add([]byte("c1c2w0"), uint8(3))
	keys := []string{"Content-Length", "Transfer-Encoding", "Content-Type", "Connection", "Trailer", "X-A",
		http.TrailerPrefix + "X-B", "Date", "Content-Encoding", "X-A"}
	vals := []string{"5", "chunked", "identity", "close", "X-A", "text/plain", "-1", "gzip", "", "keep-alive"}
	codes := []int{200, 204, 304, 404, 103, 299, 500, 101, 100, 206}
	var script atomic.Pointer[[]op]
	p, q := pair(f, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scriptHandler(*script.Load()).ServeHTTP(w, r)
	}))
	f.Fuzz(func(t *testing.T, in []byte, req uint8) {
		if len(in) > 40 {
			return
		}
		ops := []op{}
		for i := 0; i+1 < len(in); i += 2 {
			a, b := in[i], int(in[i+1])
			switch a % 6 {
			case 0:
				ops = append(ops, op{kind: 'h', k: keys[b%10], v: vals[(b/10)%10]})
			case 1:
				ops = append(ops, op{kind: 'H', k: keys[b%10], v: vals[(b/10)%10]})
			case 2:
				ops = append(ops, op{kind: 'c', code: codes[b%10]})
			case 3:
				ops = append(ops, op{kind: 'w', n: b * 20})
			case 4:
				ops = append(ops, op{kind: 'f'})
			case 5:
				ops = append(ops, op{kind: 's', v: strings.Repeat("<", b%5)})
			}
		}
		head := requestHeads[int(req)%len(requestHeads)]
		script.Store(&ops)
		want, got := exchange(t, p, head), exchange(t, q, head)
		if got != want {
			t.Errorf("ops %+v, head %q: fast lane sent\n%q\nnet/http\n%q", ops, head, got, want)
		}
	})
}
