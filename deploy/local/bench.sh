#!/usr/bin/env bash
# make bench: what the sidecar costs, measured side by side with what an
# operator would otherwise run (issue 6). Run as root on an otherwise idle
# machine with at least 2 cores; it installs wrk and nginx (Debian) when
# missing. About 5 minutes; everything it starts listens on 127.0.0.1 only.
#
#   1. Go benchmarks (go test -bench) of the token cache and the proxy.
#   2. Throughput: the proxy's cached whoami against a minimal net/http
#      server returning the same bytes (deploy/bench/baseline), and a
#      passthrough GET against nginx proxy_pass to the same upstream. The
#      server under test runs alone on one core (taskset, GOMAXPROCS=1, nginx
#      worker_processes 1); wrk and the upstream share the other. Contenders
#      alternate in short rounds of A B B A (this machine's speed drifts from
#      one second to the next); the figure is the median of the per-round
#      ratios. For reference, goal 2 also measures a plain ReverseProxy
#      (deploy/bench/plainproxy), net/http answering the passthrough's bytes
#      itself with no upstream (the ceiling of any net/http proxy), and Go
#      forwarding without net/http (deploy/bench/rawforward), each vs nginx.
#      The passthrough is compared by requests per CPU-second of each server
#      process (the primary figure; throughput alongside) with nginx, HAProxy
#      (Debian) and Caddy's reverse_proxy, a Go peer built from a current
#      release (BENCH_CADDY_VERSION) with the same Go toolchain as the proxy:
#      the script builds it once with go install from the Go module proxy
#      into ~/.cache/matrix-auth-proxy/caddy-VERSION-GOVERSION/.
#   3. Latency a cached whoami adds over the minimal server, requests
#      alternating between the two at a moderate fixed rate (deploy/bench/latency).
#   4. Heap per cached token at 1,000,000 tokens over 300,000 users, filled
#      through the proxy's production path (proxy.TestHeapPerTokenProduction).
#   5. Homeserver whoami calls per distinct token under a Zipf workload with
#      64 concurrent clients and a homeserver taking 20 ms per whoami
#      (deploy/bench/fakehs, deploy/bench/zipf).
#   6. The operator's view: whoami from the project's real Synapse
#      (deploy/local/synapse.sh, SQLite, 64 users) directly and through the
#      proxy, with a warm cache (CACHE_TTL=1h) and with one short enough that
#      misses happen (CACHE_TTL=5s), in rounds of direct, warm, short, short,
#      warm, direct; Synapse and the proxies share one core. Throughput,
#      p50/p99 (wrk --latency) and Synapse's CPU-seconds per 1,000 whoami.
#
# It prints "goal | measured | target | PASS/FAIL" and exits 1 when a goal
# is missed, after profiling (pprof) what missed it. Knobs, all optional:
#   BENCH_ROUNDS=10 BENCH_RUN_SECS=1 BENCH_CONNS=50   rounds (A B B A, one wrk
#                                                     run of RUN_SECS each) and wrk load
#   BENCH_GOALS="1 2 3 4 5 6" which goals to measure
#   BENCH_SUT_CPU=0 BENCH_LOAD_CPU=1                    the two cores
#   BENCH_PROFILE=auto|1|0    profile misses (auto), everything (1), nothing (0)
#   BENCH_GO=1|0              run the Go benchmarks
#   BENCH_HEAP_TOKENS=1000000 BENCH_HEAP_USERS=300000
#   BENCH_CADDY_VERSION=v2.11.9                        the Go peer's release
#   BENCH_PROXY_VS=path       goal 2 also runs the proxy against this other
#                             build of it (e.g. an older commit's binary),
#                             same settings, and that build against nginx
#   BENCH_G2_PEERS=1|0        goal 2's peers and references after the goal
#                             row (HAProxy, Caddy, plain proxy, sticks)
#   BENCH_OUT=dir             where logs and profiles go (default /tmp/…)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

