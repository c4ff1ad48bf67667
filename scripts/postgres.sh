#!/usr/bin/env bash
# A private PostgreSQL cluster for a Prefect server (the scale-out tests; a production-shaped
# server on one machine). Installs Debian's `postgresql` when missing (as root), then:
#
#   scripts/postgres.sh start DIR PORT   initdb DIR/data if new, start it on 127.0.0.1:PORT, create the
#                                        database `prefect`, print postgresql+asyncpg://postgres:...@127.0.0.1:PORT/prefect
#   scripts/postgres.sh stop DIR         stop the cluster of DIR (fast shutdown)
#   scripts/postgres.sh url DIR          print the connection URL again
#
# The cluster listens on loopback only (no Unix socket) and requires the password kept in
# DIR/password (mode 600). initdb refuses to run as root: as root the cluster belongs to the
# `postgres` user and DIR must be reachable by it.
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT | stop DIR | url DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$2

ensure_installed() {
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed and we are not root; apt-get install postgresql" >&2
    exit 1
  fi
  echo "postgres.sh: apt-get install postgresql" >&2
  apt-get update -qq
  # The package would start a cluster of its own on 5432: forbid service starts during the install.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

bindir() {
  # The newest installed major version.
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] || { echo "postgres.sh: no /usr/lib/postgresql/*/bin" >&2; exit 1; }
  echo "$d"
}

# Run a PostgreSQL binary as the cluster owner.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

url() {
  local port password
  port=$(cat "$dir/port")
  password=$(cat "$dir/password")
  echo "postgresql+asyncpg://postgres:${password}@127.0.0.1:${port}/prefect"
}

start() {
  local port=$1 bin data
  ensure_installed
  bin=$(bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  data="$dir/data"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || { echo "postgres.sh: no postgres user (is the postgresql package installed?)" >&2; exit 1; }
    chown postgres: "$dir"
    if ! runuser -u postgres -- test -x "$dir"; then
      echo "postgres.sh: the postgres user cannot reach $dir (a parent directory is private); use another directory" >&2
      exit 1
    fi
  fi
  if [ ! -s "$dir/password" ]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/password")
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir/password"
  fi
  echo "$port" > "$dir/port"
  if [ ! -s "$data/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$data" -U postgres --pwfile="$dir/password" --auth-local=scram-sha-256 \
      --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # Loopback TCP only: no socket in /var/run/postgresql (it may not exist and is shared).
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='' -c max_connections=200" >/dev/null \
      || { tail -n 30 "$dir/postgres.log" >&2; exit 1; }
  fi
  export PGPASSWORD
  PGPASSWORD=$(cat "$dir/password")
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres prefect
  fi
  url
}

stop() {
  local bin
  bin=$(bindir)
  [ -d "$dir/data" ] || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
}

case "$action" in
  start) [ $# -eq 3 ] || usage; start "$3" ;;
  stop) stop ;;
  url) url ;;
  *) usage ;;
esac
