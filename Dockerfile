# syntax=docker/dockerfile:1
# matrix-auth-proxy release image: one static binary on distroless, run as
# uid/gid 65532 (distroless "nonroot"), no shell, no package manager.
#
#   docker build --build-arg VERSION="$(git describe --tags --always --dirty)" \
#     -t REGISTRY/matrix-auth-proxy:TAG .
#
# The binary is built by `make build`, so the flags (CGO_ENABLED=0, -trimpath,
# -ldflags "-s -w -X main.version=…") live in one place, the Makefile's
# BUILD_FLAGS. deploy/image_test.go checks this file and builds the binary the
# same way, checks it is static and runs it as 65532 with an empty environment.

# Keep in step with the go directive of go.mod (the test checks).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# .git is not in the build context (.dockerignore): pass the version in.
ARG VERSION=dev
RUN make build VERSION="${VERSION}"

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/bin/matrix-auth-proxy /matrix-auth-proxy
USER 65532:65532
# LISTEN_ADDR (clients) and ADMIN_ADDR (/metrics, /healthz, /readyz) defaults.
EXPOSE 8080 9090
ENTRYPOINT ["/matrix-auth-proxy"]