ROUNDS=${BENCH_ROUNDS:-10}
SECS=${BENCH_RUN_SECS:-1}
CONNS=${BENCH_CONNS:-50}
SUT_CPU=${BENCH_SUT_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
PROFILE=${BENCH_PROFILE:-auto}
GOBENCH=${BENCH_GO:-1}
GOALS=" ${BENCH_GOALS:-1 2 3 4 5 6} "
HEAP_TOKENS=${BENCH_HEAP_TOKENS:-1000000}
HEAP_USERS=${BENCH_HEAP_USERS:-300000}
GO=${GO:-go}
CADDY_VERSION=${BENCH_CADDY_VERSION:-v2.11.9}
out=${BENCH_OUT:-/tmp/matrix-auth-proxy-bench-$(date +%Y%m%d-%H%M%S)}

say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "bench.sh: run as root (it installs wrk and nginx when missing)" >&2
  exit 2
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "bench.sh: needs 2 cores (server under test on one, load on the other)" >&2
  exit 2
fi
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts nginx as a service on install; we run our own.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop nginx >/dev/null 2>&1 || true; fi
fi

mkdir -p "$out"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# start CPU NAME CMD...: runs CMD pinned to CPU in the background, logging to
# $out/NAME.log; the pid is appended to pids.
start() {
  local cpu=$1 name=$2
  shift 2
  taskset -c "$cpu" "$@" >"$out/$name.log" 2>&1 &
  pids+=($!)
}

# freeport: a port nothing listens on, below Linux's ephemeral range (32768
# and up by default): a port some outgoing connection holds as its source
# cannot be bound, yet refuses connections like a free one.
freeport() {
  local p lo
  read -r lo _ </proc/sys/net/ipv4/ip_local_port_range
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % (lo > 21000 ? lo - 20000 : 12000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! grep -qw "$p" "$out/ports" 2>/dev/null; then
      echo "$p" >>"$out/ports"
      echo "$p"
      return
    fi
  done
  echo "bench.sh: no free port" >&2
  exit 1
}

# wait_up URL [TOKEN]: polls URL until it answers 200, for up to 15 s.
wait_up() {
  for _ in $(seq 150); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${2:-tok-1}" "$1")" = 200 ]; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: $1 did not come up; logs in $out" >&2
  exit 1
}

# Busy jiffies of a CPU so far (everything but idle and iowait), and total.
cpu_jiffies() { awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }

# CPU jiffies (user + system) used so far by processes PIDS and their
# children (nginx's worker).
proc_jiffies() {
  local p q t=0 u s
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" || true; done); do
    if read -r u s < <(awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$p/stat" 2>/dev/null); then t=$((t + u + s)); fi
  done
  echo "$t"
}

# wrk_rps URL PATH SECS PID...: one wrk run from LOAD_CPU against the server
# PIDs; prints "requests/s core-busy% own%": how busy the server's core was,
# and how much of it the server itself used (the rest went to other
# processes of this machine). Fails on any non-2xx answer or socket error.
wrk_rps() {
  local url=$1 path=$2 secs=$3 b0 t0 b1 t1 o0 o1
  shift 3
  read -r b0 t0 < <(cpu_jiffies "$SUT_CPU")
  o0=$(proc_jiffies "$@")
  BENCH_PATH=$path BENCH_TOKEN=tok-1 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${secs}s" \
    -s "$repo/deploy/bench/wrk/request.lua" "$url" >"$out/wrk.last" 2>&1
  o1=$(proc_jiffies "$@")
  read -r b1 t1 < <(cpu_jiffies "$SUT_CPU")
  cat "$out/wrk.last" >>"$out/wrk.log"
  if grep -qE 'Non-2xx|Socket errors' "$out/wrk.last"; then
    echo "bench.sh: wrk against $url$path saw errors:" >&2
    cat "$out/wrk.last" >&2
    exit 1
  fi
  awk -v b=$((b1 - b0)) -v o=$((o1 - o0)) -v t=$((t1 - t0)) '/^Requests\/sec/ {
    printf "%s %.0f %.0f\n", $2, (t > 0 ? 100 * b / t : 0), (t > 0 ? 100 * o / t : 0) }' "$out/wrk.last"
}

# rounds NAME PATH URL_A PIDS_A URL_B PIDS_B: ROUNDS rounds of A, B, B, A
# (SECS each), so that a drift of the machine's speed within a round cancels
# out. Writes per round, each figure over the round's two runs of a
# contender, to $out/NAME.rounds:
#   1 req/s A  2 req/s B  3 ratio  4 own CPU% A  5 own CPU% B
#   6 ratio of requests per CPU-second of the server itself  7 disturbed
# where disturbed is 1 when other processes took over 10% of the server's
# core in any run of the round.
rounds() {
  local name=$1 path=$2 a=$3 pa=$4 b=$5 pb=$6 r
  # shellcheck disable=SC2086 # PIDS are lists
  wrk_rps "$a" "$path" 1 $pa >/dev/null # warm up both
  # shellcheck disable=SC2086
  wrk_rps "$b" "$path" 1 $pb >/dev/null
  : >"$out/$name.rounds"
  for r in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    {
      echo "A $(wrk_rps "$a" "$path" "$SECS" $pa)"
      echo "B $(wrk_rps "$b" "$path" "$SECS" $pb)"
      echo "B $(wrk_rps "$b" "$path" "$SECS" $pb)"
      echo "A $(wrk_rps "$a" "$path" "$SECS" $pa)"
    } >"$out/round.runs"
    awk -v r="$r" -v n="$name" '
      { rps[$1] += $2 / 2; own[$1] += $4 / 2; if ($3 - $4 > 10) dist = 1 }
      END {
        cost = (own["A"] > 0 && own["B"] > 0) ? (rps["A"] / own["A"]) / (rps["B"] / own["B"]) : 0
        printf "%s round %2d: %8.0f vs %8.0f req/s  ratio %.3f | own CPU %3.0f%% / %3.0f%%, per CPU-second %.3f%s\n",
          n, r, rps["A"], rps["B"], rps["A"] / rps["B"], own["A"], own["B"], cost, dist ? "  (disturbed by other processes)" : "" > "/dev/stderr"
        printf "%s %s %.4f %.0f %.0f %.4f %d\n", rps["A"], rps["B"], rps["A"] / rps["B"], own["A"], own["B"], cost, dist
      }' "$out/round.runs" >>"$out/$name.rounds"
  done
}

# summarize NUMBER NAME WHAT TARGET [cpu]: the goal row, on the median ratio
# of the rounds' throughput against TARGET, and an info row with the ratio
# per CPU-second of the server itself; with "cpu", the goal is on the ratio
# of requests per CPU-second of each server process and throughput is the
# info row. Prints the ratio the goal is on.
summarize() {
  local n=$1 name=$2 what=$3 target=$4 by=${5:-throughput} m lo hi ra rb oa ob c clo chi dist thr cpu
  read -r m lo hi < <(stats "$out/$name.rounds" 3)
  read -r ra _ _ < <(stats "$out/$name.rounds" 1)
  read -r rb _ _ < <(stats "$out/$name.rounds" 2)
  read -r oa _ _ < <(stats "$out/$name.rounds" 4)
  read -r ob _ _ < <(stats "$out/$name.rounds" 5)
  read -r c clo chi < <(stats "$out/$name.rounds" 6)
  dist=$(awk '{ d += $7 } END { print d + 0 }' "$out/$name.rounds")
  thr=$(printf '%.3f (%.3f–%.3f; %.0f vs %.0f req/s)' "$m" "$lo" "$hi" "$ra" "$rb")
  cpu=$(printf '%.3f (%.3f–%.3f)' "$c" "$clo" "$chi")
  if [ "$by" = cpu ]; then
    goal "$n. $what, requests per CPU-second of each server process (median of $ROUNDS rounds; min–max; own CPU $oa% vs $ob%, $dist rounds disturbed)" \
      "$cpu" "≥ $target" "$(ge "$c" "$target")"
    info "$n. same, throughput" "$thr"
    echo "$c"
    return
  fi
  goal "$n. $what (median of $ROUNDS rounds; min–max)" "$thr" "≥ $target" "$(ge "$m" "$target")"
  info "$n. same, requests per CPU-second of the server itself (own CPU $oa% vs $ob%; $dist of $ROUNDS rounds disturbed)" "$cpu"
  echo "$m"
}

reference() {
  local m lo hi c clo chi
  read -r m lo hi < <(stats "$out/$2.rounds" 3)
  read -r c clo chi < <(stats "$out/$2.rounds" 6)
  info "$1: throughput; per CPU-second" "$(printf '%.3f (%.3f–%.3f); %.3f (%.3f–%.3f)' "$m" "$lo" "$hi" "$c" "$clo" "$chi")"
}

# stats FILE COLUMN: "median min max" of a column.
stats() {
  awk -v c="$2" '{ print $c }' "$1" | sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    print m, v[1], v[NR] }'
}

