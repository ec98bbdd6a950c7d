package tokencache

import (
	"fmt"
	"testing"
	"time"
)

// Review 2, finding 3: the invalidation log is bounded in entries
// (invalidationLog) but not in bytes. A ScopeDevicesExcept invalidation
// keeps its whole Keep list in the log until 1,024 later invalidations
// overwrite it. The proxy makes one from POST /_synapse/mas/sync_devices,
// whose 64 KiB body lists ~10,000 device IDs; decoded, such a list weighs
// ~210 KB (measured: json.Unmarshal of a 64 KiB list of short IDs, GC'd heap
// delta), so a full log holds ~210 MB that neither CACHE_SIZE nor the
// README's memory paragraph accounts for. MAS sends such calls, and so can
// any client while the homeserver answers them 5xx (finding 1).
//
// What the log needs is only enough to tell whether a lookup in flight is
// stale; a long Keep list could be logged as the whole user (one more
// lookup each for the kept devices, as the bus already does).
func TestReview2InvalidationLogHoldsUnboundedKeepLists(t *testing.T) {
	c, err := New(Config{Size: 10, TTL: time.Minute, LookupTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	const perBody = 10000 // device IDs a 64 KiB sync_devices body can list
	keep := make([]string, perBody)
	for i := range keep {
		keep[i] = fmt.Sprintf("%x", i)
	}
	for range invalidationLog {
		c.InvalidateDevicesExcept("@alice:hs", keep, "device")
	}
	c.invMu.Lock()
	held := 0
	for i := range c.log {
		held += len(c.log[i].Keep)
	}
	c.invMu.Unlock()
	// One log slot per invalidation is the bound the design states; each
	// slot holding a request body's worth of IDs is not a bound on memory.
	if limit := invalidationLog * indexSmall; held > limit {
		t.Errorf("the invalidation log holds %d device IDs (%d per entry), more than %d: unbounded by anything but the request body size times %d",
			held, held/invalidationLog, limit, invalidationLog)
	}
}
