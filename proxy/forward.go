package proxy

import (
	"context"
	"io"
	"mime"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

// The passthrough fast path. Nearly all Matrix client traffic that passes
// through is a GET without a body (/sync, /messages, media downloads), which
// upstream.Transport sends on its direct path. For those, forward does what
// p.rp (httputil.ReverseProxy with rewrite and modifyResponse) does, byte for
// byte on both sides (FuzzForwardSameAsReverseProxy holds it to that), without
// ReverseProxy's per-request Clone of the request, client trace, ProxyRequest,
// query re-encoding, per-field header copies and flush timer. Everything else
// (bodies, upgrades, a Transport that is not an *upstream.Transport, an https
// homeserver) goes through p.rp.

// forwardable says whether r may take forward rather than p.rp: a body-less
// GET or HEAD that upstream.Transport sends on its direct path, no upgrade
// (ReverseProxy alone knows how to splice a 101), and a request target
// ReverseProxy would send as the client wrote it (no userinfo or opaque
// part, which only an absolute-form target can carry).
func (p *Proxy) forwardable(r *http.Request) bool {
	return p.direct != nil &&
		(r.Method == http.MethodGet || r.Method == http.MethodHead) &&
		r.ContentLength == 0 && (r.Body == nil || r.Body == http.NoBody) &&
		len(r.TransferEncoding) == 0 && len(r.Trailer) == 0 &&
		r.URL.User == nil && r.URL.Opaque == "" &&
		len(r.Header["Upgrade"]) == 0 && !httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade")
}

// Shared, never modified: save an allocation per request.
var (
	teTrailers = []string{"trailers"}
	noUA       = []string{""} // Request.Write sends no User-Agent for it
)

// forward sends a forwardable request to the homeserver and copies the
// answer back, as p.rp would.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request) {
	out := p.outgoing(r)
	resp, err := p.direct.RoundTrip(out)
	if err != nil {
		p.proxyError(w, out, err) // as ReverseProxy: with the outgoing request
		return
	}
	removeHopByHop(resp.Header)
	if err := p.modifyResponse(resp); err != nil {
		resp.Body.Close()
		p.proxyError(w, out, err)
		return
	}
	dst := w.Header()
	for k, vv := range resp.Header {
		// ReverseProxy Adds value by value; a new field can take the
		// slice itself, capped so that no later append writes into it.
		if k = textproto.CanonicalMIMEHeaderKey(k); dst[k] == nil {
			dst[k] = vv[:len(vv):len(vv)]
		} else {
			dst[k] = append(dst[k], vv...)
		}
	}
	announced := len(resp.Trailer)
	if announced > 0 {
		keys := make([]string, 0, announced)
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		dst.Add("Trailer", strings.Join(keys, ", "))
	}
	w.WriteHeader(resp.StatusCode)
	if err := p.copyBody(w, resp); err != nil {
		defer resp.Body.Close()
		// As ReverseProxy: abort the client's connection, so that it
		// cannot take a cut-off body for a whole one, when there is a
		// server to recover the panic.
		if r.Context().Value(http.ServerContextKey) == nil {
			p.rp.ErrorLog.Printf("suppressing panic for copyResponse error in test; copy error: %v", err)
			return
		}
		panic(http.ErrAbortHandler)
	}
	resp.Body.Close() // fills resp.Trailer
	if len(resp.Trailer) > 0 {
		_ = http.NewResponseController(w).Flush()
	}
	if len(resp.Trailer) == announced {
		for k, vv := range resp.Trailer {
			for _, v := range vv {
				dst.Add(k, v)
			}
		}
		return
	}
	for k, vv := range resp.Trailer {
		k = http.TrailerPrefix + k
		for _, v := range vv {
			dst.Add(k, v)
		}
	}
}

// outgoing is the request ReverseProxy would send for r after rewrite: the
// target's scheme and host, the paths joined as ProxyRequest.SetURL joins
// them, the client's query as it sent it, Host from the URL, hop-by-hop
// fields, fields named in Connection and the client's own
// Forwarded/X-Forwarded-* dropped, setForwarded's fields, Te: trailers if
// the client asked for trailers, an empty User-Agent if it sent none (so
// that none is sent), and Close false. Header values are shared with r,
// not copied: neither the transport nor passiveInvalidation writes them.
func (p *Proxy) outgoing(r *http.Request) *http.Request {
	u := new(url.URL)
	*u = *r.URL
	u.Scheme, u.Host = p.target.Scheme, p.target.Host
	u.Path, u.RawPath = joinURLPath(p.target, r.URL)
	u.RawQuery = r.URL.RawQuery

	in := r.Header
	conn := in["Connection"]
	h := make(http.Header, len(in)+4)
	for k, vv := range in {
		if !hopByHop(k, conn) {
			h[k] = vv[:len(vv):len(vv)]
		}
	}
	if httpguts.HeaderValuesContainsToken(in["Te"], "trailers") {
		h["Te"] = teTrailers
	}
	p.setForwarded(h, r)
	if _, ok := h["User-Agent"]; !ok {
		h["User-Agent"] = noUA
	}
	out := http.Request{
		Method:     r.Method,
		URL:        u,
		Proto:      r.Proto,
		ProtoMajor: r.ProtoMajor,
		ProtoMinor: r.ProtoMinor,
		Header:     h,
		RemoteAddr: r.RemoteAddr,
		RequestURI: r.RequestURI,
		TLS:        r.TLS,
	}
	return out.WithContext(r.Context())
}

