#!/usr/bin/env bash
# The cluster's MLflow: a tracking server on the head with a PostgreSQL backend store (safe for
# concurrent sweep trials, unlike SQLite on shared storage) and its artifacts on shared storage.
#
#   cluster/mlflow_server.sh start | stop | status
#
# Environment (all optional):
#   RCL_DIST_MLFLOW_DIR        state folder: pid files, logs, the env file (default $RCL_DIST_HOME/mlflow_server)
#   RCL_DIST_MLFLOW_DB         backend store URI of an existing database (e.g. a managed PostgreSQL:
#                              postgresql+psycopg2://user:pass@host/db); unset: a PostgreSQL cluster of
#                              this script's own in $RCL_DIST_MLFLOW_DIR/pgdata, reached only through a
#                              Unix socket in a folder that only its owner can enter
#   RCL_DIST_MLFLOW_PGDATA     that cluster's data folder (default $RCL_DIST_MLFLOW_DIR/pgdata)
#   RCL_DIST_MLFLOW_SOCKET_DIR that socket's folder, on a local disk (default /tmp/rcl-dist-mlflow-UID;
#                              a socket path has at most 107 characters, and sockets do not work on NFS)
#   RCL_DIST_MLFLOW_ARTIFACTS  artifact root served by the server (default $RCL_DIST_HOME/mlartifacts-server)
#   RCL_DIST_MLFLOW_HOST       address the server binds (default 127.0.0.1)
#   RCL_DIST_MLFLOW_ADVERTISE  address clients use in the URI (default: the bound address; set it when
#                              binding 0.0.0.0 on a multi-node cluster: the head's private address)
#   RCL_DIST_MLFLOW_PORT       its port (default 5000)
#   RCL_DIST_MLFLOW_WORKERS    server worker processes (default 2)
#
# `start` writes $RCL_DIST_MLFLOW_DIR/mlflow.env (`export MLFLOW_TRACKING_URI=http://HOST:PORT`); the
# cluster configs source it from ~/.bashrc, so the `ray submit` driver logs there, and rcl_dist hands
# the driver's URI to its Ray workers. Run as root (a test), the database runs as the `postgres` user.
set -euo pipefail

home="${RCL_DIST_HOME:-$HOME/.rcl_dist}"
home="${home/#\~/$HOME}"
dir="${RCL_DIST_MLFLOW_DIR:-$home/mlflow_server}"
sock="${RCL_DIST_MLFLOW_SOCKET_DIR:-/tmp/rcl-dist-mlflow-$(id -u)}"
artifacts="${RCL_DIST_MLFLOW_ARTIFACTS:-$home/mlartifacts-server}"
host="${RCL_DIST_MLFLOW_HOST:-127.0.0.1}"
port="${RCL_DIST_MLFLOW_PORT:-5000}"
workers="${RCL_DIST_MLFLOW_WORKERS:-2}"
pgdata="${RCL_DIST_MLFLOW_PGDATA:-$dir/pgdata}"
uri="http://${RCL_DIST_MLFLOW_ADVERTISE:-$host}:$port"

die() { echo "cluster/mlflow_server.sh: $*" >&2; exit 1; }

pg_bin() {  # the newest installed PostgreSQL's programs (Debian keeps them off PATH), else PATH's
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/$1" ]; then echo "$d/$1"; return; fi
    command -v "$1" || die "PostgreSQL's $1 was not found: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set RCL_DIST_MLFLOW_DB to an existing database"
}

as_db_user() {  # PostgreSQL refuses to run as root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    mkdir -p "$dir" "$sock"
    chmod 700 "$sock"
    if [ "$(id -u)" = 0 ]; then chown postgres "$sock"; fi
    if [ ! -s "$pgdata/PG_VERSION" ]; then
        mkdir -p "$pgdata"
        if [ "$(id -u)" = 0 ]; then chown postgres "$pgdata"; fi
        as_db_user test -w "$pgdata" -a -w "$sock" \
            || die "the database user $(as_db_user id -un) cannot write $pgdata or $sock (a parent folder closed to it?)"
        # trust is safe here: no TCP listener, and the socket's folder admits its owner only
        as_db_user "$(pg_bin initdb)" -D "$pgdata" -U mlflow -A trust -E UTF8 >"$dir/initdb.log" 2>&1 \
            || die "initdb failed (see $dir/initdb.log)"
    fi
    if ! as_db_user "$(pg_bin pg_ctl)" -D "$pgdata" status >/dev/null 2>&1; then
        as_db_user "$(pg_bin pg_ctl)" -D "$pgdata" -l "$pgdata/postgres.log" -w -t 60 \
            -o "-c listen_addresses='' -c unix_socket_directories='$sock' -c max_connections=200" start >/dev/null \
            || die "PostgreSQL did not start (see $pgdata/postgres.log)"
    fi
    if ! as_db_user "$(pg_bin psql)" -h "$sock" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1; then
        as_db_user "$(pg_bin createdb)" -h "$sock" -U mlflow mlflow
    fi
}

server_pid() { [ -s "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null && cat "$dir/mlflow.pid"; }

start() {
    mkdir -p "$dir" "$artifacts"
    if server_pid >/dev/null; then echo "mlflow server already running at $uri (pid $(server_pid))"; return; fi
    local store="${RCL_DIST_MLFLOW_DB:-}"
    if [ -z "$store" ]; then
        start_postgres
        store="postgresql+psycopg2://mlflow@/mlflow?host=$sock"
    fi
    command -v mlflow >/dev/null || die "mlflow is not on PATH: install this package (pip install -e '.[cluster]')"
    python3 -c "import psycopg2" 2>/dev/null || "$(dirname "$(command -v mlflow)")/python" -c "import psycopg2" \
        || die "psycopg2 is missing beside mlflow: pip install -e '.[cluster]'"
    # setsid: the server outlives this shell (ray up's SSH session); its own process group for stop
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup mlflow server \
        --backend-store-uri "$store" --artifacts-destination "$artifacts" \
        --host "$host" --port "$port" --workers "$workers" >"$dir/mlflow.log" 2>&1 </dev/null &
    echo $! >"$dir/mlflow.pid"
    for _ in $(seq 1 120); do
        if python3 - "$uri/health" <<'EOF' 2>/dev/null
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
EOF
        then
            echo "export MLFLOW_TRACKING_URI=$uri" >"$dir/mlflow.env"
            echo "mlflow server at $uri (backend ${store%%\?*}, artifacts $artifacts; log $dir/mlflow.log)"
            return
        fi
        kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || die "mlflow server exited (see $dir/mlflow.log): $(tail -n 5 "$dir/mlflow.log")"
        sleep 1
    done
    die "mlflow server did not answer $uri/health within 120 s (see $dir/mlflow.log)"
}

stop() {
    local pid
    if pid="$(server_pid)"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$dir/mlflow.pid" "$dir/mlflow.env"
    if [ -s "$pgdata/PG_VERSION" ] && as_db_user "$(pg_bin pg_ctl)" -D "$pgdata" status >/dev/null 2>&1; then
        as_db_user "$(pg_bin pg_ctl)" -D "$pgdata" -m fast -w stop >/dev/null
    fi
    echo "mlflow server stopped"
}

status() {
    if server_pid >/dev/null; then echo "mlflow server running at $uri (pid $(server_pid))"; else echo "mlflow server not running"; return 3; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: cluster/mlflow_server.sh start|stop|status" ;;
esac
