#!/usr/bin/env bash
# Side-by-side load harness: a direct connection, miniapp-gateway, Squid and tinyproxy, with
# equivalent allowlists, against one nginx TLS origin, in one run, rounds alternating.
#
# Everything listens on 127.0.0.1 and everything it starts is stopped on exit. It installs
# what it needs (Debian: nginx-light squid tinyproxy; crates.io: oha) when missing, which
# needs root. Knobs (environment): ROUNDS=3 DURATION=8 CLIENTS=32 IDLE_TUNNELS=2000
# MANY_TUNNELS=10000 BULK_MB=1024 GATEWAY_THREADS=(tokio's default: one per core)
# GATEWAY_WORKERS=(unset: the config's default, one event loop; N: `[server] workers = N`)
# COMPARE_WORKERS="0 2" (also runs a gateway with each of these `workers` values, measured in
# the same rounds on kept-alive and new requests, rates and CPU, in a second table); PERF=1
# also counts each proxy's context switches, CPU migrations and system calls per request with
# `perf stat` (Debian's linux-perf) over the request-rate runs; PERF=record instead samples each
# gateway's and Squid's call stacks (`perf record -g`, 999 Hz) over their first round's
# request-rate runs and prints where their CPU per request goes, by kernel entry point (the
# sampling costs some CPU in that round).
# Prints a markdown table of medians and ratios.
set -euo pipefail

ORIGIN_NAME=origin.bench.example
DENIED_NAME=denied.bench.example

# Every client and proxy must resolve the origin's name, and oha resolves it itself even when
# it goes through a proxy. Rather than edit the machine's /etc/hosts, re-run this script in a
# private mount namespace where /etc/hosts also names the origin.
if [ -z "${LOAD_HOSTS:-}" ]; then
  hosts=$(mktemp /tmp/miniapp-load-hosts.XXXXXX)
  { cat /etc/hosts; printf '127.0.0.1 %s\n' "$ORIGIN_NAME"; } > "$hosts"
  chmod 644 "$hosts"
  exec unshare -m env LOAD_HOSTS="$hosts" bash -c 'mount --bind "$LOAD_HOSTS" /etc/hosts && exec "$0" "$@"' "$0" "$@"
fi

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-32}
IDLE_TUNNELS=${IDLE_TUNNELS:-2000}
MANY_TUNNELS=${MANY_TUNNELS:-10000}
BULK_MB=${BULK_MB:-1024}

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/miniapp-load.XXXXXX)
chmod 755 "$work"
pids=()

log() { printf '%s\n' "$*" >&2; }

cleanup() {
  for pid in "${pids[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
  # Squid takes its shutdown_lifetime (1 s) to go; give everything up to 3 s.
  for _ in $(seq 30); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$work" "$LOAD_HOSTS"
}
trap cleanup EXIT INT TERM

# --- tools -------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v squid >/dev/null || missing+=(squid)
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
if [ "${PERF:-0}" != 0 ]; then command -v perf >/dev/null || missing+=(linux-perf); fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from Debian"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
command -v oha >/dev/null || { log "installing oha from crates.io (a few minutes)"; cargo install oha --locked -q; }
ulimit -n "$(ulimit -Hn)"

log "building the gateway and the load generator (release)"
(cd "$root" && cargo build -q --release --bin miniapp-gateway --example loadgen)
gateway_bin=$root/target/release/miniapp-gateway
loadgen=$root/target/release/examples/loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN=$(free_port); GW=$(free_port); GW_ADMIN=$(free_port); SQUID=$(free_port); TINY=$(free_port)

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on $1"; return 1
}

# --- origin ------------------------------------------------------------------------------
"$gateway_bin" certs "$work/certs" --host "$ORIGIN_NAME" >/dev/null
head -c 100 /dev/zero | tr '\0' 'x' > "$work/small"
truncate -s "${BULK_MB}M" "$work/big"
chmod -R a+rX "$work"
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
worker_rlimit_nofile 100000;
pid $work/nginx.pid;
error_log $work/nginx-error.log error;
events { worker_connections 40000; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$ORIGIN ssl;
    ssl_certificate $work/certs/gateway.crt;
    ssl_certificate_key $work/certs/gateway.key;
    ssl_session_cache off;
    ssl_session_tickets off;
    root $work;
    location / { }
  }
}
NGINX
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)