want_goal() { [[ $GOALS == *" $1 "* ]]; }
# Goals not measured count as met, so they are not profiled.
g1=1 g2=1 l50=0 heap=0
results=()
failed=()
# goal NAME MEASURED TARGET PASS(0/1)
goal() {
  local verdict=PASS
  if [ "$4" != 1 ]; then verdict=FAIL; failed+=("$1"); fi
  results+=("$(printf '| %s | %s | %s | %s |' "$1" "$2" "$3" "$verdict")")
}
info() { results+=("$(printf '| %s | %s | %s | %s |' "$1" "$2" "–" "info")"); }
le() { awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) ? 1 : 0 }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b) ? 1 : 0 }'; }

say "building (results and logs: $out)"
CGO_ENABLED=0 $GO build -trimpath -o "$out/matrix-auth-proxy" ./cmd/matrix-auth-proxy
(cd deploy && CGO_ENABLED=0 $GO build -trimpath -o "$out/" ./bench/baseline ./bench/fakehs ./bench/latency ./bench/plainproxy ./bench/rawforward ./bench/zipf)
$GO test -c -o "$out/proxy.test" ./proxy/

echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')" | tee "$out/machine"
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(sed -n 's/^PRETTY_NAME="\(.*\)"$/\1/p' /etc/os-release), $($GO version | awk '{ print $3 }'), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{ print $1, $2 }')" | tee -a "$out/machine"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')" | tee -a "$out/machine"

# ---------------------------------------------------------------- Go benchmarks
if [ "$GOBENCH" = 1 ]; then
  say "Go benchmarks: go test -run XXX -bench . -benchmem ./tokencache/ ./proxy/"
  $GO test -count=1 -run XXX -bench . -benchmem ./tokencache/ ./proxy/ | tee "$out/gobench.txt"
  hit_allocs=$(awk '$1 ~ /^BenchmarkHit-/ { for (i = 1; i < NF; i++) if ($(i + 1) == "allocs/op") print $i }' "$out/gobench.txt")
  whoami_allocs=$(awk '$1 ~ /^BenchmarkWhoamiHit\/unlimited/ { for (i = 1; i < NF; i++) if ($(i + 1) == "allocs/op") print $i }' "$out/gobench.txt")
  fetches=$(awk '$1 ~ /^BenchmarkMissSingleflight/ { for (i = 1; i < NF; i++) if ($(i + 1) == "fetches/op") print $i }' "$out/gobench.txt")
  goal "cache lookup allocs/op (tokencache BenchmarkHit)" "${hit_allocs:-?}" "0" "$([ "${hit_allocs:-1}" = 0 ] && echo 1 || echo 0)"
  goal "cached whoami allocs/op (proxy BenchmarkWhoamiHit)" "${whoami_allocs:-?}" "0" "$([ "${whoami_allocs:-1}" = 0 ] && echo 1 || echo 0)"
  info "homeserver fetches per 64 concurrent misses of one key (BenchmarkMissSingleflight)" "${fetches:-?}"
  say "Go benchmarks on more cores: go test -run XXX -bench Parallel -cpu 1,2,4 -count 3 ./tokencache/"
  $GO test -count=3 -run XXX -bench Parallel -cpu 1,2,4 ./tokencache/ | tee "$out/gobench-cpu.txt"
  # scaling NAME: throughput at 2 cores / 1 core (medians of ns/op).
  scaling() {
    awk -v n="Benchmark$1" '
      $1 == n { one[++a] = $3 } $1 == n "-2" { two[++b] = $3 }
      function med(v, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
        return (k % 2) ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2 }
      END { if (a && b) printf "%.2f", med(one, a) / med(two, b); else print "?" }' "$out/gobench-cpu.txt"
  }
  sk=$(scaling KeyParallel)
  sh=$(scaling HitParallel)
  goal "parallel cached lookup (tokencache BenchmarkHitParallel: key hash and Get), throughput at -cpu 2 / -cpu 1" \
    "${sh}x (the key hash alone, which shares nothing, scaled ${sk}x: what this machine gave)" "≥ 1.8x" "$(ge "${sh/\?/0}" 1.8)"
  info "Get alone (BenchmarkGetParallel); mixed hits, misses, invalidations (BenchmarkMixedParallel): -cpu 2 / -cpu 1" \
    "$(scaling GetParallel)x; $(scaling MixedParallel)x"
fi

