#!/usr/bin/env bash
# Prints the libpq settings (without dbname) of a PostgreSQL server the tests may use.
# Uses the one on 127.0.0.1:5432 when it answers; otherwise installs PostgreSQL if needed and
# starts a throwaway cluster on 127.0.0.1:5433 in a temp dir (trust auth, database `test`).
set -euo pipefail
log() { echo "$*" >&2; }

answers() { psql "$1 dbname=postgres" -Atqc 'select 1' >/dev/null 2>&1; }
ensure_test_db() {
  psql "$1 dbname=postgres" -Atqc "select 1 from pg_database where datname='test'" | grep -q 1 ||
    psql "$1 dbname=postgres" -qc 'create database test' >&2
}

main="host=127.0.0.1 port=5432 user=postgres"
if command -v psql >/dev/null && answers "$main"; then
  ensure_test_db "$main"
  echo "$main"
  exit 0
fi

log "no PostgreSQL answers on 127.0.0.1:5432; starting a throwaway cluster on port 5433"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d /tmp/kp-pg.XXXXXX)
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >&2
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-p 5433 -k $dir -c listen_addresses=127.0.0.1 -c fsync=on" start >&2
alt="host=127.0.0.1 port=5433 user=postgres"
ensure_test_db "$alt"
echo "$alt"
