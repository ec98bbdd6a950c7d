package upstream

import (
	"net"
	"syscall"
)

// prober looks, without blocking and without consuming anything, at whether
// an idle connection has been closed or has bytes waiting: what
// http.Transport learns from the reader goroutine it keeps on every idle
// connection. One recv(MSG_PEEK|MSG_DONTWAIT) system call; made once per
// connection, so that a probe allocates nothing.
type prober struct {
	raw   syscall.RawConn
	peek  func(fd uintptr) bool
	state idleState
	buf   [1]byte
}

// newProber returns nil for a connection without a file descriptor.
func newProber(nc net.Conn) *prober {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	p := &prober{raw: raw}
	p.peek = func(fd uintptr) bool {
		for {
			n, _, err := syscall.Recvfrom(int(fd), p.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			switch {
			case err == syscall.EINTR:
				continue
			case err == syscall.EAGAIN:
				p.state = idleQuiet
			case err == nil && n > 0:
				p.state = idleData
			default: // EOF, or a broken connection
				p.state = idleClosed
			}
			return true // never wait for readability
		}
	}
	return p
}

func (p *prober) idle() idleState {
	if p == nil {
		return idleQuiet
	}
	if err := p.raw.Read(p.peek); err != nil {
		return idleClosed
	}
	return p.state
}
