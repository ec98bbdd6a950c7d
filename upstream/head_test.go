package upstream

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"testing"
)

// headOf writes req's head with head, or returns check's error.
func headOf(req *http.Request) (string, error) {
	var h head
	if err := h.check(req); err != nil {
		return "", err
	}
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	if err := h.write(w); err != nil {
		return "", err
	}
	if err := w.Flush(); err != nil {
		return "", err
	}
	return b.String(), nil
}

// stdHeadOf is what Request.Write sends for req.
func stdHeadOf(req *http.Request) (string, error) {
	var b bytes.Buffer
	err := req.Write(&b)
	return b.String(), err
}

// traceLog records the header fields a request's ClientTrace is told of.
func traceLog(req *http.Request) (*http.Request, *[]string) {
	var log []string
	trace := &httptrace.ClientTrace{
		WroteHeaderField: func(k string, vs []string) { log = append(log, fmt.Sprintf("%s=%q", k, vs)) },
		WroteHeaders:     func() { log = append(log, "headers") },
	}
	return req.WithContext(httptrace.WithClientTrace(req.Context(), trace)), &log
}

func TestHeadWritesWhatRequestWriteWrites(t *testing.T) {
	many := http.Header{}
	for i := range 40 {
		many[fmt.Sprintf("X-Field-%02d", i)] = []string{fmt.Sprint(i)}
	}
	for _, c := range []struct {
		name   string
		method string
		url    string
		host   string
		close  bool
		header http.Header
	}{
		{name: "passthrough", method: "GET", url: "http://127.0.0.1:8008/_matrix/client/v3/pushrules/", header: http.Header{
			"Authorization": {"Bearer syt_x"}, "User-Agent": {"Element/1.11"}, "Accept": {"application/json", "text/plain"},
			"X-Forwarded-For": {"192.0.2.7"}, "X-Forwarded-Proto": {"http"}, "X-Forwarded-Host": {"matrix.example.org"}}},
		{name: "HEAD with query", method: "HEAD", url: "http://hs:8008/_matrix/media/v3/download/a/b?allow_redirect=true&x=%20y"},
		{name: "query Go would re-encode", method: "GET", url: "http://hs/_matrix/client/v3/sync?filter={%22a%22:1}&since=s1_2;3"},
		{name: "encoded path", method: "GET", url: "http://hs/_matrix/client/v3/rooms/%21room%3Aexample.org/state"},
		{name: "Host set", method: "GET", url: "http://127.0.0.1:8008/x", host: "matrix.example.org"},
		{name: "invalid Host sent empty", method: "GET", url: "http://127.0.0.1:8008/x", host: "bad host/"},
		{name: "IPv6 zone dropped", method: "GET", url: "http://[fe80::1%25eth0]:8008/x"},
		{name: "non-ASCII host", method: "GET", url: "http://127.0.0.1/x", host: "bücher.example:8008"},
		{name: "no User-Agent: Go's", method: "GET", url: "http://hs/x", header: http.Header{"Accept": {"*/*"}}},
		{name: "empty User-Agent: none", method: "GET", url: "http://hs/x", header: http.Header{"User-Agent": {""}}},
		{name: "User-Agent key without values: none", method: "GET", url: "http://hs/x", header: http.Header{"User-Agent": nil}},
		{name: "blank User-Agent: an empty one", method: "GET", url: "http://hs/x", header: http.Header{"User-Agent": {" "}}},
		{name: "two User-Agents: the first", method: "GET", url: "http://hs/x", header: http.Header{"User-Agent": {" a ", "b"}}},
		{name: "values trimmed, tabs kept inside", method: "GET", url: "http://hs/x", header: http.Header{"X-A": {" \tv\tw \t", "", "  "}}},
		{name: "close", method: "GET", url: "http://hs/x", close: true},
		{name: "close already said", method: "GET", url: "http://hs/x", close: true, header: http.Header{"Connection": {"Close"}}},
		{name: "framing and Host fields skipped", method: "GET", url: "http://hs/x", header: http.Header{
			"Content-Length": {"5"}, "Transfer-Encoding": {"chunked"}, "Trailer": {"X-T"}, "Host": {"evil.example"}}},
		{name: "more fields than fit on the stack", method: "GET", url: "http://hs/x", header: many},
		{name: "empty path", method: "GET", url: "http://hs"},
	} {
		t.Run(c.name, func(t *testing.T) {
			newReq := func() *http.Request {
				req, err := http.NewRequestWithContext(t.Context(), c.method, c.url, nil)
				if err != nil {
					t.Fatal(err)
				}
				req.Host, req.Close = c.host, c.close
				if req.Host == "" {
					req.Host = req.URL.Host
				}
				req.Header = c.header.Clone()
				if req.Header == nil {
					req.Header = http.Header{}
				}
				return req
			}
			ours, ourLog := traceLog(newReq())
			std, stdLog := traceLog(newReq())
			got, err := headOf(ours)
			if err != nil {
				t.Fatal(err)
			}
			want, err := stdHeadOf(std)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("head wrote\n%q\nRequest.Write wrote\n%q", got, want)
			}
			if fmt.Sprint(*ourLog) != fmt.Sprint(*stdLog) {
				t.Errorf("trace: head reported\n%v\nRequest.Write reported\n%v", *ourLog, *stdLog)
			}
		})
	}
}

