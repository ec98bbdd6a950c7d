package fastlane

import (
	"io"
	"net/http"
	"testing"
	"time"
)

// http.Server.SetKeepAlivesEnabled(false) makes net/http answer every
// request with Connection: close and hang up after it; the fast lane must
// honour it too (its contract: serve as net/http would with the same
// Server), or an operator's switch (or a library's, when it drains) is
// silently ignored for GET and HEAD.
func TestReview2KeepAlivesDisabled(t *testing.T) {
	srv := &http.Server{Handler: echo(), ReadHeaderTimeout: time.Second}
	s, addr, _ := start(t, srv)
	s.SetKeepAlivesEnabled(false) // on the fast lane's Server, as documented
	c, br := dial(t, addr)
	if _, err := io.WriteString(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, _ := readBody(t, br, "GET")
	if !resp.Close {
		t.Errorf("answer without Connection: close while keep-alives are disabled: %v", resp.Header)
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	if n, err := br.ReadByte(); err != io.EOF {
		t.Errorf("connection still open after the answer (read %v, %v), as net/http would not leave it", n, err)
	}
}

// TestKeepAlivesDisabledClosesIdle: as net/http's, SetKeepAlivesEnabled(false)
// closes the connections waiting for their next request.
func TestKeepAlivesDisabledClosesIdle(t *testing.T) {
	s, addr, _ := start(t, &http.Server{Handler: echo()})
	c, br := dial(t, addr)
	_, _ = io.WriteString(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, _ := readBody(t, br, "GET"); resp.Close {
		t.Fatal("keep-alive answer says close")
	}
	time.Sleep(50 * time.Millisecond) // the connection goes idle
	s.SetKeepAlivesEnabled(false)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("idle connection after SetKeepAlivesEnabled(false): %v, want EOF", err)
	}
}
