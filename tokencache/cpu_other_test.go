//go:build !unix

package tokencache

import "time"

func processCPU() (time.Duration, bool) { return 0, false }
