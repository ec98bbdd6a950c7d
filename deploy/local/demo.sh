#!/usr/bin/env bash
# deploy/local/demo.sh - `make demo`: a local Synapse with matrix-auth-proxy in
# front of it, a demo user logged in, and curl commands to try the cache.
#
#   1. starts Synapse (deploy/local/synapse.sh; data under <repo>/.cache/synapse)
#   2. builds bin/matrix-auth-proxy and starts it in front of Synapse
#   3. registers a demo user (an existing one is fine) and logs in through the proxy
#   4. prints copy-paste curl commands: whoami twice (the second is a cache hit,
#      visible in /metrics), then logout and whoami again (401)
#   5. waits; Ctrl-C stops the proxy and Synapse
#
# Environment (defaults in brackets):
#   SYNAPSE_PORT       Synapse port on 127.0.0.1    [8008, or the next free one]
#   DEMO_LISTEN_ADDR   the proxy's client listener   [127.0.0.1:8080, or the next free port]
#   DEMO_ADMIN_ADDR    the proxy's admin listener    [127.0.0.1:9090, or the next free port]
#   DEMO_USER          demo user's localpart         [demo]
#   DEMO_PASSWORD      its password                  [demo-password]
#   DEMO_EXIT          1: run the commands, check what they print, stop everything
#                      and exit (0 if the demo behaved as described) [unset]
#   DEMO_BIN           where to build the proxy      [<repo>/bin/matrix-auth-proxy]
#   GO                 go tool                       [go]
#   and deploy/local/synapse.sh's variables (SYNAPSE_DATA, SYNAPSE_VENV, ...).
# A port that is set explicitly is used as is; only defaults move to a free port.
# Logs: the proxy's in <SYNAPSE_DATA>/../matrix-auth-proxy.log, Synapse's in SYNAPSE_DATA;
# if the terminal is gone by Ctrl-C time, the shutdown's in <SYNAPSE_DATA>/../demo-stop.log.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/../.." && pwd)"
SYNAPSE_SH="$SCRIPT_DIR/synapse.sh"
GO="${GO:-go}"
DEMO_USER="${DEMO_USER:-demo}"
DEMO_PASSWORD="${DEMO_PASSWORD:-demo-password}"
DEMO_EXIT="${DEMO_EXIT:-}"
export SYNAPSE_DATA="${SYNAPSE_DATA:-$REPO_DIR/.cache/synapse/data}"

log() { printf 'demo: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v curl >/dev/null 2>&1 || die "curl is required"

# port_taken PORT: something accepts connections on 127.0.0.1:PORT.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port FROM: FROM, or the first free port above it.
free_port() {
  local p="$1"
  while port_taken "$p"; do
    p=$((p + 1))
    (( p < $1 + 100 )) || die "no free port in $1..$p"
  done
  echo "$p"
}

# Synapse: reuse a demo Synapse that is already running, else start one on
# 8008 or the next free port.
if [[ -z "${SYNAPSE_PORT:-}" ]]; then
  SYNAPSE_PORT=8008
  if ! SYNAPSE_PORT=8008 "$SYNAPSE_SH" status >/dev/null 2>&1; then
    SYNAPSE_PORT="$(free_port 8008)"
  fi
fi
export SYNAPSE_PORT
SYNAPSE_URL="http://127.0.0.1:$SYNAPSE_PORT"
LISTEN_ADDR="${DEMO_LISTEN_ADDR:-127.0.0.1:$(free_port 8080)}"
ADMIN_ADDR="${DEMO_ADMIN_ADDR:-127.0.0.1:$(free_port 9090)}"
if [[ "$ADMIN_ADDR" == "$LISTEN_ADDR" ]]; then
  ADMIN_ADDR="127.0.0.1:$(free_port $((${LISTEN_ADDR##*:} + 1)))"
fi
PROXY="http://$LISTEN_ADDR"
ADMIN="http://$ADMIN_ADDR"
PROXY_LOG="$(dirname "$SYNAPSE_DATA")/matrix-auth-proxy.log"
BIN="${DEMO_BIN:-$REPO_DIR/bin/matrix-auth-proxy}"

proxy_pid=""
synapse_started=""
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  # Finish stopping even when our output is gone (a closed terminal, a
  # `| tee` killed by the same Ctrl-C): then say it in a file instead.
  trap '' PIPE
  set +e
  if ! printf 'demo: stopping\n' >&2 2>/dev/null; then
    exec >>"$(dirname "$PROXY_LOG")/demo-stop.log" 2>&1
  fi
  if [[ -n "$proxy_pid" ]] && kill -0 "$proxy_pid" 2>/dev/null; then
    log "stopping matrix-auth-proxy (pid $proxy_pid)"
    kill -TERM "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null
  fi
  if [[ -n "$synapse_started" ]]; then
    "$SYNAPSE_SH" stop
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

log "building $BIN"
(cd "$REPO_DIR" && CGO_ENABLED=0 "$GO" build -o "$BIN" ./cmd/matrix-auth-proxy)

# Stop Synapse on the way out only if this run started it.
if ! "$SYNAPSE_SH" status >/dev/null 2>&1; then
  synapse_started=1
fi
"$SYNAPSE_SH" start

mkdir -p "$(dirname "$PROXY_LOG")"
log "starting matrix-auth-proxy on $PROXY (admin $ADMIN) in front of $SYNAPSE_URL; log: $PROXY_LOG"
UPSTREAM_URL="$SYNAPSE_URL" LISTEN_ADDR="$LISTEN_ADDR" ADMIN_ADDR="$ADMIN_ADDR" \
  SHUTDOWN_DELAY=0s LOG_FORMAT=console LOG_LEVEL=debug READINESS_INTERVAL=1s \
  "$BIN" >>"$PROXY_LOG" 2>&1 &
proxy_pid=$!
for _ in $(seq 100); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "$ADMIN/readyz" || true)" == 200 ]] && break
  kill -0 "$proxy_pid" 2>/dev/null || { tail -n 20 "$PROXY_LOG" >&2; die "matrix-auth-proxy exited"; }
  sleep 0.1
