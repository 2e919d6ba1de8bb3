#!/usr/bin/env bash
# Services for the scale-out tests (issue 13): a PostgreSQL cluster and HAProxy on loopback.
#
#   scaleout-env.sh start            install postgresql + haproxy if missing (Debian packages),
#                                    start the shared cluster on 127.0.0.1:$TANDEM_PG_PORT
#   scaleout-env.sh env              print the exports the tests read
#   scaleout-env.sh stop             stop every cluster this script started, remove its files
#   scaleout-env.sh pg-up NAME PORT [TLS_DIR]
#                                    start (initdb on first use) a private cluster NAME; with
#                                    TLS_DIR (holding server.crt and server.key, PEM) it also
#                                    accepts TLS (ssl = on; plain connections still work)
#   scaleout-env.sh pg-down NAME     stop cluster NAME immediately (database-down tests)
#
# Clusters live under $TANDEM_SCALEOUT_DIR (default /tmp/tandem-scaleout), listen on
# 127.0.0.1 only, trust local connections as user postgres (throw-away test data only), and
# run as the postgres user when this script runs as root (PostgreSQL refuses root).
set -euo pipefail
STATE=${TANDEM_SCALEOUT_DIR:-/tmp/tandem-scaleout}
PG_PORT=${TANDEM_PG_PORT:-55432}
HERE=$(cd "$(dirname "$0")" && pwd)

pgbin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] || { echo "scaleout-env: no PostgreSQL server binaries under /usr/lib/postgresql" >&2; exit 1; }
  echo "$d"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_missing() {
  local want=()
  ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want+=(postgresql)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
  if [ ${#want[@]} -gt 0 ]; then
    echo "scaleout-env: installing ${want[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${want[@]}" >/dev/null; }
    # The packages start system services; the tests run their own on other ports.
    service haproxy stop >/dev/null 2>&1 || true
  fi
}

pg_up() {
  local name=$1 port=$2 tls_dir=${3:-} dir="$STATE/$1" bin ssl_opts=""
  bin=$(pgbin)
  mkdir -p "$STATE"; chmod 755 "$STATE"
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    chmod 700 "$dir"
    as_pg "$bin/initdb" -D "$dir" -U postgres -A trust --no-sync -E UTF8 >/dev/null
  fi
  if as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "scaleout-env: PostgreSQL $name already running" >&2
    return 0
  fi
  if [ -n "$tls_dir" ]; then
    # Copied into the data directory: the server reads them as its own user, key mode 0600.
    install -m 0644 "$tls_dir/server.crt" "$dir/server.crt"
    install -m 0600 "$tls_dir/server.key" "$dir/server.key"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir/server.crt" "$dir/server.key"
    ssl_opts=" -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
  fi
  as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c max_connections=200$ssl_opts" \
    start >/dev/null
  echo "scaleout-env: PostgreSQL $name on 127.0.0.1:$port" >&2
}

pg_down() {
  local dir="$STATE/$1"
  [ -f "$dir/postmaster.pid" ] || return 0
  as_pg "$(pgbin)/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  start)
    install_missing
    pg_up main "$PG_PORT"
    ;;
  env)
    echo "export TANDEM_TEST_PG='host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres'"
    echo "export TANDEM_TEST_HAPROXY='$(command -v haproxy || echo /usr/sbin/haproxy)'"
    echo "export TANDEM_SCALEOUT_ENV='$HERE/scaleout-env.sh'"
    ;;
  stop)
    for d in "$STATE"/*/; do
      [ -d "$d" ] && pg_down "$(basename "$d")"
    done
    rm -rf "$STATE"
    ;;
  pg-up) pg_up "$2" "$3" "${4:-}" ;;
  pg-down) pg_down "$2" ;;
  *) echo "usage: $0 start|env|stop|pg-up NAME PORT [TLS_DIR]|pg-down NAME" >&2; exit 2 ;;
esac
