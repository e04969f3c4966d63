#!/usr/bin/env bash
# A throwaway PostgreSQL and the configs of two gateway replicas on it, to try the PostgreSQL
# store on one machine. Everything lives in one directory (default /tmp/miniapp-fleet):
#
#   deploy/postgres/try-fleet.sh          # start PostgreSQL on 127.0.0.1:55432, write a.toml and b.toml
#   deploy/postgres/try-fleet.sh stop     # stop it (the directory stays; rm -rf it to start over)
#
# Needs PostgreSQL's server binaries (Debian: apt-get install postgresql; as root this script
# installs them). PostgreSQL refuses to run as root, so as root the cluster belongs to the
# `postgres` user (or `nobody`).
set -euo pipefail

dir=${FLEET_DIR:-/tmp/miniapp-fleet}
port=${FLEET_PORT:-55432}
password=fleet-demo-password

find_bin() {
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v initdb)"
    else
        ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
    fi
}

bin=$(find_bin)
if [[ -z "$bin" && $(id -u) -eq 0 ]]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    bin=$(find_bin)
fi
[[ -n "$bin" ]] || { echo "PostgreSQL's server binaries are missing: apt-get install postgresql" >&2; exit 1; }

as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        local user=postgres
        id -u postgres >/dev/null 2>&1 || user=nobody
        runuser -u "$user" -- "$@"
    else
        "$@"
    fi
}

if [[ "${1:-}" == stop ]]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" stop -m fast
    exit 0
fi

mkdir -p "$dir"
if [[ $(id -u) -eq 0 ]]; then
    owner=postgres
    id -u postgres >/dev/null 2>&1 || owner=nobody
    chown "$owner" "$dir"
fi
echo "$password" > "$dir/db-password"
chmod 0644 "$dir/db-password"
if [[ ! -d "$dir/data" ]]; then
    as_owner "$bin/initdb" -D "$dir/data" -U gateway --auth=scram-sha-256 --pwfile="$dir/db-password" >/dev/null
fi
as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >/dev/null

for replica in a b; do
    case $replica in a) proxy=18080 admin=19090 ;; b) proxy=18081 admin=19091 ;; esac
    cat > "$dir/$replica.toml" <<TOML
# Replica $replica of the fleet in $dir (written by deploy/postgres/try-fleet.sh).
[server]
listen = "127.0.0.1:$proxy"
admin_listen = "127.0.0.1:$admin"

[resolve]
# so that the demo's names lead somewhere without DNS: an allowed CONNECT reaches this address
"api.shop.example" = "127.0.0.1:8443"

[store]
backend = "postgres"
url = "postgres://gateway@127.0.0.1:$port/postgres?sslmode=disable"
password_file = "db-password"
cache = "cache-$replica/apps.json"
poll_interval = "5s"
TOML
done
echo "PostgreSQL listens on 127.0.0.1:$port (data in $dir/data)"
echo "replica configs: $dir/a.toml (proxy :18080, admin :19090) and $dir/b.toml (proxy :18081, admin :19091)"
