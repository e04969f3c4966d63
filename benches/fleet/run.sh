#!/usr/bin/env bash
# The PostgreSQL fleet's numbers (BENCHMARKS.md, "Fleet"): a local PostgreSQL
# (deploy/postgres/try-fleet.sh) and three gateway replicas on it, all on loopback, then
# examples/fleet_bench.rs:
#   1. propagation: WRITES changes through replica 1, each timed from its commit until all three
#      replicas have it in force (p50 / p99);
#   2. APPS apps x 60 entries loaded into the store as one change;
#   3. a cold replica started against them, timed until it serves them all;
#   4. propagation again, BIG_WRITES one-app changes on replicas that hold APPS apps, with what
#      each replica spent applying one (read, validate, swap).
# About a minute and a half with the defaults. Stops everything it started. As root it installs
# PostgreSQL (apt) if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

WRITES=${WRITES:-1000}
APPS=${APPS:-10000}
BIG_WRITES=${BIG_WRITES:-200}
export FLEET_PORT=${FLEET_PORT:-55433}
FLEET_DIR=$(mktemp -d /tmp/miniapp-fleet-bench.XXXXXX)
export FLEET_DIR
chmod 0755 "$FLEET_DIR"

cargo build --release --quiet --bin miniapp-gateway --example fleet_bench
gateway=$PWD/target/release/miniapp-gateway
bench=$PWD/target/release/examples/fleet_bench

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    deploy/postgres/try-fleet.sh stop >/dev/null 2>&1 || true
    rm -rf "$FLEET_DIR"
}
trap cleanup EXIT

deploy/postgres/try-fleet.sh >/dev/null
conninfo="host=127.0.0.1 port=$FLEET_PORT user=gateway password=fleet-demo-password dbname=postgres"

config() { # name proxy-port admin-port
    cat > "$FLEET_DIR/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"

[store]
backend = "postgres"
url = "postgres://gateway@127.0.0.1:$FLEET_PORT/postgres?sslmode=disable"
password_file = "db-password"
cache = "cache-$1/apps.json"
poll_interval = "5s"
TOML
}
admins=()
for i in 1 2 3; do
    config "r$i" "2808$i" "2909$i"
    "$gateway" run -c "$FLEET_DIR/r$i.toml" >"$FLEET_DIR/r$i.log" 2>&1 &
    pids+=($!)
    admins+=("127.0.0.1:2909$i")
done
config cold 28084 29094
for admin in "${admins[@]}"; do
    for _ in $(seq 100); do curl -sf "http://$admin/readyz" >/dev/null && break; sleep 0.1; done
done
list=$(IFS=,; echo "${admins[*]}")

echo "== propagation, one app in the store ($WRITES writes)"
"$bench" propagate --db "$conninfo" --admin "$list" --writes "$WRITES"

echo "== $APPS apps x 60 entries into the store"
"$bench" load --db "$conninfo" --apps "$APPS" --entries 30
for admin in "${admins[@]}"; do
    for _ in $(seq 600); do
        [[ $(curl -sf "http://$admin/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["apps"])') -ge $APPS ]] && break
        sleep 0.1
    done
done
grep -h "store changes in force" "$FLEET_DIR"/r*.log | tail -n 3 | sed 's/^/  /'

echo "== cold start"
"$bench" cold --gateway "$gateway" --config "$FLEET_DIR/cold.toml" --admin 127.0.0.1:29094 --apps $((APPS + 1))

echo "== propagation, $APPS apps in the store ($BIG_WRITES writes)"
"$bench" propagate --db "$conninfo" --admin "$list" --writes "$BIG_WRITES"
# What the reload itself took on replica 2 (load and validate beside, swap), from its log.
python3 - "$FLEET_DIR/r2.log" "$BIG_WRITES" <<'PY'
import re, statistics, sys
took = [float(m.group(1)) for line in open(sys.argv[1])
        if "config reloaded" in line and "trigger=Store" in line
        for m in [re.search(r"took_ms=([0-9.]+)", line)] if m]
took = sorted(took[-int(sys.argv[2]):])
if took:
    print(f"  replica 2's reloads for those changes (load beside, swap): p50 {statistics.median(took):.1f} ms, "
          f"p99 {took[max(0, int(len(took) * 0.99) - 1)]:.1f} ms")
PY
