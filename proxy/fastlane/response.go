package fastlane

import (
	"bufio"
	"errors"
	"io"
	"net/http"
	"net/textproto"
	"path"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

// response is the http.ResponseWriter of a request served on the fast lane.
// It writes what net/http's response writes for the same handler calls, byte
// for byte (TestResponseMatchesNetHTTP, FuzzResponseMatchesNetHTTP): body
// writes are held in a 2 KiB buffer until the header must go out, so a
// short answer gets a Content-Length and a long or flushed one is chunked;
// a Content-Type is sniffed, a Date added, trailers sent, 1xx answers
// written at once. The request is always an HTTP/1.1 GET or HEAD without a
// body (parse.go), which leaves out net/http's HTTP/1.0, Expect and request
// body cases.
type response struct {
	c      *conn
	req    *http.Request
	header http.Header // the handler's
	snap   http.Header // the header as of WriteHeader, when the handler touched it after
	w      *bufio.Writer
	isHEAD bool
	// wantsClose: the request asked for Connection: close (read before the
	// handler could change the request, as net/http).
	wantsClose bool

	wroteHeader   bool // logically, by WriteHeader
	sentHeader    bool // on the wire (chunkWriter)
	calledHeader  bool
	handlerDone   bool
	status        int
	contentLength int64 // -1: unknown
	written       int64
	chunking      bool
	closeAfter    bool
	trailers      []string
	clenBuf       [20]byte
	dateBuf       [len(http.TimeFormat)]byte
}

// bufferBeforeChunking is net/http's bufferBeforeChunkingSize.
const bufferBeforeChunking = 2048

var bodyWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, bufferBeforeChunking) }}

func (w *response) Header() http.Header {
	if w.snap == nil && w.wroteHeader && !w.sentHeader {
		// As net/http: the header written is the one of WriteHeader's
		// time, whatever the handler changes after.
		w.snap = w.header.Clone()
	}
	w.calledHeader = true
	return w.header
}

func (w *response) WriteHeader(code int) {
	if w.wroteHeader {
		caller := relevantCaller()
		w.c.s.logf("http: superfluous response.WriteHeader call from %s (%s:%d)", caller.Function, path.Base(caller.File), caller.Line)
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code))
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		bw := w.c.bw
		writeStatusLine(bw, code)
		_ = w.header.WriteSubset(bw, excludedHeadersNoBody)
		_, _ = bw.WriteString("\r\n")
		w.c.flush()
		return
	}
	w.wroteHeader = true
	w.status = code
	// As net/http: the header sent is the one of this moment, whatever a
	// handler holding the map changes after.
	if w.calledHeader && w.snap == nil {
		w.snap = w.header.Clone()
	}
	if cl := get(w.header, "Content-Length"); cl != "" {
		v, err := strconv.ParseInt(cl, 10, 64)
		if err == nil && v >= 0 {
			w.contentLength = v
		} else {
			w.c.s.logf("http: invalid Content-Length of %q", cl)
			w.header.Del("Content-Length")
		}
	}
}

// relevantCaller is the first caller outside this package and net/http:
// the handler at fault, as net/http's log names it.
func relevantCaller() runtime.Frame {
	pc := make([]uintptr, 16)
	n := runtime.Callers(1, pc)
	frames := runtime.CallersFrames(pc[:n])
	for {
		frame, more := frames.Next()
		if !strings.Contains(frame.Function, "/proxy/fastlane.") && !strings.HasPrefix(frame.Function, "net/http.") {
			return frame
		}
		if !more {
			return runtime.Frame{}
		}
	}
}

