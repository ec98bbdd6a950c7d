// Command zipf sends whoami requests for Zipf-distributed tokens from many
// concurrent clients through the proxy, in front of a slow homeserver
// (deploy/bench/fakehs -whoami-delay), and compares how many whoami calls
// reached the homeserver with how many distinct tokens were asked: with
// concurrent misses of one token sharing one lookup, and nothing evicted or
// expired, the two are equal.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	proxy := flag.String("proxy", "", "the proxy's client URL (http://host:port)")
	metrics := flag.String("metrics", "", "the proxy's /metrics URL (optional cross-check)")
	hs := flag.String("hs", "", "the fake homeserver's URL, for its whoami count")
	tokens := flag.Int("tokens", 20_000, "tokens tok-0 … tok-(N-1)")
	clients := flag.Int("clients", 64, "concurrent clients")
	requests := flag.Int("requests", 40_000, "requests in all")
	s := flag.Float64("s", 1.1, "Zipf exponent (> 1)")
	limit := flag.Duration("timeout", 2*time.Minute, "bound on the whole run")
	flag.Parse()
	if *proxy == "" || *hs == "" || *tokens < 2 || *clients < 1 || *s <= 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*proxy, *metrics, *hs, *tokens, *clients, *requests, *s, *limit); err != nil {
		log.Fatal(err)
	}
}

func run(proxy, metrics, hs string, tokens, clients, requests int, s float64, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	hsBefore, err := count(hs+"/_bench/whoami_calls", "")
	if err != nil {
		return err
	}
	var mBefore float64
	if metrics != "" {
		if mBefore, err = count(metrics, "matrix_auth_proxy_upstream_whoami_requests_total"); err != nil {
			return err
		}
	}
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}, Timeout: 30 * time.Second}
	seen := make([]atomic.Bool, tokens)
	var sent, failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for c := range clients {
		wg.Go(func() {
			z := rand.NewZipf(rand.New(rand.NewPCG(uint64(c), 42)), s, 1, uint64(tokens-1))
			for ctx.Err() == nil && sent.Add(1) <= int64(requests) {
				n := z.Uint64()
				seen[n].Store(true)
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, proxy+"/_matrix/client/v3/account/whoami", nil)
				req.Header.Set("Authorization", "Bearer tok-"+strconv.FormatUint(n, 10))
				resp, err := hc.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("not done within %v", limit)
	}
	distinct := 0
	for i := range seen {
		if seen[i].Load() {
			distinct++
		}
	}
	hsAfter, err := count(hs+"/_bench/whoami_calls", "")
	if err != nil {
		return err
	}
	calls := hsAfter - hsBefore
	fmt.Printf("%d requests, %d clients, %d tokens (Zipf s=%g), %v, %d failed\n", requests, clients, tokens, s, elapsed.Round(time.Millisecond), failed.Load())
	fmt.Printf("distinct %d\nhs_whoami_calls %.0f\n", distinct, calls)
	if metrics != "" {
		mAfter, err := count(metrics, "matrix_auth_proxy_upstream_whoami_requests_total")
		if err != nil {
			return err
		}
		fmt.Printf("metric_whoami_calls %.0f\n", mAfter-mBefore)
	}
	fmt.Printf("ratio %.4f\n", calls/float64(distinct))
	if failed.Load() > 0 {
		return fmt.Errorf("%d requests failed", failed.Load())
	}
	return nil
}

// count reads a number from url: the whole body, or the sum of the samples
// of metric in a Prometheus text exposition.
func count(url, metric string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: %s", url, resp.Status)
	}
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if metric != "" && !strings.HasPrefix(line, metric) {
			continue
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %q: %w", url, line, err)
		}
		sum += v
	}
	return sum, sc.Err()
}
