// Command latency measures what a server adds to a request's latency over
// another one, side by side: it alternates requests between -a and -b (one
// keep-alive connection each) at a fixed, moderate rate, so both see the same
// moment of this machine, and reports per round the difference of their
// median and 99th-percentile latencies, then the median of those differences
// over the rounds. `make bench` uses it for the proxy's cached whoami (-a)
// against a minimal net/http server returning the same bytes (-b).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"slices"
	"time"
)

func main() {
	a := flag.String("a", "", "URL of the server under test")
	b := flag.String("b", "", "URL of the reference server")
	token := flag.String("token", "", "bearer token sent to both")
	rate := flag.Int("rate", 2000, "requests per second, both servers together")
	rounds := flag.Int("rounds", 10, "rounds")
	dur := flag.Duration("round", time.Second, "length of a round")
	flag.Parse()
	if *a == "" || *b == "" || *rate < 2 || *rounds < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*a, *b, *token, *rate, *rounds, *dur); err != nil {
		log.Fatal(err)
	}
}

func run(a, b, token string, rate, rounds int, dur time.Duration) error {
	ca, cb := client(), client()
	reqA, err := newRequest(a, token)
	if err != nil {
		return err
	}
	reqB, err := newRequest(b, token)
	if err != nil {
		return err
	}
	// Warm both connections up.
	for range 200 {
		if _, err := do(ca, reqA); err != nil {
			return err
		}
		if _, err := do(cb, reqB); err != nil {
			return err
		}
	}
	var d50, d99 []float64
	gap := time.Second / time.Duration(rate)
	for r := range rounds {
		var la, lb []time.Duration
		next := time.Now()
		end := next.Add(dur)
		for i := 0; time.Now().Before(end); i++ {
			// Alternate which goes first, so neither always follows the other.
			first, second := reqA, reqB
			if i%2 == 1 {
				first, second = reqB, reqA
			}
			for _, req := range []*http.Request{first, second} {
				next = next.Add(gap)
				time.Sleep(time.Until(next))
				c := ca
				if req == reqB {
					c = cb
				}
				d, err := do(c, req)
				if err != nil {
					return err
				}
				if req == reqA {
					la = append(la, d)
				} else {
					lb = append(lb, d)
				}
			}
		}
		pa50, pa99 := percentiles(la)
		pb50, pb99 := percentiles(lb)
		d50 = append(d50, us(pa50-pb50))
		d99 = append(d99, us(pa99-pb99))
		fmt.Printf("round %2d: n=%d  a p50 %7.1f µs p99 %7.1f µs | b p50 %7.1f µs p99 %7.1f µs | added p50 %+6.1f µs p99 %+7.1f µs\n",
			r+1, len(la), us(pa50), us(pa99), us(pb50), us(pb99), d50[r], d99[r])
	}
	// Machine-readable summary: median, min, max of the per-round figures.
	for _, s := range []struct {
		name string
		v    []float64
	}{{"added_p50_us", d50}, {"added_p99_us", d99}} {
		slices.Sort(s.v)
		fmt.Printf("%s %.1f %.1f %.1f\n", s.name, median(s.v), s.v[0], s.v[len(s.v)-1])
	}
	return nil
}

func client() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
}

func newRequest(url, token string) (*http.Request, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return req, nil
}

func do(c *http.Client, req *http.Request) (time.Duration, error) {
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	d := time.Since(start)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = errors.New(req.URL.String() + ": " + resp.Status)
	}
	return d, err
}

func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(d)
	return d[len(d)/2], d[len(d)*99/100]
}

func median(v []float64) float64 {
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