# --- miniapp-gateway ----------------------------------------------------------------------
# In a directory of its own, as deployed: the reload watcher is told of every file event in
# the config's directory, nginx opening the files it serves included.
# gateway_config DIR PORT ADMIN_PORT WORKERS(empty: the default)
gateway_config() {
  mkdir "$1"
  cat > "$1/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
${4:+workers = $4}
[limits]
max_connections = 20000
[resolve]
"$ORIGIN_NAME" = "127.0.0.1"
[[app]]
id = "bench"
token = "bench-secret"
server_domains = ["https://$ORIGIN_NAME:$ORIGIN"]
TOML
}
gateway_config "$work/gateway" "$GW" "$GW_ADMIN" "${GATEWAY_WORKERS:-}"
env RUST_LOG=warn ${GATEWAY_THREADS:+TOKIO_WORKER_THREADS=$GATEWAY_THREADS} "$gateway_bin" run -c "$work/gateway/gateway.toml" > /dev/null & pids+=($!)
gw_pid=$!
# the models to compare, each a gateway of its own: "gateway-wN" has `workers = N`
declare -A model_port model_pid
models=()
for w in ${COMPARE_WORKERS:-}; do
  m=gateway-w$w
  models+=("$m")
  model_port[$m]=$(free_port)
  gateway_config "$work/$m" "${model_port[$m]}" "$(free_port)" "$w"
  env RUST_LOG=warn ${GATEWAY_THREADS:+TOKIO_WORKER_THREADS=$GATEWAY_THREADS} "$gateway_bin" run -c "$work/$m/gateway.toml" > /dev/null & pids+=($!)
  model_pid[$m]=$!
done
AUTH="Basic $(printf 'bench:bench-secret' | base64)"

# --- Squid --------------------------------------------------------------------------------
cat > "$work/squid.conf" <<SQUIDCONF
http_port 127.0.0.1:$SQUID
acl allowed dstdomain $ORIGIN_NAME
acl tls_port port $ORIGIN
acl CONNECT method CONNECT
http_access deny CONNECT !tls_port
http_access allow CONNECT allowed
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_log $work/squid-cache.log
pid_filename $work/squid.pid
coredump_dir $work
max_filedescriptors 60000
shutdown_lifetime 1 seconds
SQUIDCONF
touch "$work/squid-cache.log"; chmod 666 "$work/squid-cache.log"
squid -N -f "$work/squid.conf" & pids+=($!)
squid_pid=$!

# --- tinyproxy ----------------------------------------------------------------------------
printf '^%s$\n' "${ORIGIN_NAME//./\\.}" > "$work/tinyproxy.filter"
cat > "$work/tinyproxy.conf" <<TINYCONF
Port $TINY
Listen 127.0.0.1
Timeout 600
MaxClients 20000
Allow 127.0.0.1
ConnectPort $ORIGIN
Filter "$work/tinyproxy.filter"
FilterDefaultDeny Yes
LogLevel Critical
LogFile "$work/tinyproxy.log"
PidFile "$work/tinyproxy.pid"
TINYCONF
touch "$work/tinyproxy.log"; chmod 666 "$work/tinyproxy.log"
tinyproxy -d -c "$work/tinyproxy.conf" & pids+=($!)
tiny_pid=$!

for port in $ORIGIN $GW $SQUID $TINY "${model_port[@]}"; do wait_port "$port"; done
sleep 0.5

# --- measurements -------------------------------------------------------------------------
# proxy_args NAME: oha arguments that send traffic through NAME (none for direct).
proxy_args() {
  case $1 in
    direct) echo "" ;;
    gateway) echo "-x http://127.0.0.1:$GW" ;;
    squid) echo "-x http://127.0.0.1:$SQUID" ;;
    tinyproxy) echo "-x http://127.0.0.1:$TINY" ;;
    gateway-w*) echo "-x http://127.0.0.1:${model_port[$1]}" ;;
  esac
}
proxy_port() { case $1 in gateway) echo "$GW" ;; squid) echo "$SQUID" ;; tinyproxy) echo "$TINY" ;; gateway-w*) echo "${model_port[$1]}" ;; esac; }
proxy_pid() { case $1 in gateway) echo "$gw_pid" ;; squid) echo "$squid_pid" ;; tinyproxy) echo "$tiny_pid" ;; gateway-w*) echo "${model_pid[$1]}" ;; esac; }