# ---------------------------------------------------------------- servers
say "starting servers (server under test on CPU $SUT_CPU, load and upstream on CPU $LOAD_CPU)"
UP=$(freeport) NGX=$(freeport) PRX=$(freeport) ADM=$(freeport) BASE=$(freeport) PLAIN=$(freeport) STATIC=$(freeport) RAW=$(freeport)
mkdir -p "$out/nginx-up" "$out/nginx-front"
body='{"global":{"content":[],"override":[{"actions":["dont_notify"],"conditions":[],"default":true,"enabled":false,"rule_id":".m.rule.master"},{"actions":["dont_notify"],"conditions":[{"key":"content.msgtype","kind":"event_match","pattern":"m.notice"}],"default":true,"enabled":true,"rule_id":".m.rule.suppress_notices"},{"actions":["notify",{"set_tweak":"sound","value":"default"},{"set_tweak":"highlight","value":false}],"conditions":[{"key":"type","kind":"event_match","pattern":"m.room.member"},{"key":"content.membership","kind":"event_match","pattern":"invite"}],"default":true,"enabled":true,"rule_id":".m.rule.invite_for_me"}],"room":[],"sender":[],"underride":[{"actions":["notify",{"set_tweak":"sound","value":"ring"},{"set_tweak":"highlight","value":false}],"conditions":[{"key":"type","kind":"event_match","pattern":"m.call.invite"}],"default":true,"enabled":true,"rule_id":".m.rule.call"}]}}'
# Settings both nginx instances share: our own paths, no access log, and
# connections kept open as long as Go keeps them (nginx's default closes a
# keep-alive connection after 1,000 requests).
nginx_common() {
  cat <<EOF
worker_processes 1;
pid $out/$1/nginx.pid;
error_log $out/$1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() {
  cat <<EOF
  access_log off;
  server_tokens off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  client_body_temp_path $out/$1/body;
  proxy_temp_path $out/$1/proxy;
  fastcgi_temp_path $out/$1/fastcgi;
  uwsgi_temp_path $out/$1/uwsgi;
  scgi_temp_path $out/$1/scgi;
EOF
}
# The fast upstream: a homeserver stand-in answering from memory, with
# Synapse's headers (nginx adds Server: nginx, which the proxy replays too).
{
  nginx_common nginx-up
  echo "http {"
  nginx_http_common nginx-up
  cat <<EOF
  default_type application/json;
  server {
    listen 127.0.0.1:$UP;
    add_header Cache-Control "no-cache, no-store, must-revalidate" always;
    add_header Access-Control-Allow-Origin "*" always;
    add_header Access-Control-Allow-Methods "GET, HEAD, POST, PUT, DELETE, OPTIONS" always;
    add_header Access-Control-Allow-Headers "X-Requested-With, Content-Type, Authorization, Date" always;
    add_header Access-Control-Expose-Headers "Synapse-Trace-Id, Server" always;
    add_header Synapse-Trace-Id \$request_id always;
    location = /_matrix/client/versions { return 200 '{"versions":["v1.11"]}'; }
    location ~ /account/whoami\$ { return 200 '{"user_id":"@alice:example.org","is_guest":false,"device_id":"ABCDEFGHIJ"}'; }
    location / { return 200 '$body'; }
  }
}
EOF
} >"$out/nginx-up/nginx.conf"
# nginx as the reverse proxy an operator would otherwise run, tuned fairly:
# HTTP/1.1 and kept-alive connections to the upstream, and the same
# X-Forwarded-* headers the sidecar sets.
{
  nginx_common nginx-front
  echo "http {"
  nginx_http_common nginx-front
  cat <<EOF
  upstream homeserver {
    server 127.0.0.1:$UP;
    keepalive 128;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
  }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://homeserver;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
EOF
} >"$out/nginx-front/nginx.conf"
start "$LOAD_CPU" nginx-up nginx -e "$out/nginx-up/error.log" -c "$out/nginx-up/nginx.conf" -g 'daemon off;'
start "$SUT_CPU" nginx-front nginx -e "$out/nginx-front/error.log" -c "$out/nginx-front/nginx.conf" -g 'daemon off;'
NGX_PID=${pids[-1]}
# GOMEMLIMIT as the manifests in deploy/ set it (deploy/kubernetes/sidecar/
# proxy.env; Helm derives it from the memory limit): with it the proxy paces
# its GC at GOGC=400 (cmd/matrix-auth-proxy, gcPercent).
proxy_env=(UPSTREAM_URL="http://127.0.0.1:$UP" LISTEN_ADDR="127.0.0.1:$PRX" ADMIN_ADDR="127.0.0.1:$ADM"
  CACHE_TTL=1h RATE_LIMIT_RPS=0 LOG_LEVEL=warn SHUTDOWN_DELAY=0s GOMAXPROCS=1 GOMEMLIMIT=200MiB)
start "$SUT_CPU" proxy env "${proxy_env[@]}" "$out/matrix-auth-proxy"
PRX_PID=${pids[-1]}
whoami=/_matrix/client/v3/account/whoami
pass=/_matrix/client/v3/pushrules/
wait_up "http://127.0.0.1:$UP$whoami"
wait_up "http://127.0.0.1:$PRX$whoami"
wait_up "http://127.0.0.1:$NGX$pass"
start "$SUT_CPU" baseline env GOMAXPROCS=1 "$out/baseline" -addr "127.0.0.1:$BASE" -copy-from "http://127.0.0.1:$PRX$whoami" -token tok-1
BASE_PID=${pids[-1]}
start "$SUT_CPU" plainproxy env GOMAXPROCS=1 "$out/plainproxy" -addr "127.0.0.1:$PLAIN" -upstream "http://127.0.0.1:$UP"
PLAIN_PID=${pids[-1]}
wait_up "http://127.0.0.1:$PLAIN$pass"
wait_up "http://127.0.0.1:$BASE$whoami"

# The baseline must answer exactly what the proxy's cached answer is.
for s in PRX BASE; do
  curl -s -D - -H 'Authorization: Bearer tok-1' "http://127.0.0.1:${!s}$whoami" | grep -v '^Date:' >"$out/answer-$s"
done
if ! diff "$out/answer-PRX" "$out/answer-BASE" >"$out/answer.diff"; then
  echo "bench.sh: the baseline's answer differs from the proxy's:" >&2
  cat "$out/answer.diff" >&2
  exit 1
