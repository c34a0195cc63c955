#!/usr/bin/env bash
# Prepare a PostgreSQL server for pgdr. Run it on the database host as a user
# that can run psql as a superuser (e.g. sudo -u postgres).
#
#   include/setup-server.sh --dry-run                     # print what it would do
#   include/setup-server.sh --role pgdr --allow 10.0.0.5/32
#   include/setup-server.sh --push --cluster app --config /etc/pgdr/pgdr.yaml   # archive_command mode
#
# Streaming mode (the default) needs: wal_level=replica, max_wal_senders and
# max_replication_slots with room for pgdr, a role with REPLICATION, and a
# pg_hba.conf line letting the Airflow worker connect for replication.
# max_slot_wal_keep_size caps the WAL a stalled slot may hold (a full disk stops
# the database; an invalidated slot only costs a new backup). Push mode adds
# archive_mode, archive_command (pgdr wal-push) and archive_timeout.
# It never lowers a setting: wal_level = logical stays, sender and slot counts
# only go up, and no cap is put on WAL that existing slots already rely on.
set -euo pipefail

DRY_RUN=0 ROLE=pgdr ALLOW=127.0.0.1/32 PUSH=0 CLUSTER= CONFIG= PGDR=pgdr
SLOT_KEEP=20GB ARCHIVE_TIMEOUT=60 PSQL=${PSQL:-psql}
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --role) ROLE=$2; shift ;;
    --allow) ALLOW=$2; shift ;;
    --push) PUSH=1 ;;
    --cluster) CLUSTER=$2; shift ;;
    --config) CONFIG=$2; shift ;;
    --pgdr) PGDR=$2; shift ;;
    --max-slot-wal-keep-size) SLOT_KEEP=$2; shift ;;
    --archive-timeout) ARCHIVE_TIMEOUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$ROLE" =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "--role must be a plain lowercase identifier" >&2; exit 2; }
[[ "$ALLOW" =~ ^[0-9a-fA-F.:]+/[0-9]+$ ]] || { echo "--allow must be an address/prefix like 10.0.0.5/32" >&2; exit 2; }
[[ "$SLOT_KEEP" =~ ^[0-9]+(kB|MB|GB|TB)?$ ]] || { echo "--max-slot-wal-keep-size must be a size like 20GB" >&2; exit 2; }
if [ "$PUSH" = 1 ] && [ -z "$CLUSTER" ]; then echo "--push needs --cluster" >&2; exit 2; fi

# Each setting only goes up: psql's \gexec runs the ALTER SYSTEM a query returns, when it returns one.
SQL=$(cat <<SQL
SELECT \$\$ALTER SYSTEM SET wal_level = 'replica'\$\$ WHERE current_setting('wal_level') = 'minimal' \gexec
SELECT 'ALTER SYSTEM SET max_wal_senders = 10' WHERE current_setting('max_wal_senders')::int < 10 \gexec
SELECT 'ALTER SYSTEM SET max_replication_slots = 10' WHERE current_setting('max_replication_slots')::int < 10 \gexec
SELECT \$\$ALTER SYSTEM SET max_slot_wal_keep_size = '$SLOT_KEEP'\$\$ WHERE CASE current_setting('max_slot_wal_keep_size')
  WHEN '-1' THEN NOT EXISTS (SELECT FROM pg_replication_slots)
  ELSE pg_size_bytes(current_setting('max_slot_wal_keep_size')) < pg_size_bytes('$SLOT_KEEP') END \gexec
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
    CREATE ROLE $ROLE WITH LOGIN REPLICATION;
  ELSE
    ALTER ROLE $ROLE WITH LOGIN REPLICATION;
  END IF;
END \$\$;
GRANT pg_read_all_settings TO $ROLE;
SQL
)
if [ "$PUSH" = 1 ]; then
  CMD="$PGDR${CONFIG:+ --config $CONFIG} -q wal-push --cluster $CLUSTER %p"
  SQL+=$'\n'"ALTER SYSTEM SET archive_mode = 'on';"
  SQL+=$'\n'"ALTER SYSTEM SET archive_command = '${CMD//\'/\'\'}';"
  SQL+=$'\n'"ALTER SYSTEM SET archive_timeout = '$ARCHIVE_TIMEOUT';"
fi
HBA="host replication $ROLE $ALLOW scram-sha-256
host all $ROLE $ALLOW scram-sha-256"

if [ "$DRY_RUN" = 1 ]; then
  echo "-- would run as a superuser:"
  echo "$SQL"
  echo
  echo "# would append to pg_hba.conf (then reload):"
  echo "$HBA"
  echo
  echo "# then: restart PostgreSQL if wal_level, max_wal_senders, max_replication_slots or archive_mode changed,"
  echo "# and set the role's password: ALTER ROLE $ROLE PASSWORD '…' (kept out of this script and of pgdr's config)."
  exit 0
fi

"$PSQL" -v ON_ERROR_STOP=1 -X -q <<<"$SQL"
HBA_FILE=$("$PSQL" -X -A -t -c "show hba_file")
if ! grep -qF "host replication $ROLE $ALLOW" "$HBA_FILE"; then
  printf '%s\n' "# added by pgdr setup-server.sh" "$HBA" >> "$HBA_FILE"
fi
"$PSQL" -X -q -c "select pg_reload_conf()" >/dev/null
echo "done. Restart PostgreSQL if wal_level, max_wal_senders, max_replication_slots or archive_mode changed;"
echo "set the password with: ALTER ROLE $ROLE PASSWORD '…'"