# cpu_ticks PID: the user and system CPU time (clock ticks) PID and its children have used,
# from /proc/PID/stat (fields 14 and 15; the command names here have no spaces).
cpu_ticks() {
  local user=0 sys=0 pid u s
  for pid in $1 $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat" 2>/dev/null || echo "0 0")
    user=$((user + u)); sys=$((sys + s))
  done
  echo "$user $sys"
}

# oha_rps NAME MODE [extra args]: successful requests per second; for a proxy, its CPU time
# per request over the same run (user and system, microseconds) goes to $work/cpu.NAME.MODE.
oha_rps() {
  local name=$1 mode=$2; shift 2
  local extra=() pid before after
  [[ "$name" = gateway* ]] && extra=(--proxy-header "Proxy-Authorization: $AUTH")
  pid=$(proxy_pid "$name")
  local perf= record=
  if [ "${PERF:-0}" = 1 ] && [ -n "$pid" ] && [ "$mode" != warmup ]; then
    # every thread of the proxy, for the length of the run
    perf stat -e context-switches,cpu-migrations,raw_syscalls:sys_enter -x, -o "$work/perf.out" \
        -t "$(ls /proc/"$pid"/task | paste -sd,)" -- sleep "$DURATION" 2>/dev/null & perf=$!
  fi
  if [ "${PERF:-0}" = record ] && [ -n "$pid" ] && [ "$mode" != warmup ] && [ "$name" != tinyproxy ] \
      && [ ! -e "$work/record.$name.$mode" ]; then
    perf record -q -F 999 -g -o "$work/record.$name.$mode" -p "$pid" -- sleep "$DURATION" >/dev/null 2>&1 & record=$!
  fi
  before=$([ -n "$pid" ] && cpu_ticks "$pid" || echo "0 0")
  # shellcheck disable=SC2046
  oha -z "${DURATION}s" -c "$CLIENTS" --no-tui --output-format json --insecure \
      $(proxy_args "$name") "${extra[@]}" "$@" "https://$ORIGIN_NAME:$ORIGIN/small" > "$work/oha.json" 2>/dev/null || true
  after=$([ -n "$pid" ] && cpu_ticks "$pid" || echo "0 0")
  [ -n "$perf" ] && wait "$perf"
  [ -n "$record" ] && wait "$record"
  python3 - "$work/oha.json" "$before" "$after" "$(getconf CLK_TCK)" "$work/cpu.$name.$mode" \
      "$([ -n "$perf" ] && echo "$work/perf.out")" "$work/perf.$name.$mode" \
      "$([ -n "$record" ] && echo "$work/record-cpu.$name.$mode")" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    ok = r.get("statusCodeDistribution", {}).get("200", 0)
    print(f"{ok / r['summary']['total']:.0f}")
except Exception:
    ok = 0
    print("0")
(u0, s0), (u1, s1), tick = map(int, sys.argv[2].split()), map(int, sys.argv[3].split()), int(sys.argv[4])
if ok:
    with open(sys.argv[5], "a") as out:
        out.write(f"{(u1 - u0) * 1e6 / tick / ok:.1f} {(s1 - s0) * 1e6 / tick / ok:.1f}\n")
if ok and len(sys.argv) > 8 and sys.argv[8]:
    with open(sys.argv[8], "w") as out:  # the CPU of the run that was profiled
        out.write(f"{(u1 - u0) * 1e6 / tick / ok:.1f} {(s1 - s0) * 1e6 / tick / ok:.1f}\n")
if ok and sys.argv[6]:
    counts = {}
    for line in open(sys.argv[6]):
        fields = line.strip().split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2]] = int(fields[0])
    with open(sys.argv[7], "a") as out:
        out.write(" ".join(f"{counts.get(e, 0) / ok:.2f}" for e in ("context-switches", "cpu-migrations", "raw_syscalls:sys_enter")) + "\n")
PY
}

# bulk NAME: bytes per second of one large download through one tunnel.
bulk() {
  local args=(-s -o /dev/null -w '%{speed_download}' --insecure)
  case $1 in
    direct) ;;
    gateway) args+=(-x "http://bench:bench-secret@127.0.0.1:$GW") ;;
    *) args+=(-x "http://127.0.0.1:$(proxy_port "$1")") ;;
  esac
  curl "${args[@]}" "https://$ORIGIN_NAME:$ORIGIN/big" | cut -d. -f1
}