// ReadFrom is net/http's: the first 512 bytes (what sniffing reads) go
// through the buffer, then, once the header is out, the rest goes to the
// connection directly when the body is not chunked.
func (w *response) ReadFrom(src io.Reader) (n int64, err error) {
	const sniffLen = 512
	if w.w == nil {
		return 0, errAfterHandler
	}
	rf, ok := w.c.nc.(io.ReaderFrom)
	if !ok {
		return io.Copy(writerOnly{w}, src)
	}
	if !w.sentHeader {
		n0, err := io.Copy(writerOnly{w}, io.LimitReader(src, sniffLen))
		n += n0
		if err != nil || n0 < sniffLen {
			return n, err
		}
	}
	_ = w.w.Flush()
	if !w.sentHeader {
		w.writeHeader(nil)
	}
	_ = w.c.flush()
	if !w.chunking && bodyAllowedForStatus(w.status) && !w.isHEAD {
		n0, err := rf.ReadFrom(src)
		n += n0
		w.written += n0
		if err != nil {
			w.c.noteWriteError(err)
		}
		return n, err
	}
	n0, err := io.Copy(writerOnly{w}, src)
	return n + n0, err
}

// writerOnly hides ReadFrom, so io.Copy does not call it again.
type writerOnly struct{ io.Writer }

// CloseNotify implements the deprecated http.CloseNotifier, as net/http:
// the channel receives true when the client goes away while the handler
// runs (the background read starts now, not after DisconnectDelay).
func (w *response) CloseNotify() <-chan bool {
	if w.w == nil {
		panic("fastlane: CloseNotify called after ServeHTTP finished")
	}
	return w.c.closeNotify()
}

var errAfterHandler = errors.New("fastlane: write after the handler returned")

var excludedHeadersNoBody = map[string]bool{"Content-Length": true, "Transfer-Encoding": true}

func (w *response) Write(p []byte) (int, error) { return w.write(len(p), p, "") }

func (w *response) WriteString(s string) (int, error) { return w.write(len(s), nil, s) }

