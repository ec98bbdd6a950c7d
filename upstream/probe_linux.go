package upstream

import (
	"net"
	"syscall"
)

// probeIdle looks, without blocking and without consuming anything, at
// whether an idle connection has been closed or has bytes waiting: what
// http.Transport learns from the reader goroutine it keeps on every idle
// connection. One recv(MSG_PEEK|MSG_DONTWAIT) system call.
func probeIdle(nc net.Conn) idleState {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return idleQuiet
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return idleClosed
	}
	state := idleClosed
	var b [1]byte
	err = raw.Read(func(fd uintptr) bool {
		for {
			n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			switch {
			case err == syscall.EINTR:
				continue
			case err == syscall.EAGAIN:
				state = idleQuiet
			case err == nil && n > 0:
				state = idleData
			}
			return true // never wait for readability
		}
	})
	if err != nil {
		return idleClosed
	}
	return state
}