# deny NAME: refusals per second of CONNECTs to an unlisted host.
deny() {
  local extra=()
  [ "$1" = gateway ] && extra=(--auth "$AUTH")
  "$loadgen" deny --proxy "127.0.0.1:$(proxy_port "$1")" --target "$DENIED_NAME:$ORIGIN" \
      --connections "$CLIENTS" --seconds "$DURATION" "${extra[@]}" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["per_sec"]))'
}

# rss_kib PID: resident memory of PID and its children, KiB.
rss_kib() {
  local total=0 pid
  for pid in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# idle NAME COUNT PID: open COUNT tunnels, hold them; prints "opened failed kib_per_tunnel".
idle() {
  local extra=() before after fifo=$work/hold.$1
  [ "$1" = gateway ] && extra=(--auth "$AUTH")
  before=$(rss_kib "$3")
  mkfifo "$fifo"
  "$loadgen" idle --proxy "127.0.0.1:$(proxy_port "$1")" --target "$ORIGIN_NAME:$ORIGIN" --ca "$work/certs/ca.crt" \
      --count "$2" --connections 200 --seconds 120 "${extra[@]}" < "$fifo" > "$work/idle.json" &
  local gen=$!
  exec 7>"$fifo"
  for _ in $(seq 1200); do grep -q ready "$work/idle.json" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  after=$(rss_kib "$3")
  exec 7>&-
  wait "$gen" || true
  rm -f "$fifo"
  python3 - "$work/idle.json" "$before" "$after" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[0])
opened, before, after = r["opened"], int(sys.argv[2]), int(sys.argv[3])
per = (after - before) / opened if opened else 0
print(r["opened"], r["failed"], f"{per:.1f}")
PY
  sleep 2
}

declare -A keep new bulkbps refusals
targets=(direct gateway squid tinyproxy)
log "warming up (untimed): every path once"
for t in "${targets[@]}"; do
  bulk "$t" > /dev/null
  DURATION=1 oha_rps "$t" warmup > /dev/null