fi
echo "cached whoami and baseline answers are byte-identical but for Date ($(wc -c <"$out/answer-PRX") bytes):"
sed 's/^/  /' "$out/answer-PRX"
echo
# passthrough_same NAME...: the servers NAME (port variables) answer the
# passthrough GET with the same body as the proxy.
passthrough_same() {
  local s
  curl -s -H 'Authorization: Bearer tok-1' "http://127.0.0.1:$PRX$pass" >"$out/pass-PRX"
  for s in "$@"; do
    curl -s -H 'Authorization: Bearer tok-1' "http://127.0.0.1:${!s}$pass" >"$out/pass-$s"
    cmp -s "$out/pass-PRX" "$out/pass-$s" || { echo "bench.sh: passthrough bodies of the proxy and $s differ" >&2; exit 1; }
  done
}
passthrough_same NGX

# ---------------------------------------------------------------- goal 1
if want_goal 1; then
  say "goal 1: cached whoami, proxy vs minimal net/http server ($ROUNDS rounds of A B B A × ${SECS}s, wrk -t1 -c$CONNS)"
  rounds whoami "$whoami" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$BASE" "$BASE_PID"
  summarize 1 whoami "cached whoami throughput / minimal net/http" 0.90 >"$out/g1"
  g1=$(cat "$out/g1")
fi

# ---------------------------------------------------------------- goal 2
if want_goal 2; then
  say "goal 2: passthrough GET $pass (~1 KiB), proxy vs nginx proxy_pass ($ROUNDS rounds of A B B A × ${SECS}s)"
  rounds passthrough "$pass" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$NGX" "$NGX_PID"
  summarize 2 passthrough "passthrough / nginx proxy_pass" 0.45 cpu >"$out/g2"
  g2=$(cat "$out/g2")
  if [ -n "${BENCH_PROXY_VS:-}" ]; then
    say "goal 2: the proxy vs another build of it ($BENCH_PROXY_VS), and that build vs nginx"
    VS=$(freeport) VSA=$(freeport)
    start "$SUT_CPU" proxy-vs env "${proxy_env[@]}" LISTEN_ADDR="127.0.0.1:$VS" ADMIN_ADDR="127.0.0.1:$VSA" "$BENCH_PROXY_VS"
    VS_PID=${pids[-1]}
    wait_up "http://127.0.0.1:$VS$pass"
    passthrough_same VS
    rounds passthrough-vs "$pass" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$VS" "$VS_PID"
    reference "2. proxy / the other build ($BENCH_PROXY_VS)" passthrough-vs
    rounds passthrough-vs-nginx "$pass" "http://127.0.0.1:$VS" "$VS_PID" "http://127.0.0.1:$NGX" "$NGX_PID"
    reference "2. the other build ($BENCH_PROXY_VS) / nginx proxy_pass" passthrough-vs-nginx
    kill "$VS_PID" 2>/dev/null || true
  fi
fi
if want_goal 2 && [ "${BENCH_G2_PEERS:-1}" = 1 ]; then
  say "goal 2: the same passthrough, proxy vs HAProxy (Debian, nbthread 1)"
  HAP=$(freeport)
  printf '%s\n' 'global' '  nbthread 1' 'defaults' '  mode http' '  option http-keep-alive' '  option forwardfor' \
    '  timeout connect 5s' '  timeout client 30s' '  timeout server 30s' \
    'frontend front' "  bind 127.0.0.1:$HAP" '  default_backend up' 'backend up' "  server up 127.0.0.1:$UP" >"$out/haproxy.cfg"
  start "$SUT_CPU" haproxy haproxy -db -f "$out/haproxy.cfg"
  HAP_PID=${pids[-1]}
  wait_up "http://127.0.0.1:$HAP$pass"
  passthrough_same HAP
  rounds passthrough-haproxy "$pass" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$HAP" "$HAP_PID"
  summarize 2 passthrough-haproxy "passthrough / HAProxy $(haproxy -v 2>/dev/null | awk 'NR == 1 { print $3 }')" 0.45 cpu >/dev/null
  kill "$HAP_PID" 2>/dev/null || true
  say "goal 2: the same passthrough, proxy vs Caddy $CADDY_VERSION reverse_proxy (built with $($GO env GOVERSION))"
  caddy_dir="${XDG_CACHE_HOME:-$HOME/.cache}/matrix-auth-proxy/caddy-$CADDY_VERSION-$($GO env GOVERSION)"
  if [ ! -x "$caddy_dir/caddy" ]; then
    echo "building Caddy $CADDY_VERSION from the Go module proxy into $caddy_dir (once)"
    mkdir -p "$caddy_dir"
    (cd "$caddy_dir" && GOBIN="$caddy_dir" CGO_ENABLED=0 GOFLAGS= $GO install -trimpath "github.com/caddyserver/caddy/v2/cmd/caddy@$CADDY_VERSION")
  fi
  CAD=$(freeport)
  printf '%s\n' '{' '  admin off' '  auto_https off' '  persist_config off' '}' \
    "http://127.0.0.1:$CAD {" "  reverse_proxy 127.0.0.1:$UP" '}' >"$out/Caddyfile"
  start "$SUT_CPU" caddy env GOMAXPROCS=1 HOME="$out" XDG_DATA_HOME="$out" XDG_CONFIG_HOME="$out" "$caddy_dir/caddy" run --adapter caddyfile --config "$out/Caddyfile"
  CAD_PID=${pids[-1]}
  wait_up "http://127.0.0.1:$CAD$pass"
  passthrough_same CAD
  rounds passthrough-caddy "$pass" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$CAD" "$CAD_PID"
  summarize 2 passthrough-caddy "passthrough / Caddy $CADDY_VERSION reverse_proxy (same Go)" 1.5 cpu >/dev/null
  kill "$CAD_PID" 2>/dev/null || true
  say "goal 2, for reference: a plain httputil.ReverseProxy (deploy/bench/plainproxy) vs nginx, and the proxy vs it"
  rounds passthrough-plain "$pass" "http://127.0.0.1:$PLAIN" "$PLAIN_PID" "http://127.0.0.1:$NGX" "$NGX_PID"
  reference "2. plain httputil.ReverseProxy / nginx proxy_pass (Go's floor)" passthrough-plain
  rounds passthrough-own "$pass" "http://127.0.0.1:$PRX" "$PRX_PID" "http://127.0.0.1:$PLAIN" "$PLAIN_PID"
  reference "2. proxy / plain httputil.ReverseProxy (the sidecar's own work)" passthrough-own
  say "goal 2, measuring sticks: net/http answering the same bytes itself, and Go forwarding without net/http, each vs nginx"
  # Two measuring sticks: net/http answering the passthrough's bytes itself,
  # with no upstream at all (no net/http proxy can beat it), and Go
  # forwarding without net/http (deploy/bench/rawforward). Started only now,
  # so that they do not sit on the server's core during other measurements.
  start "$SUT_CPU" static env GOMAXPROCS=1 "$out/baseline" -addr "127.0.0.1:$STATIC" -copy-from "http://127.0.0.1:$UP$pass" -token tok-1
  STATIC_PID=${pids[-1]}
  start "$SUT_CPU" rawforward env GOMAXPROCS=1 "$out/rawforward" -addr "127.0.0.1:$RAW" -upstream "127.0.0.1:$UP"
  RAW_PID=${pids[-1]}
  wait_up "http://127.0.0.1:$STATIC$pass"
  wait_up "http://127.0.0.1:$RAW$pass"
  passthrough_same STATIC RAW
  rounds passthrough-static "$pass" "http://127.0.0.1:$STATIC" "$STATIC_PID" "http://127.0.0.1:$NGX" "$NGX_PID"
  reference "2. net/http answering the same bytes itself, no upstream / nginx proxy_pass (the most a net/http proxy could reach)" passthrough-static
  rounds passthrough-raw "$pass" "http://127.0.0.1:$RAW" "$RAW_PID" "http://127.0.0.1:$NGX" "$NGX_PID"
  reference "2. Go forwarding without net/http (deploy/bench/rawforward) / nginx proxy_pass (what Go itself costs)" passthrough-raw
