#!/usr/bin/env bash
# Start the machine's PostgreSQL (installing it where missing) and make the role the tests use.
# Needs root. Prints the URL to put in BROKER_TEST_POSTGRES_URL.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -n | tail -n 1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  su postgres -c "pg_isready -q -h 127.0.0.1 -p 5432" && break
  sleep 1
done
su postgres -c "psql -q -v ON_ERROR_STOP=1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'broker_test') THEN
    CREATE ROLE broker_test LOGIN CREATEDB PASSWORD 'broker_test';
  END IF;
END $$;
SQL
echo "postgresql://broker_test:broker_test@127.0.0.1:5432/postgres"
