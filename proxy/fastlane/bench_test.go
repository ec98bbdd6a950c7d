package fastlane

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
)

// BenchmarkServe: one kept-alive connection sends a Matrix-like GET and
// reads a 1 KiB JSON answer, through net/http's server and through the
// fast lane. Client and server share the process, so ns/op is both.
func BenchmarkServe(b *testing.B) {
	body := make([]byte, 1024)
	for i := range body {
		body[i] = 'a'
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	})
	req := "GET /_matrix/client/v3/rooms/!a:b/messages?dir=b HTTP/1.1\r\nHost: matrix.example.org\r\n" +
		"Authorization: Bearer syt_dGVzdA_abcdefghijklmnopqrst_123456\r\nUser-Agent: bench\r\nAccept: application/json\r\n\r\n"
	for _, fast := range []bool{false, true} {
		name := "net-http"
		if fast {
			name = "fastlane"
		}
		b.Run(name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			srv := &http.Server{Handler: h}
			if fast {
				s := New(srv)
				go func() { _ = s.Serve(ln) }()
				defer s.Close()
			} else {
				go func() { _ = srv.Serve(ln) }()
				defer srv.Close()
			}
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			get := &http.Request{Method: http.MethodGet}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := io.WriteString(c, req); err != nil {
					b.Fatal(err)
				}
				resp, err := http.ReadResponse(br, get)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, resp.Body); err != nil {
					b.Fatal(err)
				}
				resp.Body.Close()
			}
		})
	}
}