fi

# ---------------------------------------------------------------- goal 3
if want_goal 3; then
  say "goal 3: latency added by a cached whoami over the minimal server (2,000 req/s, alternating, $ROUNDS rounds × 1s)"
  taskset -c "$LOAD_CPU" env GOMAXPROCS=1 "$out/latency" -a "http://127.0.0.1:$PRX$whoami" -b "http://127.0.0.1:$BASE$whoami" \
    -token tok-1 -rate 2000 -rounds "$ROUNDS" -round 1s | tee "$out/latency.txt"
  read -r _ l50 l50min l50max < <(grep '^added_p50_us' "$out/latency.txt")
  read -r _ l99 l99min l99max < <(grep '^added_p99_us' "$out/latency.txt")
  goal "3. added p50 latency, cached whoami vs minimal server (median of rounds; min–max)" \
    "$(printf '%.1f µs (%.1f–%.1f)' "$l50" "$l50min" "$l50max")" "≤ 50 µs" "$(le "$l50" 50)"
  info "3. added p99 latency (dominated by the machine)" "$(printf '%.1f µs (%.1f–%.1f)' "$l99" "$l99min" "$l99max")"
fi

# ---------------------------------------------------------------- goal 5
if want_goal 5; then
  say "goal 5: Zipf whoami load, 64 clients, homeserver taking 20 ms per whoami"
  HS=$(freeport) PRX2=$(freeport) ADM2=$(freeport)
  start "$LOAD_CPU" fakehs env GOMAXPROCS=1 "$out/fakehs" -addr "127.0.0.1:$HS" -whoami-delay 20ms -users 6000
  start "$SUT_CPU" proxy-zipf env UPSTREAM_URL="http://127.0.0.1:$HS" LISTEN_ADDR="127.0.0.1:$PRX2" ADMIN_ADDR="127.0.0.1:$ADM2" \
    CACHE_SIZE=100000 CACHE_TTL=1h RATE_LIMIT_RPS=0 LOG_LEVEL=warn SHUTDOWN_DELAY=0s GOMAXPROCS=1 "$out/matrix-auth-proxy"
  wait_up "http://127.0.0.1:$HS/_bench/whoami_calls"
  wait_up "http://127.0.0.1:$ADM2/healthz"
  taskset -c "$LOAD_CPU" "$out/zipf" -proxy "http://127.0.0.1:$PRX2" -metrics "http://127.0.0.1:$ADM2/metrics" \
    -hs "http://127.0.0.1:$HS" -tokens 20000 -clients 64 -requests 40000 -s 1.1 | tee "$out/zipf.txt"
  read -r _ zr < <(grep '^ratio' "$out/zipf.txt")
  read -r _ zd < <(grep '^distinct' "$out/zipf.txt")
  read -r _ zc < <(grep '^hs_whoami_calls' "$out/zipf.txt")
  goal "5. homeserver whoami calls / distinct tokens (Zipf, 64 clients, 20 ms homeserver)" \
    "$(printf '%.4f (%d calls for %d tokens)' "$zr" "$zc" "$zd")" "≤ 1.05" "$(le "$zr" 1.05)"
fi