done
for m in "${models[@]}"; do DURATION=1 oha_rps "$m" warmup > /dev/null; done
for round in $(seq "$ROUNDS"); do
  log "round $round of $ROUNDS"
  # rotate the order each round so no target always runs first (or on a warm cache)
  order=("${targets[@]:$((round % 4))}" "${targets[@]:0:$((round % 4))}")
  for t in "${order[@]}"; do
    keep[$t]+="$(oha_rps "$t" keep) "
    new[$t]+="$(oha_rps "$t" new --disable-keepalive) "
    bulkbps[$t]+="$(bulk "$t") "
    [ "$t" = direct ] || refusals[$t]+="$(deny "$t") "
    if [ "$t" = gateway ] && [ ${#models[@]} -gt 0 ]; then
      # the other models right after the default one, in an order rotated each round
      shift_by=$((round % ${#models[@]}))
      for m in "${models[@]:$shift_by}" "${models[@]:0:$shift_by}"; do
        keep[$m]+="$(oha_rps "$m" keep) "
        new[$m]+="$(oha_rps "$m" new --disable-keepalive) "
      done
    fi
  done
done

log "idle tunnels ($IDLE_TUNNELS each)"
read -r g_open g_fail g_kib < <(idle gateway "$IDLE_TUNNELS" "$gw_pid")
read -r s_open s_fail s_kib < <(idle squid "$IDLE_TUNNELS" "$squid_pid")
read -r t_open t_fail t_kib < <(idle tinyproxy "$IDLE_TUNNELS" "$tiny_pid")
log "$MANY_TUNNELS concurrent tunnels through the gateway"
read -r m_open m_fail m_kib < <(idle gateway "$MANY_TUNNELS" "$gw_pid")

median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{a/b:.2f}x' if b else '-')"; }
mib() { python3 -c "print(f'{float(\"$1\")/1048576:.0f} MiB/s')"; }

row() { # label, associative array name, formatter
  local label=$1 fmt=${3:-plain}
  local -n arr=$2
  local d g s t
  d=$(median "${arr[direct]:-0}"); g=$(median "${arr[gateway]}"); s=$(median "${arr[squid]}"); t=$(median "${arr[tinyproxy]}")
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
    "$([ "$d" = 0 ] && echo - || $fmt "$d")" "$($fmt "$g")" "$($fmt "$s")" "$($fmt "$t")" \
    "$(ratio "$g" "$s")" "$([ "$d" = 0 ] && echo - || ratio "$g" "$d")"
}
plain() { echo "$1"; }

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $ROUNDS rounds, ${DURATION}s each, $CLIENTS clients; medians"
echo
echo "| measure | direct | gateway | squid | tinyproxy | gateway/squid | gateway/direct |"
echo "|---|---|---|---|---|---|---|"
row "requests/s, kept-alive tunnels" keep plain
row "requests/s, new CONNECT + TLS per request" new plain
row "bulk download, one tunnel (${BULK_MB} MiB)" bulkbps mib
row "refusals/s, unlisted host" refusals plain
printf '| memory per idle tunnel (%s tunnels) | - | %s KiB | %s KiB | %s KiB | %s | - |\n' "$IDLE_TUNNELS" "$g_kib" "$s_kib" "$t_kib" "$(ratio "$g_kib" "$s_kib")"
printf '| idle tunnels opened / failed | - | %s / %s | %s / %s | %s / %s | - | - |\n' "$g_open" "$g_fail" "$s_open" "$s_fail" "$t_open" "$t_fail"
printf '| %s concurrent tunnels, opened / failed | - | %s / %s | - | - | - | - |\n' "$MANY_TUNNELS" "$m_open" "$m_fail"

# cpu_median NAME MODE: median user and system CPU microseconds per request over the rounds.
cpu_median() {
  python3 - "$work/cpu.$1.$2" <<'PY'
import statistics, sys
try:
    rows = [tuple(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
    print(f"{statistics.median(r[0] for r in rows):.1f} {statistics.median(r[1] for r in rows):.1f}")
except Exception:
    print("0 0")
PY
}
total() { python3 -c "print(f'{$1 + $2:.1f}')"; }

# cpu_row MODE LABEL: CPU microseconds per request, user / system (total), medians over rounds.
cpu_row() {
  local mode=$1 label=$2 t u s cells=() totals=()
  for t in gateway squid tinyproxy; do
    read -r u s < <(cpu_median "$t" "$mode")
    cells+=("$u / $s ($(total "$u" "$s"))")
    totals+=("$(total "$u" "$s")")
  done
  printf '| CPU µs per request, %s: user / sys (total) | - | %s | %s | %s | %s | - |\n' "$label" \
    "${cells[0]}" "${cells[1]}" "${cells[2]}" "$(ratio "${totals[0]}" "${totals[1]}")"
}
cpu_row keep "kept-alive tunnels"
cpu_row new "new CONNECT + TLS per request"

# perf_row MODE LABEL: context switches, CPU migrations and system calls per request.
perf_row() {
  local mode=$1 label=$2 t cells=()
  for t in gateway squid tinyproxy; do
    cells+=("$(python3 - "$work/perf.$t.$mode" <<'PY'
import statistics, sys
try:
    rows = [tuple(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
    print(" / ".join(f"{statistics.median(r[i] for r in rows):.2f}" for i in range(3)))
except Exception:
    print("-")
PY
)")
  done
  printf '| switches / migrations / syscalls per request, %s | - | %s | %s | %s | - | - |\n' "$label" "${cells[@]}"
}
if [ "${PERF:-0}" = 1 ]; then
  perf_row keep "kept-alive tunnels"
  perf_row new "new CONNECT + TLS per request"
fi

# The gateway models against Squid, from the same rounds.
if [ ${#models[@]} -gt 0 ]; then
  cpu_total() { local u s; read -r u s < <(cpu_median "$1" "$2"); total "$u" "$s"; }
  squid_keep=$(median "${keep[squid]}"); squid_new=$(median "${new[squid]}")
  squid_cpu_keep=$(cpu_total squid keep); squid_cpu_new=$(cpu_total squid new)
  echo
  echo "| gateway model | requests/s kept-alive (/squid) | requests/s new CONNECT + TLS (/squid) | CPU µs per kept-alive request (/squid) | CPU µs per new CONNECT + TLS (/squid) |"
  echo "|---|---|---|---|---|"
  for m in gateway "${models[@]}"; do
    case $m in gateway) label="workers = ${GATEWAY_WORKERS:-1 (default)}" ;; gateway-w0) label="workers = 0 (the main runtime)" ;; *) label="workers = ${m#gateway-w}" ;; esac
    k=$(median "${keep[$m]}"); n=$(median "${new[$m]}"); ck=$(cpu_total "$m" keep); cn=$(cpu_total "$m" new)
    printf '| %s | %s (%s) | %s (%s) | %s (%s) | %s (%s) |\n' "$label" "$k" "$(ratio "$k" "$squid_keep")" "$n" "$(ratio "$n" "$squid_new")" \
      "$ck" "$(ratio "$ck" "$squid_cpu_keep")" "$cn" "$(ratio "$cn" "$squid_cpu_new")"
  done
fi

# Where each proxy's CPU per request goes, from the stacks sampled in its first round: the
# share of samples under each kernel entry point (inclusive; "switching" is the part of all
# of them spent being switched back in after sleeping), times the CPU per request of that
# same run.
if [ "${PERF:-0}" = record ]; then
  profiled=(gateway "${models[@]}" squid)
  for mode in keep new; do
    for t in "${profiled[@]}"; do
      [ -e "$work/record.$t.$mode" ] || continue
      perf report -i "$work/record.$t.$mode" --children --sort sym --stdio -g none 2>/dev/null > "$work/report.$t.$mode" || true
      perf report -i "$work/record.$t.$mode" --no-children --sort dso --stdio -g none 2>/dev/null > "$work/dso.$t.$mode" || true
    done
  done
  python3 - "$work" "${profiled[@]}" <<'PY'
import re, sys
work, names = sys.argv[1], sys.argv[2:]
groups = [
    ("user space", None),
    # the functions every path of a system call passes, whatever the kernel's entry stubs
    ("send (the receiver's TCP input and wake-up included)", ["__sys_sendto", "ksys_write", "do_writev", "__sys_sendmsg"]),
    ("receive", ["__sys_recvfrom", "ksys_read", "do_readv", "__sys_recvmsg"]),
    ("epoll_wait", ["do_epoll_wait"]),
    ("epoll_ctl", ["do_epoll_ctl"]),
    ("accept, socket, connect", ["__sys_accept4", "__sys_socket", "__sys_connect"]),
    ("shutdown, close", ["__sys_shutdown", "__x64_sys_close"]),
    ("futex (threads waking threads)", ["do_futex"]),
]
def load(name, mode):
    try:
        children = {}
        for line in open(f"{work}/report.{name}.{mode}"):
            m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+(\S+)", line)
            if m:
                children[m.group(3)] = (float(m.group(1)), float(m.group(2)))
        # the kernel and its modules: every "[name]" but the vDSO and unknown code
        kernel = sum(float(m.group(1)) for line in open(f"{work}/dso.{name}.{mode}")
                     if (m := re.match(r"\s+([\d.]+)%\s+\[(?!vdso\]|unknown\]|vsyscall\])", line)))
        cpu = sum(map(float, open(f"{work}/record-cpu.{name}.{mode}").readline().split()))
        return children, kernel, cpu
    except (OSError, ValueError):
        return None
for mode, label in (("keep", "kept-alive tunnels"), ("new", "new CONNECT + TLS per request")):
    data = {n: load(n, mode) for n in names}
    cols = [n for n in names if data[n]]
    if not cols:
        continue
    print()
    print(f"| CPU µs per request, {label} (perf record, first round) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    rows = {}
    for n in cols:
        children, kernel, cpu = data[n]
        us = lambda pct: pct * cpu / 100
        cells = [us(100 - kernel)]
        named = 0.0
        for _, syms in groups[1:]:
            pct = sum(children.get(s, (0, 0))[0] for s in syms)
            named += pct
            cells.append(us(pct))
        cells.append(us(max(kernel - named, 0)))
        cells.append(us(sum(own for sym, (_, own) in children.items() if sym.startswith("finish_task_switch"))))
        cells.append(cpu)
        rows[n] = cells
    labels = [g[0] for g in groups] + ["other kernel work", "of all these: switching back in after sleeping", "total (CPU per request of that run)"]
    for i, row_label in enumerate(labels):
        print(f"| {row_label} | " + " | ".join(f"{rows[n][i]:.1f}" for n in cols) + " |")
PY
fi