done
[[ "$(curl -s -o /dev/null -w '%{http_code}' "$ADMIN/readyz" || true)" == 200 ]] \
  || { tail -n 20 "$PROXY_LOG" >&2; die "matrix-auth-proxy not ready within 10s"; }

# Register the demo user (an admin, so the admin API can be tried too).
if ! out="$("$SYNAPSE_SH" register "$DEMO_USER" "$DEMO_PASSWORD" admin 2>&1)"; then
  [[ "$out" == *M_USER_IN_USE* ]] || { printf '%s\n' "$out" >&2; die "could not register $DEMO_USER"; }
  log "user $DEMO_USER already exists"
fi

login="$(curl -sS -X POST -H 'Content-Type: application/json' "$PROXY/_matrix/client/v3/login" \
  --data-binary "{\"type\":\"m.login.password\",\"identifier\":{\"type\":\"m.id.user\",\"user\":\"$DEMO_USER\"},\"password\":\"$DEMO_PASSWORD\"}")"
TOKEN="$(sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p' <<<"$login")"
[[ -n "$TOKEN" ]] || die "login through the proxy failed: $login"

WHOAMI="curl -sS -w ' HTTP %{http_code}\n' -H 'Authorization: Bearer $TOKEN' $PROXY/_matrix/client/v3/account/whoami"
METRICS="curl -sS $ADMIN/metrics | grep -E '^matrix_auth_proxy_(token_cache_lookups_total|upstream_whoami_requests_total)'"
LOGOUT="curl -sS -w ' HTTP %{http_code}\n' -X POST -H 'Authorization: Bearer $TOKEN' $PROXY/_matrix/client/v3/logout"

cat <<EOF

matrix-auth-proxy is up:  $PROXY  (admin: $ADMIN/metrics, /readyz, /healthz)
in front of Synapse:      $SYNAPSE_URL  (user @$DEMO_USER:localhost, password $DEMO_PASSWORD)

# 1. whoami twice: the first asks Synapse, the second is answered from the cache
$WHOAMI
$WHOAMI
# 2. one miss and one hit; Synapse was asked once
$METRICS
# 3. log out through the proxy, and the token is dropped from the cache at once
$LOGOUT
$WHOAMI

EOF

if [[ -n "$DEMO_EXIT" ]]; then
  run() { log "\$ $1"; local o; o="$(bash -c "$1")"; printf '%s\n' "$o"; REPLY="$o"; }
  fail=0
  metric() { sed -n "s/^$1 //p" <<<"$REPLY"; }
  run "$METRICS"
  hits0="$(metric 'matrix_auth_proxy_token_cache_lookups_total{result="hit"}')"
  run "$WHOAMI"; [[ "$REPLY" == *'"user_id":"@'"$DEMO_USER"':localhost"'*'HTTP 200' ]] || { log "FAIL: first whoami"; fail=1; }
  run "$WHOAMI"; [[ "$REPLY" == *'HTTP 200' ]] || { log "FAIL: second whoami"; fail=1; }
  run "$METRICS"
  hits1="$(metric 'matrix_auth_proxy_token_cache_lookups_total{result="hit"}')"
  (( ${hits1:-0} == ${hits0:-0} + 1 )) || { log "FAIL: cache hits went from ${hits0:-?} to ${hits1:-?}, want +1"; fail=1; }
  run "$LOGOUT"; [[ "$REPLY" == *'HTTP 200' ]] || { log "FAIL: logout"; fail=1; }
  run "$WHOAMI"; [[ "$REPLY" == *M_UNKNOWN_TOKEN*'HTTP 401' ]] || { log "FAIL: whoami after logout"; fail=1; }
  if (( fail )); then
    log "the demo did not behave as described"
    exit 1
  fi
  log "all commands behaved as described; stopping (DEMO_EXIT=1)"
  exit 0
fi

log "press Ctrl-C to stop matrix-auth-proxy and Synapse"
wait "$proxy_pid" || true
proxy_pid=""
die "matrix-auth-proxy exited on its own; see $PROXY_LOG"
