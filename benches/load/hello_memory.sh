#!/usr/bin/env bash
# Memory held by tunnels waiting for their ClientHello: CONNECTIONS authenticated CONNECTs to a
# release-build gateway, each sending the first half of a ClientHello grown to HELLO_BYTES and
# then stalling (as a slow or hostile client may, until `header_timeout`). Prints the
# gateway's resident set (VmRSS) before and with them open, and what that is per connection.
#
# Everything listens on 127.0.0.1; the origin is a plain TCP listener inside the load generator
# (nothing should reach it). It stops by itself: the generator holds for at most 60 s and
# everything started here is stopped on exit. Knobs (environment): CONNECTIONS=2000
# HELLO_BYTES=65000 GATEWAY_BIN=(the release build of this tree; another binary to compare).
set -euo pipefail

CONNECTIONS=${CONNECTIONS:-2000}
HELLO_BYTES=${HELLO_BYTES:-65000}
ORIGIN_NAME=origin.bench.example

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/miniapp-hello.XXXXXX)
pids=()

log() { printf '%s\n' "$*" >&2; }

cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ulimit -n "$(ulimit -Hn)"
log "building the gateway and the load generator (release)"
(cd "$root" && cargo build -q --release --bin miniapp-gateway --example loadgen)
gateway_bin=${GATEWAY_BIN:-$root/target/release/miniapp-gateway}
loadgen=$root/target/release/examples/loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN=$(free_port); GW=$(free_port)

cat > "$work/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GW"
[limits]
max_connections = 20000
header_timeout = "120s"
[resolve]
"$ORIGIN_NAME" = "127.0.0.1"
[[app]]
id = "bench"
token = "bench-secret"
server_domains = ["https://$ORIGIN_NAME:$ORIGIN"]
TOML
RUST_LOG=warn "$gateway_bin" run -c "$work/gateway.toml" > /dev/null & pids+=($!)
gw_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$GW") 2>/dev/null && break; sleep 0.1; done
sleep 1

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$gw_pid")
mkfifo "$work/hold"
"$loadgen" stall --proxy "127.0.0.1:$GW" --target "$ORIGIN_NAME:$ORIGIN" --origin "127.0.0.1:$ORIGIN" \
    --auth "Basic $(printf 'bench:bench-secret' | base64)" --count "$CONNECTIONS" --connections 200 \
    --hello-bytes "$HELLO_BYTES" --seconds 60 < "$work/hold" > "$work/stall.json" & pids+=($!)
exec 7>"$work/hold"
for _ in $(seq 600); do grep -q ready "$work/stall.json" 2>/dev/null && break; sleep 0.1; done
sleep 1
after=$(rss_kib "$gw_pid")
exec 7>&-

python3 - "$work/stall.json" "$before" "$after" "$gateway_bin" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[0])
before, after = int(sys.argv[2]), int(sys.argv[3])
opened, closed = r["opened"], r["closed_by_gateway"]
print(f"gateway: {sys.argv[4]}")
print(f"ClientHello {r['hello_bytes']} bytes, {r['sent_each']} sent on each tunnel, then a stall")
print(f"tunnels opened {opened}, failed {r['failed']}, closed by the gateway {closed}, still waiting {opened - closed}")
print(f"bytes that reached the origin: {r['origin_bytes']}")
print(f"gateway VmRSS before {before / 1024:.1f} MiB, with them open {after / 1024:.1f} MiB, "
      f"growth {(after - before) / 1024:.1f} MiB = {(after - before) / max(opened, 1):.1f} KiB per tunnel opened")
PY
