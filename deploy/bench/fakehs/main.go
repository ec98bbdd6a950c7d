// Command fakehs is the homeserver of `make bench` (deploy/local/bench.sh): just
// enough of the Client-Server API for the proxy to look tokens up, with a
// configurable delay on whoami so that concurrent misses pile up, and a count
// of the whoami calls it answered (GET /_bench/whoami_calls) to check that the
// proxy never asks twice for one token.
//
// Tokens are "tok-N": token N belongs to user N mod -users, on device DN.
// Anything else is unknown (401 M_UNKNOWN_TOKEN). It is not a test double
// for the proxy's behaviour; proxy/fakehs_test.go is.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (the chosen one is printed on stdout)")
	delay := flag.Duration("whoami-delay", 0, "time to wait before answering a whoami (a slow homeserver)")
	users := flag.Int("users", 300_000, "tokens tok-N belong to user N mod users")
	flag.Parse()
	if err := run(*addr, *delay, *users); err != nil {
		log.Fatal(err)
	}
}

func run(addr string, delay time.Duration, users int) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr())
	hs := &homeserver{delay: delay, users: users}
	srv := &http.Server{Handler: hs, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(shut)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	fmt.Fprintf(os.Stderr, "fakehs: answered %d whoami calls\n", hs.whoamiCalls.Load())
	return nil
}

type homeserver struct {
	delay       time.Duration
	users       int
	whoamiCalls atomic.Int64
}

// header is what Synapse sends with every client API answer (minus the
// per-request Synapse-Trace-Id and Date).
func header(h http.Header) {
	h["Content-Type"] = []string{"application/json"}
	h["Cache-Control"] = []string{"no-cache, no-store, must-revalidate"}
	h["Access-Control-Allow-Origin"] = []string{"*"}
	h["Access-Control-Allow-Methods"] = []string{"GET, HEAD, POST, PUT, DELETE, OPTIONS"}
	h["Access-Control-Allow-Headers"] = []string{"X-Requested-With, Content-Type, Authorization, Date"}
	h["Access-Control-Expose-Headers"] = []string{"Synapse-Trace-Id, Server"}
}

func (hs *homeserver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	header(w.Header())
	switch p := r.URL.Path; {
	case p == "/_bench/whoami_calls":
		fmt.Fprintln(w, hs.whoamiCalls.Load())
	case p == "/_matrix/client/versions":
		_, _ = io.WriteString(w, `{"versions":["v1.11"]}`)
	case strings.HasSuffix(p, "/account/whoami"):
		hs.whoamiCalls.Add(1)
		if hs.delay > 0 {
			time.Sleep(hs.delay)
		}
		n, err := strconv.Atoi(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer tok-"))
		if err != nil || n < 0 {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":false}`)
			return
		}
		fmt.Fprintf(w, `{"user_id":"@user%07d:example.org","is_guest":false,"device_id":"D%09d"}`, n%hs.users, n)
	default:
		_, _ = io.WriteString(w, `{}`)
	}
}
