#!/usr/bin/env bash
# Bring up a local PostgreSQL for slate's store tests on Debian/Ubuntu (run as root):
# installs Debian's `postgresql` if missing, starts the cluster without systemd, creates
# the role `slate` (password `slate`, CREATEDB so each test can make its own database)
# and the database `slate_test`, then prints the URL. Safe to run again.
#
#   SLATE_PG_USER / SLATE_PG_PASSWORD / SLATE_PG_DB   override the names
#
# The tests read SLATE_TEST_PG_URL and default to postgres://slate:slate@127.0.0.1:5432/postgres.
set -euo pipefail

user=${SLATE_PG_USER:-slate}
password=${SLATE_PG_PASSWORD:-slate}
db=${SLATE_PG_DB:-slate_test}

if ! dpkg -s postgresql >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The newest installed server version; Debian 12 ships 15.
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if [ -z "$version" ]; then
  echo "postgres.sh: no server under /usr/lib/postgresql after installing postgresql" >&2
  exit 1
fi
# The package creates `main`, but an image may have had it removed.
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
status=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}')
if [ "$status" != "online" ]; then
  # No systemd as PID 1 in containers: pg_ctlcluster starts the server directly.
  pg_ctlcluster "$version" main start
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')

for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.2
done
pg_isready -q -h 127.0.0.1 -p "$port" || {
  echo "postgres.sh: server on port $port not ready; see /var/log/postgresql/" >&2
  exit 1
}

as_postgres() {
  runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qAt "$@"
}

# Role: created once, password and CREATEDB re-applied every run so a changed setting
# converges. format(%L) quotes the password as an SQL literal.
as_postgres -v u="$user" -v p="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'u')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'u', :'p') \gexec
SQL
if [ "$(as_postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
  runuser -u postgres -- createdb -p "$port" -O "$user" "$db"
fi

echo "postgres://$user:$password@127.0.0.1:$port/$db"
