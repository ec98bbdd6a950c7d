// Command rawforward is a measuring stick for `make bench`, not a proxy: it
// forwards body-less requests to one upstream with no net/http at all (one
// goroutine per client connection, the request head copied as it came, the
// answer head scanned for Content-Length only, a pool of kept-alive upstream
// connections). It understands just enough HTTP/1.1 for the benchmark's GET
// and must never face real clients.
//
// What it shows, next to nginx on the same core: how fast Go itself (its
// runtime, scheduler, network poller and system calls) can forward. The gap
// between it and a net/http proxy is what net/http's server and client cost.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"strconv"
	"sync"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (the chosen one is printed on stdout)")
	upstream := flag.String("upstream", "", "upstream host:port")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ln.Addr())
	p := &pool{addr: *upstream}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go p.serve(c)
	}
}

type pool struct {
	addr string
	mu   sync.Mutex
	idle []*upConn
}

type upConn struct {
	c  net.Conn
	br *bufio.Reader
}

// get returns an idle upstream connection, or a new one when fresh is set
// or none is idle.
func (p *pool) get(fresh bool) (*upConn, error) {
	p.mu.Lock()
	if n := len(p.idle); n > 0 && !fresh {
		u := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return u, nil
	}
	p.mu.Unlock()
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		return nil, err
	}
	return &upConn{c: c, br: bufio.NewReaderSize(c, 32<<10)}, nil
}

func (p *pool) put(u *upConn) {
	p.mu.Lock()
	p.idle = append(p.idle, u)
	p.mu.Unlock()
}

var contentLength = []byte("content-length:")

// readHead appends a message head from br to buf and returns it with the
// Content-Length it declared.
func readHead(br *bufio.Reader, buf []byte) ([]byte, int, error) {
	buf = buf[:0]
	n := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return nil, 0, err
		}
		if len(line) > len(contentLength) && bytes.EqualFold(line[:len(contentLength)], contentLength) {
			if n, err = strconv.Atoi(string(bytes.TrimSpace(line[len(contentLength):]))); err != nil {
				return nil, 0, err
			}
		}
		buf = append(buf, line...)
		if len(line) <= 2 {
			return buf, n, nil
		}
	}
}

func (p *pool) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReaderSize(c, 4<<10)
	reqBuf := make([]byte, 0, 4<<10)
	respBuf := make([]byte, 0, 4<<10)
	for {
		req, n, err := readHead(br, reqBuf)
		if err != nil || n != 0 {
			return // gone, or a request body: not for this tool
		}
		// An idle upstream connection may have been closed by the
		// upstream; the request is sent again once on a new one.
		var u *upConn
		var resp []byte
		for attempt := range 2 {
			if u, err = p.get(attempt > 0); err != nil {
				return
			}
			if _, err = u.c.Write(req); err == nil {
				resp, n, err = readHead(u.br, respBuf)
			}
			if err == nil {
				break
			}
			u.c.Close()
		}
		if err != nil {
			return
		}
		start := len(resp)
		resp = append(resp, make([]byte, n)...)
		if _, err := io.ReadFull(u.br, resp[start:]); err != nil {
			u.c.Close()
			return
		}
		p.put(u)
		if _, err := c.Write(resp); err != nil {
			return
		}
		respBuf = resp[:0]
	}
}