# ---------------------------------------------------------------- goal 6
# syn_run URL SECS PID...: one wrk run (64 connections, the 64 users'
# tokens in turn) from LOAD_CPU; prints "req/s p50-ms p99-ms
# synapse-cpu-s-per-1000 requests", the CPU of the processes PID (Synapse)
# over the requests made.
syn_run() {
  local url=$1 secs=$2 j0 j1
  shift 2
  j0=$(proc_jiffies "$@")
  BENCH_TOKENS_FILE="$out/synapse-tokens" taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${secs}s" --latency \
    -s "$repo/deploy/bench/wrk/tokens.lua" "$url" >"$out/wrk.last" 2>&1
  j1=$(proc_jiffies "$@")
  cat "$out/wrk.last" >>"$out/wrk-synapse.log"
  if grep -qE 'Non-2xx|Socket errors' "$out/wrk.last"; then
    echo "bench.sh: wrk against $url saw errors:" >&2
    cat "$out/wrk.last" >&2
    exit 1
  fi
  awk -v j=$((j1 - j0)) -v hz="$(getconf CLK_TCK)" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "50.000%" { p50 = ms($2) } $1 == "99.000%" { p99 = ms($2) }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 } /^Requests\/sec/ { rps = $2 }
    END { printf "%s %.3f %.3f %.4f %d\n", rps, p50, p99, (n > 0 ? 1000 * j / hz / n : 0), n }' "$out/wrk.last"
}
if want_goal 6; then
  say "goal 6: whoami from the real Synapse (deploy/local/synapse.sh), directly and through the proxy; Synapse and proxies on CPU $SUT_CPU"
  SYN=$(freeport) PW=$(freeport) PWA=$(freeport) PS=$(freeport) PSA=$(freeport)
  export SYNAPSE_DATA="$out/synapse" SYNAPSE_PORT=$SYN SYNAPSE_BCRYPT_ROUNDS=4
  taskset -c "$SUT_CPU" deploy/local/synapse.sh start >"$out/synapse-start.log" 2>&1 ||
    { echo "bench.sh: Synapse did not start; see $out/synapse-start.log" >&2; exit 1; }
  SYN_PID=$(tr -dc '0-9' <"$SYNAPSE_DATA/synapse.pid")
  pids+=("$SYN_PID")
  : >"$out/synapse-tokens"
  for i in $(seq 64); do
    deploy/local/synapse.sh register "bench$i" "bench-password-$i" 2>>"$out/synapse-start.log" |
      sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p' >>"$out/synapse-tokens"
  done
  if [ "$(grep -c . "$out/synapse-tokens")" != 64 ]; then
    echo "bench.sh: registering 64 users on Synapse failed; see $out/synapse-start.log" >&2
    exit 1
  fi
  syn_proxy=(UPSTREAM_URL="http://127.0.0.1:$SYN" RATE_LIMIT_RPS=0 LOG_LEVEL=warn SHUTDOWN_DELAY=0s GOMAXPROCS=1)
  start "$SUT_CPU" proxy-synapse-warm env "${syn_proxy[@]}" LISTEN_ADDR="127.0.0.1:$PW" ADMIN_ADDR="127.0.0.1:$PWA" CACHE_TTL=1h "$out/matrix-auth-proxy"
  start "$SUT_CPU" proxy-synapse-short env "${syn_proxy[@]}" LISTEN_ADDR="127.0.0.1:$PS" ADMIN_ADDR="127.0.0.1:$PSA" CACHE_TTL=5s "$out/matrix-auth-proxy"
  tok1=$(head -1 "$out/synapse-tokens")
  wait_up "http://127.0.0.1:$SYN$whoami" "$tok1"
  wait_up "http://127.0.0.1:$PW$whoami" "$tok1"
  wait_up "http://127.0.0.1:$PS$whoami" "$tok1"
  for u in "$SYN" "$PW" "$PS"; do syn_run "http://127.0.0.1:$u" 1 "$SYN_PID" >/dev/null; done # warm up, fill the caches
  : >"$out/synapse.rounds"
  for r in $(seq "$ROUNDS"); do
    for c in direct:$SYN warm:$PW short:$PS short:$PS warm:$PW direct:$SYN; do
      echo "${c%%:*} $(syn_run "http://127.0.0.1:${c#*:}" "$SECS" "$SYN_PID")"
    done >"$out/round.runs"
    awk -v r="$r" '{ n[$1]++; rps[$1] += $2; p50[$1] += $3; p99[$1] += $4; cpu[$1] += $5 }
      END {
        for (k in n) { rps[k] /= n[k]; p50[k] /= n[k]; p99[k] /= n[k]; cpu[k] /= n[k] }
        printf "synapse round %2d: direct %6.0f req/s (%.2f ms p50, %.4f CPU-s/1000) | warm %7.0f (%.0fx, %.4f) | 5s TTL %7.0f (%.1fx, %.4f)\n",
          r, rps["direct"], p50["direct"], cpu["direct"], rps["warm"], rps["warm"] / rps["direct"], cpu["warm"], rps["short"], rps["short"] / rps["direct"], cpu["short"] > "/dev/stderr"
        # 1-3 req/s direct warm short, 4-5 warm/direct short/direct, 6-8 p50 ms, 9-11 p99 ms, 12-14 Synapse CPU-s per 1000
        printf "%s %s %s %.3f %.3f %s %s %s %s %s %s %s %s %s\n", rps["direct"], rps["warm"], rps["short"],
          rps["warm"] / rps["direct"], rps["short"] / rps["direct"], p50["direct"], p50["warm"], p50["short"],
          p99["direct"], p99["warm"], p99["short"], cpu["direct"], cpu["warm"], cpu["short"]
      }' "$out/round.runs" >>"$out/synapse.rounds"
  done
  col() { stats "$out/synapse.rounds" "$1"; }
  read -r sd _ _ < <(col 1)
  read -r sw _ _ < <(col 2)
  read -r ss _ _ < <(col 3)
  read -r rw rwlo rwhi < <(col 4)
  read -r rs rslo rshi < <(col 5)
  read -r pd _ _ < <(col 6)
  read -r pw _ _ < <(col 7)
  read -r pss _ _ < <(col 8)
  read -r qd _ _ < <(col 9)
  read -r qw _ _ < <(col 10)
  read -r qs _ _ < <(col 11)
  read -r cd _ _ < <(col 12)
  read -r cw _ _ < <(col 13)
  read -r cs _ _ < <(col 14)
  goal "6. Synapse whoami through the proxy (warm cache, CACHE_TTL=1h) / directly, 64 users, one shared core (median of $ROUNDS rounds; min–max)" \
    "$(printf '%.1fx (%.1f–%.1f; %.0f vs %.0f req/s)' "$rw" "$rwlo" "$rwhi" "$sw" "$sd")" "≥ 20x" "$(ge "$rw" 20)"
  info "6. same with CACHE_TTL=5s (misses happen)" "$(printf '%.1fx (%.1f–%.1f; %.0f req/s)' "$rs" "$rslo" "$rshi" "$ss")"
  info "6. p50 / p99 latency: direct; warm; 5s TTL" "$(printf '%.2f / %.2f ms; %.2f / %.2f ms; %.2f / %.2f ms' "$pd" "$qd" "$pw" "$qw" "$pss" "$qs")"
  info "6. Synapse CPU-seconds per 1,000 whoami: direct; warm; 5s TTL (CPU taken off the homeserver)" \
    "$(awk -v d="$cd" -v w="$cw" -v s="$cs" 'BEGIN { printf "%.4f; %.4f; %.4f (warm %.1f%% off, 5s TTL %.1f%% off)", d, w, s, (d > 0 ? 100 * (1 - w / d) : 0), (d > 0 ? 100 * (1 - s / d) : 0) }')"