// hopByHop says whether ReverseProxy drops the client's field k (a key of
// the client's header map) before rewrite: a hop-by-hop field, one named in
// the client's Connection header, or one rewrite sets itself.
func hopByHop(k string, conn []string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade",
		"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto":
		return true
	}
	for _, f := range conn {
		for f != "" {
			var name string
			name, f, _ = strings.Cut(f, ",")
			if name = textproto.TrimString(name); name != "" && canonicalIs(name, k) {
				return true
			}
		}
	}
	return false
}

// canonicalIs says whether textproto.CanonicalMIMEHeaderKey(name) == k
// (Header.Del's test) without building the canonical form: a name with a
// byte that is not a token character is left as it is, any other is
// upper-cased at its start and after each '-' and lower-cased elsewhere.
func canonicalIs(name, k string) bool {
	if len(name) != len(k) {
		return false
	}
	for i := 0; i < len(name); i++ {
		if !httpguts.IsTokenRune(rune(name[i])) {
			return name == k
		}
	}
	upper := true
	for i := 0; i < len(name); i++ {
		c := name[i]
		if upper && 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		} else if !upper && 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != k[i] {
			return false
		}
		upper = c == '-'
	}
	return true
}

// removeHopByHop drops an answer's hop-by-hop fields as ReverseProxy does.
func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for f != "" {
			var name string
			name, f, _ = strings.Cut(f, ",")
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, k := range [...]string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
		"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		delete(h, k) // canonical already: Header.Del's key
	}
}

// copyBody copies the answer's body to the client as ReverseProxy does: a
// body of unknown length or an event stream is flushed after every write
// (long polls and server-sent events must not wait in a buffer), its head
// from a timer that fires at once; any other is left to the server's
// buffering. A read error is logged unless it is the client going away;
// either side's error ends the copy and is returned.
func (p *Proxy) copyBody(w http.ResponseWriter, resp *http.Response) error {
	var dst io.Writer = w
	if resp.ContentLength == -1 || eventStream(resp.Header) {
		// The timer, not a flush here, as ReverseProxy: a first write
		// that comes before it fires still lets the server sniff a
		// missing Content-Type from the body.
		fw := &flushWriter{w: w, flush: http.NewResponseController(w).Flush, pending: true}
		fw.t = time.AfterFunc(0, fw.flushHead)
		defer fw.stop()
		dst = fw
	}
	buf := p.buffers.Get()
	defer p.buffers.Put(buf)
	for {
		nr, rerr := resp.Body.Read(buf)
		if rerr != nil && rerr != io.EOF && rerr != context.Canceled {
			p.rp.ErrorLog.Printf("httputil: ReverseProxy read error during body copy: %v", rerr)
		}
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			if werr != nil {
				return werr
			}
			if nr != nw {
				return io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
	}
}

// flushWriter is ReverseProxy's maxLatencyWriter for a negative latency:
// it flushes after every write, and its timer flushes the head.
type flushWriter struct {
	w     io.Writer
	flush func() error
	t     *time.Timer

	mu      sync.Mutex
	pending bool // the head may still need the timer's flush
}

func (f *flushWriter) Write(b []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n, err := f.w.Write(b)
	_ = f.flush()
	return n, err
}

func (f *flushWriter) flushHead() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pending {
		_ = f.flush()
		f.pending = false
	}
}

func (f *flushWriter) stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pending = false
	f.t.Stop()
}

// eventStream says whether an answer is server-sent events, as
// ReverseProxy decides it (mime.ParseMediaType's media type), parsing only
// a Content-Type that could be one.
func eventStream(h http.Header) bool {
	ct := h.Get("Content-Type")
	base, _, _ := strings.Cut(ct, ";")
	if !strings.EqualFold(strings.TrimSpace(base), "text/event-stream") {
		return false
	}
	mt, _, _ := mime.ParseMediaType(ct)
	return mt == "text/event-stream"
}

// joinURLPath is httputil's, which ProxyRequest.SetURL uses.
func joinURLPath(a, b *url.URL) (path, rawpath string) {
	if a.RawPath == "" && b.RawPath == "" {
		return singleJoiningSlash(a.Path, b.Path), ""
	}
	apath := a.EscapedPath()
	bpath := b.EscapedPath()
	aslash := strings.HasSuffix(apath, "/")
	bslash := strings.HasPrefix(bpath, "/")
	switch {
	case aslash && bslash:
		return a.Path + b.Path[1:], apath + bpath[1:]
	case !aslash && !bslash:
		return a.Path + "/" + b.Path, apath + "/" + bpath
	}
	return a.Path + b.Path, apath + bpath
}

func singleJoiningSlash(a, b string) string {
	aslash := strings.HasSuffix(a, "/")
	bslash := strings.HasPrefix(b, "/")
	switch {
	case aslash && bslash:
		return a + b[1:]
	case !aslash && !bslash:
		return a + "/" + b
	}
	return a + b
}
