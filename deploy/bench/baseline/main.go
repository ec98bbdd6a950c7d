// Command baseline is the ceiling `make bench` holds the proxy's cached whoami
// against: a minimal net/http server that answers every request with the
// same status, headers and body bytes as the proxy's cached answer, and does
// nothing else. At start-up it asks the proxy once (-copy-from, -token) and
// replays that answer, minus the headers net/http writes itself (Date,
// Content-Length), so the two are byte-identical by construction.
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
	"os/signal"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (the chosen one is printed on stdout)")
	from := flag.String("copy-from", "", "URL whose answer to replay (the proxy's whoami)")
	token := flag.String("token", "", "bearer token for -copy-from")
	flag.Parse()
	if err := run(*addr, *from, *token); err != nil {
		log.Fatal(err)
	}
}

func run(addr, from, token string) error {
	a, err := fetch(from, token)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr())
	// The same server settings as the proxy (cmd/matrix-auth-proxy), so the
	// two differ only in what the handler does.
	srv := &http.Server{Handler: a, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		DisableGeneralOptionsHandler: true}
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
	return nil
}

// answer is a recorded response, written back as it is.
type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a *answer) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	for k, v := range a.header {
		h[k] = v
	}
	w.WriteHeader(a.status)
	_, _ = w.Write(a.body)
}

func fetch(url, token string) (*answer, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	h := resp.Header.Clone()
	delete(h, "Date")
	delete(h, "Content-Length")
	return &answer{status: resp.StatusCode, header: h, body: body}, nil
}
