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
	srv.SetKeepAlivesEnabled(false)
	_, addr, _ := start(t, srv)
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
