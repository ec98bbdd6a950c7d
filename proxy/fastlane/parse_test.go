package fastlane

import (
	"io"
	"log"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"
)

// netHTTPReads returns the request net/http's server hands its handler
// for head, or nil when it answers the head itself (400, 431, 505…).
func netHTTPReads(t testing.TB) func(head string) *http.Request {
	ln := newHandoffListener(&net.TCPAddr{})
	got := make(chan *http.Request, 1)
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return func(head string) *http.Request {
		a, b := net.Pipe()
		defer a.Close()
		if !ln.give(b) {
			t.Fatal("listener closed")
		}
		go func() {
			_, _ = io.WriteString(a, head)
		}()
		go func() {
			_, _ = io.Copy(io.Discard, a)
		}()
		select {
		case r := <-got:
			return r
		case <-time.After(200 * time.Millisecond):
			return nil
		}
	}
}

var headSeeds = []struct {
	head string
	fast bool // served on the fast lane
}{
	{"GET / HTTP/1.1\r\nHost: a\r\n\r\n", true},
	{"GET /_matrix/client/v3/account/whoami HTTP/1.1\r\nHost: matrix.example.org\r\nAuthorization: Bearer syt_abc\r\nUser-Agent: x\r\n\r\n", true},
	{"HEAD /a/%2F/b?x=1&y=%zz;z HTTP/1.1\r\nhost: a:8008\r\nconnection: keep-alive\r\naccept-encoding: gzip\r\n\r\n", true},
	{"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nX-Empty:\r\nX-Tab:\t v \t\r\n\r\n", true},
	{"GET /x HTTP/1.1\r\nHost: a\r\nPragma: no-cache\r\n\r\n", true},
	{"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", true},
	{"GET /x#f HTTP/1.1\r\nHost: [::1]:80\r\nx_y: z\r\n\r\n", true},
	{"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\n\r\n", false},
	{"GET /x HTTP/1.0\r\nHost: a\r\n\r\n", false},
	{"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", false},
	{"GET /x HTTP/1.1\nHost: a\n\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n", false},
	{"GET /x HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", false},
	{"GET  /x HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"get /x HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", false},
}

// FuzzParseHead: whatever head the fast lane takes, net/http's server takes
// too and reads into the same request.
func FuzzParseHead(f *testing.F) {
	for _, s := range headSeeds {
		f.Add(s.head)
	}
	reads := netHTTPReads(f)
	f.Fuzz(func(t *testing.T, head string) {
		if !strings.HasSuffix(head, "\r\n\r\n") || strings.Count(head, "\r\n\r\n") != 1 || len(head) > headBuffer {
			return
		}
		var mine http.Request
		if !parseHead([]byte(head), &mine) {
			return
		}
		theirs := reads(head)
		if theirs == nil {
			t.Fatalf("fast lane took %q, net/http answered it itself", head)
		}
		same := func(name string, a, b any) {
			if !reflect.DeepEqual(a, b) {
				t.Errorf("%q: %s: fast lane %#v, net/http %#v", head, name, a, b)
			}
		}
		same("Method", mine.Method, theirs.Method)
		same("URL", mine.URL, theirs.URL)
		same("Proto", [3]any{mine.Proto, mine.ProtoMajor, mine.ProtoMinor}, [3]any{theirs.Proto, theirs.ProtoMajor, theirs.ProtoMinor})
		same("Header", mine.Header, theirs.Header)
		same("Host", mine.Host, theirs.Host)
		same("RequestURI", mine.RequestURI, theirs.RequestURI)
		same("Close", mine.Close, theirs.Close)
		same("ContentLength", mine.ContentLength, theirs.ContentLength)
		same("TransferEncoding", mine.TransferEncoding, theirs.TransferEncoding)
		same("Trailer", mine.Trailer, theirs.Trailer)
		same("Body", mine.Body, theirs.Body)
	})
}

// TestParseHeadSubset: the heads the fast lane serves and those it leaves
// to net/http; those it serves are read as net/http reads them.
func TestParseHeadSubset(t *testing.T) {
	reads := netHTTPReads(t)
	for _, tc := range headSeeds {
		var r http.Request
		if got := parseHead([]byte(tc.head), &r); got != tc.fast {
			t.Errorf("parseHead(%q) = %v, want %v", tc.head, got, tc.fast)
		}
		if tc.fast && reads(tc.head) == nil {
			t.Errorf("net/http refuses %q", tc.head)
		}
	}
}
