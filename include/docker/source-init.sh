#!/usr/bin/env bash
# Runs once, inside the source-db container, when its data directory is new:
# a replication role for pgdr, a pg_hba.conf line for it, and sample data.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
create role pgdr with login replication password '${PGDR_PASSWORD}';
grant pg_read_all_settings to pgdr;
create database shop;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname shop <<'SQL'
create table orders (id int primary key, customer text, total numeric(10,2));
insert into orders select g, 'customer ' || (g % 997), (g % 500) * 1.1 from generate_series(1, 100000) g;
SQL
echo "host replication pgdr all scram-sha-256" >> "$PGDATA/pg_hba.conf"
echo "host all pgdr all scram-sha-256" >> "$PGDATA/pg_hba.conf"
