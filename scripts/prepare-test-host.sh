#!/usr/bin/env bash
# Make sure the machine has what the tests start for real: PostgreSQL 15 from
# Debian's packages (the tests start their own clusters; the system one is
# never touched), a 'postgres' system user for initdb/postgres, which refuse
# to run as root, and a checkout that user can reach: the servers run pgdr
# itself as archive_command and restore_command.
set -euo pipefail
if [ ! -x /usr/lib/postgresql/15/bin/postgres ] || [ ! -x /usr/lib/postgresql/15/bin/pg_basebackup ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL 15 is missing: run 'sudo apt-get install postgresql-15'" >&2
    exit 1
  fi
  echo "installing PostgreSQL 15 from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Install the server binaries without creating or starting a system cluster.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/pgdr-no-main.conf
  apt-get install -y -qq postgresql-15 >/dev/null
fi
if ! id postgres >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
  else
    echo "no 'postgres' system user; tests run servers as the current user" >&2
  fi
fi
if [ "$(id -u)" = 0 ]; then
  d=$(pwd -P)
  while [ "$d" != / ]; do
    # The "others may search" bit, read from the octal mode: /tmp's "rwt" (sticky + x) already has it.
    (( 8#$(stat -c %a "$d") & 1 )) || { echo "letting other users traverse $d" >&2; chmod o+x "$d"; }
    d=$(dirname "$d")
  done
fi
# The Disaster recovery page's test drives a real headless Chromium (tests/test_ui_page.py).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "chromium is missing: run 'sudo apt-get install chromium chromium-driver'" >&2
    exit 1
  fi
fi
