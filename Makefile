# matrix-auth-proxy: `make build`, `make test` (everything CI runs), `make demo`.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# The release build flags. The Dockerfile mirrors them; a test checks that
# the two agree.
BUILD_FLAGS = -trimpath -ldflags "-s -w -X main.version=$(VERSION)"

.PHONY: build test vet demo bench clean check-coherence

build:
	CGO_ENABLED=0 $(GO) build $(BUILD_FLAGS) -o bin/matrix-auth-proxy ./cmd/matrix-auth-proxy

vet:
	@unformatted="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*'))"; \
	  if [ -n "$$unformatted" ]; then echo "gofmt would change: $$unformatted"; exit 1; fi
	$(GO) vet ./...

# Every test: unit tests with the race detector, fuzz seeds, and the
# end-to-end tests against a real Synapse and Prometheus.
test: vet
	$(GO) test -race -count=1 ./...
	@if [ -f deploy/go.mod ]; then echo "cd deploy && go test ./..."; cd deploy && $(GO) vet ./... && $(GO) test -count=1 ./...; fi

demo:
	deploy/local/demo.sh

# The coherence model check for longer than make test runs it: the
# seeded-random driver (two replicas, a real Redis) for DURATION, then the
# fuzzer for as long. COHERENCE_SEED=n replays a driver's seed.
DURATION ?= 10m
check-coherence:
	COHERENCE_DURATION=$(DURATION) $(GO) test -race -count=1 -timeout 0 -run 'TestCoherenceReplicas$$' -v ./proxy
	$(GO) test -run XXX -fuzz 'FuzzCoherence$$' -fuzztime $(DURATION) -parallel 1 ./proxy

# Benchmarks and the side-by-side load comparison (wrk, nginx; run as root).
# Not part of `make test` or CI: these machines are shared and noisy.
bench:
	deploy/local/bench.sh

clean:
	rm -rf bin
