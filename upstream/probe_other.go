//go:build !linux

package upstream

import "net"

// prober cannot look at an idle connection without blocking on this
// platform; a connection the homeserver closed is found by the retry in
// RoundTrip instead. The sidecar's image runs on Linux.
type prober struct{}

func newProber(net.Conn) *prober { return nil }

func (*prober) idle() idleState { return idleQuiet }