func TestHeadRefusesWhatCouldSplitTheRequest(t *testing.T) {
	for _, c := range []struct {
		name   string
		url    *url.URL
		header http.Header
	}{
		{name: "space in the query", url: &url.URL{Scheme: "http", Host: "hs", Path: "/x", RawQuery: "a=b HTTP/1.1\r\nX: y"}},
		{name: "space alone in the query", url: &url.URL{Scheme: "http", Host: "hs", Path: "/x", RawQuery: "a b"}},
		{name: "CR in the query", url: &url.URL{Scheme: "http", Host: "hs", Path: "/x", RawQuery: "a\rb"}},
		{name: "not a path", url: &url.URL{Scheme: "http", Host: "hs", Path: "0", RawQuery: "0"}},
		{name: "DEL in the opaque target", url: &url.URL{Scheme: "http", Host: "hs", Opaque: "/x\x7f"}},
		{name: "name with a space", header: http.Header{"Bad Name": {"v"}}},
		{name: "name with a colon", header: http.Header{"X-A:b": {"v"}}},
		{name: "empty name", header: http.Header{"": {"v"}}},
		{name: "value with CRLF", header: http.Header{"X-A": {"v\r\nTransfer-Encoding: chunked"}}},
		{name: "value with LF", header: http.Header{"X-A": {"v\nw"}}},
		{name: "value with NUL", header: http.Header{"X-A": {"a\x00"}}},
		{name: "excluded name with a bad value", header: http.Header{"Content-Length": {"1\r\n"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := c.url
			if u == nil {
				u = &url.URL{Scheme: "http", Host: "hs", Path: "/x"}
			}
			req := (&http.Request{Method: "GET", URL: u, Header: c.header, Host: "hs"}).WithContext(t.Context())
			if req.Header == nil {
				req.Header = http.Header{}
			}
			var h head
			if err := h.check(req); err == nil {
				t.Errorf("check passed")
			}
		})
	}
}

func TestHeadNeverCopiesFramingInAnySpelling(t *testing.T) {
	// Request.Write skips only the canonical spellings; a header map built
	// by hand could hold others, which must not frame a body the request
	// does not have, nor name another host.
	req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://hs/x", nil)
	req.Header = http.Header{"transfer-encoding": {"chunked"}, "CONTENT-LENGTH": {"10"}, "host": {"evil.example"},
		"trailer": {"X"}, "user-agent": {"evil"}, "X-Kept": {"yes"}}
	got, err := headOf(req)
	if err != nil {
		t.Fatal(err)
	}
	want := "GET /x HTTP/1.1\r\nHost: hs\r\nUser-Agent: Go-http-client/1.1\r\nX-Kept: yes\r\n\r\n"
	if got != want {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
}

func TestTransportReportsTheWrittenRequest(t *testing.T) {
	// proxy.Config.Transport: a call counts as performed once it was
	// written whole, which the proxy learns from httptrace's WroteRequest.
	url, _ := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			_, _ = io.WriteString(c, "HTTP/1.1 204 No Content\r\n\r\n")
		}
	})
	tr := newTransport(t)
	var wrote []error
	ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
		WroteRequest: func(i httptrace.WroteRequestInfo) { wrote = append(wrote, i.Err) },
	})
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/x", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if len(wrote) != 1 || wrote[0] != nil {
		t.Errorf("WroteRequest calls: %v, want one without an error", wrote)
	}
}

