package proxy

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
)

func TestPassthroughForwardsClientAddress(t *testing.T) {
	h := newHarness(t)
	tok := h.hs.login("@alice:hs", "PHONE")
	hdr := bearer(tok)
	hdr.Set("X-Forwarded-For", "203.0.113.66")
	hdr.Set("Forwarded", "for=203.0.113.66")
	hdr.Set("X-Forwarded-Host", "evil.example")
	h.call(200, "PUT", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/txn1", hdr, `{"body":"hi"}`)
	r, ok := h.hs.lastRequest("/send/")
	if !ok {
		t.Fatal("the homeserver saw nothing")
	}
	// A client cannot choose the address the homeserver records.
	if got := r.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "127.0.0.1" {
		t.Errorf("X-Forwarded-For: %q", got)
	}
	if got := r.Header.Get("Forwarded"); got != "" {
		t.Errorf("Forwarded passed on: %q", got)
	}
	if got := r.Header.Get("X-Forwarded-Proto"); got != "http" {
		t.Errorf("X-Forwarded-Proto: %q", got)
	}
	if got, want := r.Header.Get("X-Forwarded-Host"), strings.TrimPrefix(h.front.URL, "http://"); got != want {
		t.Errorf("X-Forwarded-Host: %q, want %q", got, want)
	}
	if string(r.Body) != `{"body":"hi"}` || r.Header.Get("Authorization") != "Bearer "+tok {
		t.Errorf("request changed on the way: %+v", r)
	}
	// The whoami lookup carries the client's address and user agent too.
	hdr.Set("User-Agent", "Element/1.0")
	h.call(200, "GET", whoamiV3, hdr, "")
	r, _ = h.hs.lastRequest("whoami")
	if r.Header.Get("X-Forwarded-For") != "127.0.0.1" || r.Header.Get("User-Agent") != "Element/1.0" {
		t.Errorf("whoami lookup headers: %v", r.Header)
	}
}

// Media uploads and downloads stream: the homeserver starts receiving
// before the client has finished sending, and the client starts receiving
// before the homeserver has finished answering.
func TestPassthroughStreams(t *testing.T) {
	h := newHarness(t)
	firstChunk := make(chan struct{})
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		switch {
		case strings.HasSuffix(r.URL.Path, "/upload"):
			buf := make([]byte, 1<<10)
			if _, err := io.ReadFull(r.Body, buf); err != nil {
				t.Errorf("upload: %v", err)
			}
			close(firstChunk)
			hash := sha256.New()
			hash.Write(buf)
			n, _ := io.Copy(hash, r.Body)
			writeJSON(w, 200, fmt.Sprintf(`{"bytes":%d,"sha256":"%x"}`, n+int64(len(buf)), hash.Sum(nil)))
			return true
		case strings.HasSuffix(r.URL.Path, "/download"):
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = w.Write([]byte("first"))
			w.(http.Flusher).Flush()
			<-r.Context().Done() // hold the response open until the client leaves
			return true
		}
		return false
	})

	pr, pw := io.Pipe()
	go func() {
		_, _ = pw.Write(make([]byte, 1<<10))
		select {
		case <-firstChunk: // the homeserver has it while we are still sending
		case <-time.After(5 * time.Second):
			t.Error("the upload was buffered, not streamed")
		}
		const rest = 8 << 20
		_, _ = io.CopyN(pw, zeroReader{}, rest)
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", h.front.URL+"/_matrix/media/v3/upload", pr)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), fmt.Sprintf(`"bytes":%d`, 1<<10+8<<20)) {
		t.Errorf("upload answer: %s", body)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, _ = http.NewRequestWithContext(ctx, "GET", h.front.URL+"/_matrix/media/v3/download", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "first" {
		t.Errorf("download did not stream: %q %v", buf, err)
	}
	cancel()
	resp.Body.Close()
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// A client that hangs up makes no error noise and counts no upstream error.
func TestClientGoneIsQuiet(t *testing.T) {
	h := newHarness(t)
	h.hs.setOverride(func(w http.ResponseWriter, r *http.Request) bool {
		<-r.Context().Done()
		return true
	})
	for _, path := range []string{"/_matrix/client/v3/sync", whoamiV3} {
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, "GET", h.front.URL+path, nil)
		req.Header.Set("Authorization", "Bearer syt_x")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("%s: got an answer", path)
		}
		cancel()
	}
	// Let the proxy notice.
	deadline := time.Now().Add(2 * time.Second)
	for h.counter("matrix_auth_proxy_requests_total", "code", "499") < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := h.counter("matrix_auth_proxy_requests_total", "code", "499"); n != 2 {
		t.Errorf("requests_total{code=499}: %v", n)
	}
	for _, kind := range []string{"timeout", "refused", "other"} {
		if n := h.counter("matrix_auth_proxy_upstream_errors_total", "kind", kind); n != 0 {
			t.Errorf("upstream_errors_total{%s}: %v", kind, n)
		}
	}
	if n := h.logs.FilterLevelExact(zapcore.WarnLevel).Len() + h.logs.FilterLevelExact(zapcore.ErrorLevel).Len(); n != 0 {
		t.Errorf("%d warnings for a client that went away: %v", n, h.logs.All())
	}
}

// TestTokensNeverReachLogsOrMetrics drives every code path that logs, at
// debug level, with tokens in headers and query strings, and then looks for
// the tokens in every log entry and in the metrics exposition.
func TestTokensNeverReachLogsOrMetrics(t *testing.T) {
	h := newHarness(t)
	alice := h.hs.login("@alice:hs", "PHONE")
	bob := h.hs.login("@bob:hs", "LAPTOP")
	bogus := "syt_Ym9ndXM_not_a_real_token_000"
	for _, tok := range []string{alice, bob, bogus} {
		h.do("GET", whoamiV3, bearer(tok), "")
		h.do("GET", whoamiV3+"?access_token="+tok, nil, "")
		h.do("GET", whoamiV3+"/?access_token="+tok, nil, "")
		h.do("GET", "/_matrix/media/v3/download/hs/abc?access_token="+tok+"&x=%zz", nil, "")
		h.do("GET", "/_matrix/client/v3/sync?ACCESS_TOKEN="+tok, nil, "")
	}
	h.do("POST", "/_matrix/client/v3/logout", bearer(bob), "")
	h.do("POST", "/_matrix/client/v3/login", nil, `{"user":"@carol:hs"}`)
	h.hs.srv.Close() // errors log too
	h.do("GET", whoamiV3, bearer(alice+"x"), "")
	h.do("GET", "/_matrix/client/v3/sync?access_token="+alice, nil, "")
	h.do("POST", "/_matrix/client/v3/logout/all", bearer(alice), "")

	if h.logs.Len() == 0 {
		t.Fatal("nothing was logged: the test proves nothing")
	}
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{MessageKey: "msg"})
	for _, e := range h.logs.All() {
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		line := buf.String()
		for _, tok := range []string{alice, bob, bogus, "syt_carol"} {
			if strings.Contains(line, tok) {
				t.Errorf("a token reached the logs: %s", line)
			}
		}
	}
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if s := fmt.Sprint(mfs); strings.Contains(s, "syt_") {
		t.Errorf("a token reached the metrics: %s", s)
	}
}