fi

# ---------------------------------------------------------------- goal 4
if want_goal 4; then
  say "goal 4: heap per cached token, $HEAP_TOKENS tokens over $HEAP_USERS users, production fill path"
  HEAP_TOKENS=$HEAP_TOKENS HEAP_USERS=$HEAP_USERS "$out/proxy.test" -test.run '^TestHeapPerTokenProduction$' -test.v | tee "$out/heap.txt"
  heap=$(awk '/heap per token:/ { for (i = 1; i < NF; i++) if ($i == "token:") print $(i + 1) }' "$out/heap.txt")
  goal "4. heap per cached token at $HEAP_TOKENS tokens of $HEAP_USERS users (proxy fill path, heap after − before)" "${heap:-?} bytes" "≤ 350 bytes" "$(le "${heap:-99999}" 350)"
  say "goal 4, every token a different user: $HEAP_TOKENS tokens of $HEAP_TOKENS users"
  HEAP_TOKENS=$HEAP_TOKENS HEAP_USERS=$HEAP_TOKENS "$out/proxy.test" -test.run '^TestHeapPerTokenProduction$' -test.v | tee "$out/heap-distinct.txt"
  heap2=$(awk '/heap per token:/ { for (i = 1; i < NF; i++) if ($i == "token:") print $(i + 1) }' "$out/heap-distinct.txt")
  goal "4. heap per cached token at $HEAP_TOKENS tokens, each of a different user" "${heap2:-?} bytes" "≤ 350 bytes" "$(le "${heap2:-99999}" 350)"
fi

# ---------------------------------------------------------------- profiles
# profile_serve NAME PATH: a CPU and allocation profile of the proxy (built
# as the binary builds it, proxy.TestServeForProfile) under the same wrk load.
profile_serve() {
  local name=$1 path=$2 port
  port=$(freeport)
  start "$SUT_CPU" "profile-$name" env GOMAXPROCS=1 BENCH_SERVE_ADDR="127.0.0.1:$port" BENCH_SERVE_UPSTREAM="http://127.0.0.1:$UP" \
    BENCH_SERVE_SECONDS=15 BENCH_SERVE_CPUPROFILE="$out/cpu-$name.pprof" BENCH_SERVE_MEMPROFILE="$out/allocs-$name.pprof" \
    "$out/proxy.test" -test.run '^TestServeForProfile$'
  local pid=${pids[-1]}
  wait_up "http://127.0.0.1:$port$whoami"
  wrk_rps "http://127.0.0.1:$port" "$path" 10 "$pid" >/dev/null
  wait "$pid" || true
  say "pprof: proxy CPU under the $name load (go tool pprof -top $out/proxy.test $out/cpu-$name.pprof)"
  $GO tool pprof -top -nodecount=30 "$out/proxy.test" "$out/cpu-$name.pprof" 2>/dev/null | tee "$out/cpu-$name.top"
  say "pprof: allocations under the $name load (-sample_index=alloc_space)"
  $GO tool pprof -top -nodecount=20 -sample_index=alloc_space "$out/proxy.test" "$out/allocs-$name.pprof" 2>/dev/null | tee "$out/allocs-$name.top"
}
want_profile() { [ "$PROFILE" = 1 ] || { [ "$PROFILE" = auto ] && [ "$1" = 0 ]; }; }
if want_profile "$(ge "$g1" 0.9)" || want_profile "$(le "$l50" 50)"; then profile_serve whoami "$whoami"; fi
if want_profile "$(ge "$g2" 0.45)"; then profile_serve passthrough "$pass"; fi
if want_profile "$(le "${heap:-99999}" 350)"; then
  say "pprof: what a cached token holds (200,000 tokens, go tool pprof -sample_index=inuse_space)"
  HEAP_TOKENS=200000 HEAP_USERS=60000 HEAP_PROFILE="$out/heap.pprof" "$out/proxy.test" -test.run '^TestHeapPerTokenProduction$' >/dev/null
  $GO tool pprof -top -nodecount=20 -sample_index=inuse_space "$out/proxy.test" "$out/heap.pprof" 2>/dev/null | tee "$out/heap.top"
fi

# ---------------------------------------------------------------- summary
say "results ($(date -u '+%Y-%m-%d %H:%M UTC'), make bench; logs and profiles in $out)"
cat "$out/machine"
echo
echo "| goal | measured | target | result |"
echo "|---|---|---|---|"
printf '%s\n' "${results[@]}" | tee "$out/results.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo
  echo "missed: ${#failed[@]} goal(s)"
  exit 1
fi