func TestTransportDirectPathAllocations(t *testing.T) {
	// What a passthrough GET (nginx's answer in make bench, nine header
	// fields) costs the direct path in allocations: the answer's head as
	// one string, its header map and values, the http.Response, the body
	// and the cancellation hook; 10 with go1.26. Request.Write, per-value
	// strings from http.ReadResponse and per-exchange closures made it 25.
	const answer = nginxAnswer
	url, _ := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		for {
			// Read the head without allocating per request, so that
			// only the client's allocations count.
			for {
				line, err := br.ReadSlice('\n')
				if err != nil {
					return
				}
				if len(line) == 2 {
					break
				}
			}
			if _, err := io.WriteString(c, answer); err != nil {
				return
			}
		}
	})
	tr := newTransport(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/_matrix/client/v3/pushrules/", nil)
	req.Header = http.Header{"Authorization": {"Bearer syt_x"}, "User-Agent": {"Element/1.11"},
		"Accept": {"application/json"}, "X-Forwarded-For": {"192.0.2.7"}, "X-Forwarded-Proto": {"http"}}
	buf := make([]byte, 64)
	roundTrip := func() {
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(resp.Body, buf[:2]); err != nil {
			t.Fatal(err)
		}
		if _, err := resp.Body.Read(buf); err != io.EOF {
			t.Fatalf("after the body: %v", err)
		}
		resp.Body.Close()
	}
	roundTrip() // the connection
	allocs := testing.AllocsPerRun(200, roundTrip)
	if got := tr.idleConns(); got != 1 {
		t.Fatalf("%d idle connections, want the one reused", got)
	}
	const most = 11
	if allocs > most {
		t.Errorf("%.1f allocations per round trip, want at most %d", allocs, most)
	}
	t.Logf("%.1f allocations per round trip", allocs)
}

// FuzzHead: whatever head's check admits is one well-formed request head
// that reads back as exactly what was asked for, with no body framing and
// the same bytes as Request.Write where Request.Write would send it.
func FuzzHead(f *testing.F) {
	f.Add("/_matrix/client/v3/pushrules/", "since=s1", "matrix.example.org", "Authorization", "Bearer syt_x", "Element/1.11", false)
	f.Add("/x", "a b", "hs", "X-A", "v\r\nTransfer-Encoding: chunked", "", true)
	f.Add("/x%20y", "", "[fe80::1%eth0]:80", "transfer-encoding", "chunked", " ua ", false)
	f.Add("/", "q=\x7f", "bücher.example", "X", "\tv\t", "\x00", true)
	f.Fuzz(func(t *testing.T, path, query, host, name, value, ua string, close bool) {
		req := &http.Request{Method: "GET", URL: &url.URL{Scheme: "http", Host: "hs", Path: path, RawQuery: query},
			Host: host, Close: close, Header: http.Header{name: {value}, "User-Agent": {ua}}}
		req = req.WithContext(t.Context())
		got, err := headOf(req)
		if err != nil {
			return // refused before anything is written
		}
		back, err := http.ReadRequest(bufio.NewReader(strings.NewReader(got)))
		if err != nil {
			t.Fatalf("head %q does not read back: %v", got, err)
		}
		if back.Method != "GET" || back.RequestURI != req.URL.RequestURI() || back.ContentLength != 0 ||
			len(back.TransferEncoding) != 0 || len(back.Trailer) != 0 {
			t.Fatalf("head %q reads back as %s %q, length %d, encoding %q", got, back.Method, back.RequestURI,
				back.ContentLength, back.TransferEncoding)
		}
		if n := strings.Count(got, "\r\n\r\n"); n != 1 || !strings.HasSuffix(got, "\r\n\r\n") {
			t.Fatalf("head %q is not one head", got)
		}
		if back.Close != close && !(excludedField(name) || strings.EqualFold(name, "Connection")) {
			t.Fatalf("head %q: close %v, want %v", got, back.Close, close)
		}
		if !excludedField(name) {
			// What was sent is what the header held, trimmed.
			k := http.CanonicalHeaderKey(name)
			if k != "Connection" && !strings.EqualFold(k, "Content-Length") {
				if vs := back.Header[k]; len(vs) != 1 || vs[0] != strings.Trim(value, " \t") {
					t.Fatalf("head %q: %s is %q, want %q", got, k, vs, strings.Trim(value, " \t"))
				}
			}
		}
		if name == http.CanonicalHeaderKey(name) {
			std, err := stdHeadOf(req)
			if err == nil && std != got {
				t.Fatalf("head wrote\n%q\nRequest.Write wrote\n%q", got, std)
			}
		}
	})
}