func (w *response) write(n int, b []byte, s string) (int, error) {
	if w.w == nil {
		return 0, errAfterHandler
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if n == 0 {
		return 0, nil
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(n)
	if w.contentLength != -1 && w.written > w.contentLength {
		return 0, http.ErrContentLength
	}
	if b != nil {
		return w.w.Write(b)
	}
	return w.w.WriteString(s)
}

// Flush implements http.Flusher.
func (w *response) Flush() { _ = w.FlushError() }

// FlushError is what http.ResponseController's Flush calls.
func (w *response) FlushError() error {
	if w.w == nil {
		return errAfterHandler
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	err := w.w.Flush()
	if !w.sentHeader {
		w.writeHeader(nil)
	}
	if e := w.c.flush(); err == nil {
		err = e
	}
	return err
}

// finish ends the answer after the handler returned.
func (w *response) finish() {
	w.handlerDone = true
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = w.w.Flush()
	w.w.Reset(nil)
	bodyWriters.Put(w.w)
	w.w = nil
	if !w.sentHeader {
		w.writeHeader(nil)
	}
	if w.chunking {
		bw := w.c.bw
		_, _ = bw.WriteString("0\r\n")
		if t := w.finalTrailers(); t != nil {
			_ = t.Write(bw)
		}
		_, _ = bw.WriteString("\r\n")
	}
	_ = w.c.flush()
}

// reusable says whether the connection may carry another request, as
// net/http's shouldReuseConnection.
func (w *response) reusable() bool {
	if w.closeAfter {
		return false
	}
	if !w.isHEAD && w.contentLength != -1 && bodyAllowedForStatus(w.status) && w.contentLength != w.written {
		return false
	}
	return w.c.werr == nil
}

// chunkWriter is what the 2 KiB body buffer writes to: the header first,
// then the body, chunked or not.
type chunkWriter struct{ w *response }

func (cw chunkWriter) Write(p []byte) (int, error) {
	w := cw.w
	if !w.sentHeader {
		w.writeHeader(p)
	}
	if w.isHEAD {
		return len(p), nil
	}
	bw := w.c.bw
	if w.chunking {
		var hex [16]byte
		_, _ = bw.Write(strconv.AppendInt(hex[:0], int64(len(p)), 16))
		_, _ = bw.WriteString("\r\n")
	}
	n, err := bw.Write(p)
	if w.chunking && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	if err != nil {
		w.c.abort()
	}
	return n, err
}

func (w *response) finalTrailers() http.Header {
	var t http.Header
	for k, vv := range w.header {
		if kk, found := strings.CutPrefix(k, http.TrailerPrefix); found {
			if t == nil {
				t = make(http.Header)
			}
			t[kk] = vv
		}
	}
	for _, k := range w.trailers {
		if t == nil {
			t = make(http.Header)
		}
		for _, v := range w.header[k] {
			t.Add(k, v)
		}
	}
	return t
}

func (w *response) declareTrailer(k string) {
	k = http.CanonicalHeaderKey(k)
	if !httpguts.ValidTrailerHeader(k) {
		return
	}
	w.trailers = append(w.trailers, k)
}

// writeHeader puts the status line and header on the wire, as net/http's
// chunkWriter.writeHeader: p is the first part of the body, if any.
func (w *response) writeHeader(p []byte) {
	w.sentHeader = true
	header := w.header
	owned := w.snap != nil
	if owned {
		header = w.snap
	}
	var exclude map[string]bool
	del := func(key string) {
		if owned {
			header.Del(key)
			return
		}
		if _, ok := header[key]; !ok {
			return
		}
		if exclude == nil {
			exclude = make(map[string]bool)
		}
		exclude[key] = true
	}
	var set extraHeader

	trailers := false
	for k := range header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if exclude == nil {
				exclude = make(map[string]bool)
			}
			exclude[k] = true
			trailers = true
		}
	}
	for _, v := range header["Trailer"] {
		trailers = true
		foreachHeaderElement(v, w.declareTrailer)
	}

	keepAlives := w.c.s.keepAlives() // as net/http: Shutdown ends keep-alive
	te := get(header, "Transfer-Encoding")
	hasTE := te != ""
	if w.handlerDone && !trailers && !hasTE && bodyAllowedForStatus(w.status) && !has(header, "Content-Length") && (!w.isHEAD || len(p) > 0) {
		w.contentLength = int64(len(p))
		set.contentLength = strconv.AppendInt(w.clenBuf[:0], int64(len(p)), 10)
	}
	hasCL := w.contentLength != -1
	if w.wantsClose {
		w.closeAfter = true
	}
	if get(header, "Connection") == "close" || !keepAlives {
		w.closeAfter = true
	}

	code := w.status
	if bodyAllowedForStatus(code) {
		_, haveType := header["Content-Type"]
		hasCE := header.Get("Content-Encoding") != ""
		if !hasCE && !haveType && !hasTE && len(p) > 0 {
			set.contentType = http.DetectContentType(p)
		}
	} else {
		for _, k := range suppressedHeaders(code) {
			del(k)
		}
	}
	if !has(header, "Date") {
		set.date = time.Now().UTC().AppendFormat(w.dateBuf[:0], http.TimeFormat)
	}
	if hasCL && hasTE && te != "identity" {
		w.c.s.logf("http: WriteHeader called with both Transfer-Encoding of %q and a Content-Length of %d",
			te, w.contentLength)
		del("Content-Length")
		hasCL = false
	}
	switch {
	case w.isHEAD || !bodyAllowedForStatus(code) || code == http.StatusNoContent:
		del("Transfer-Encoding")
	case hasCL:
		del("Transfer-Encoding")
	case hasTE && te == "identity":
		w.chunking = false
		w.closeAfter = true
		del("Transfer-Encoding")
	default:
		w.chunking = true
		set.transferEncoding = "chunked"
		if hasTE && te == "chunked" {
			del("Transfer-Encoding")
		}
	}
	if w.chunking {
		del("Content-Length")
	}
	if w.closeAfter && (!keepAlives || !hasToken(get(header, "Connection"), "close")) && !isProtocolSwitchResponse(code, header) {
		del("Connection")
		set.connection = "close"
	}

	bw := w.c.bw
	writeStatusLine(bw, code)
	_ = header.WriteSubset(bw, exclude)
	set.write(bw)
	_, _ = bw.WriteString("\r\n")
}

type extraHeader struct {
	contentType, connection, transferEncoding string
	date, contentLength                       []byte
}

func (h extraHeader) write(bw *bufio.Writer) {
	if h.date != nil {
		_, _ = bw.WriteString("Date: ")
		_, _ = bw.Write(h.date)
		_, _ = bw.WriteString("\r\n")
	}
	if h.contentLength != nil {
		_, _ = bw.WriteString("Content-Length: ")
		_, _ = bw.Write(h.contentLength)
		_, _ = bw.WriteString("\r\n")
	}
	for i, v := range [...]string{h.contentType, h.connection, h.transferEncoding} {
		if v != "" {
			_, _ = bw.WriteString(extraHeaderKeys[i])
			_, _ = bw.WriteString(": ")
			_, _ = bw.WriteString(v)
			_, _ = bw.WriteString("\r\n")
		}
	}
}

var extraHeaderKeys = [...]string{"Content-Type", "Connection", "Transfer-Encoding"}

func writeStatusLine(bw *bufio.Writer, code int) {
	_, _ = bw.WriteString("HTTP/1.1 ")
	if text := http.StatusText(code); text != "" {
		var b [3]byte
		_, _ = bw.Write(strconv.AppendInt(b[:0], int64(code), 10))
		_ = bw.WriteByte(' ')
		_, _ = bw.WriteString(text)
		_, _ = bw.WriteString("\r\n")
		return
	}
	s := strconv.Itoa(code)
	for len(s) < 3 {
		s = "0" + s
	}
	_, _ = bw.WriteString(s + " status code " + strconv.Itoa(code) + "\r\n")
}

func bodyAllowedForStatus(status int) bool {
	switch {
	case status >= 100 && status <= 199, status == 204, status == 304:
		return false
	}
	return true
}

func suppressedHeaders(status int) []string {
	switch {
	case status == 304:
		return suppressedHeaders304
	case !bodyAllowedForStatus(status):
		return suppressedHeadersNoBody
	}
	return nil
}

var (
	suppressedHeaders304    = []string{"Content-Type", "Content-Length", "Transfer-Encoding"}
	suppressedHeadersNoBody = []string{"Content-Length", "Transfer-Encoding"}
)

func isProtocolSwitchResponse(code int, h http.Header) bool {
	return code == http.StatusSwitchingProtocols && h.Get("Upgrade") != "" &&
		httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade")
}

func get(h http.Header, key string) string {
	if v := h[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func has(h http.Header, key string) bool {
	_, ok := h[key]
	return ok
}

// foreachHeaderElement is net/http's: fn for each non-empty element of a
// comma-separated list.
func foreachHeaderElement(v string, fn func(string)) {
	v = textproto.TrimString(v)
	if v == "" {
		return
	}
	if !strings.Contains(v, ",") {
		fn(v)
		return
	}
	for f := range strings.SplitSeq(v, ",") {
		if f = textproto.TrimString(f); f != "" {
			fn(f)
		}
	}
}

// hasToken is net/http's: whether token is in v, case-insensitively, at
// token boundaries.
func hasToken(v, token string) bool {
	if len(token) > len(v) || token == "" {
		return false
	}
	if v == token {
		return true
	}
	for sp := 0; sp <= len(v)-len(token); sp++ {
		if b := v[sp]; b != token[0] && b|0x20 != token[0] {
			continue
		}
		if sp > 0 && !isTokenBoundary(v[sp-1]) {
			continue
		}
		if end := sp + len(token); end != len(v) && !isTokenBoundary(v[end]) {
			continue
		}
		if strings.EqualFold(v[sp:sp+len(token)], token) {
			return true
		}
	}
	return false
}

func isTokenBoundary(b byte) bool { return b == ' ' || b == ',' || b == '\t' }

var _ io.StringWriter = (*response)(nil)
