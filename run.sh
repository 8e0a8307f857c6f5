#!/usr/bin/env bash
# progfl entry point. `./run.sh help` lists the sub-commands.
#
# Every sub-command sets up .venv first if needed (idempotent: a stamp of pyproject.toml skips
# pip when nothing changed), keeps Flower's state in ./.flwr, and stops every process it started
# (SuperLink, SuperNodes, and through them the simulation and Ray) before it returns.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
export FLWR_HOME="$ROOT/.flwr"
FLWR_BASE="$FLWR_HOME"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Flower's SuperExec looks for apps to launch every 1 s by default; 0.1 s costs a local request each time
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
export RAY_DEDUP_LOGS=0
export RAY_USAGE_STATS_ENABLED=0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export PYTHONUNBUFFERED=1
export PATH="$VENV/bin:$PATH"
OUTPUTS="${PROGFL_OUTPUT_DIR:-$ROOT/outputs}"

STARTED_PIDS=()

log() { printf '[run.sh] %s\n' "$*" >&2; }
die() { printf '[run.sh] error: %s\n' "$*" >&2; exit 2; }

usage() {
  cat <<'EOF'
Usage: ./run.sh [command] [options]

Commands:
  run [--run-config "k=v ..."] [--overwrite] [--supernodes N] [--cpus-per-client C] [--ray-address HOST:PORT]
                      federated run in simulation (default command; default job: FedAvg,
                      ResNet10 width 0.25, synthetic data, 10 simulated clients, 5 rounds);
                      --ray-address (or env RAY_ADDRESS) runs the clients on an existing Ray
                      cluster (ray start --head ...) instead of a private local one
  resume DIR [--supernodes N] [--cpus-per-client C] [--run-config "k=v ..."]
                      continue the simulation run in DIR (outputs/<run-name>) after its last
                      completed round, with the config saved in DIR/checkpoint.npz; --supernodes
                      defaults to the run's node count; --run-config may change only verbose,
                      node-wait-seconds, round-timeout
  test [pytest args]  run the test suite (all tests, including end-to-end runs)
  test-fast           unit tests only (-m "not slow")
  deploy-local [--nodes N] [--run-config "k=v ..."] [--overwrite] [--memory-mb MB[,MB...]] [--no-worker]
               [--no-launcher]
                      one federated run over the network on localhost: a SuperLink and
                      N SuperNodes (default 2), each with its warm worker, started and
                      stopped by this script; --memory-mb: each node's budget, enforced by
                      the OS on its worker where the machine allows (one value, or one per node);
                      --no-worker / --no-launcher: Flower's plain per-message processes (to compare)
  deploy superlink [--host H] [--port P] [--certs DIR | --insecure] [--auth-keys KEY.pub|DIR ...]
                   [--database F]
                      the SuperLink in the foreground (default 0.0.0.0:9091, TLS with DIR/ca.crt,
                      server.crt, server.key, DIR default ./certs); --auth-keys turns on SuperNode
                      authentication and registers the keys (make all with scripts/make_certs.sh)
  deploy supernode --superlink HOST:PORT --partition-id I --num-partitions N [--memory-mb MB]
                   [--data-path F] [--certs DIR | --root-cert F | --insecure] [--auth-key F]
                   [--node-config "k=v ..."] [--host H] [--port P] [--no-worker] [--no-launcher]
                      a SuperNode in the foreground (one per device) with its warm worker
                      (client_app/worker.py: torch, data and models stay loaded between
                      messages); --memory-mb: the budget, and the OS memory limit of the
                      worker where cgroups allow (default: the memory available at start-up,
                      not enforced); --data-path: this device's copy of the .npz
  deploy register --superlink HOST:PORT [--certs DIR | --root-cert F] KEY.pub ...
                      register more SuperNode public keys at a running SuperLink
  deploy run --superlink HOST:PORT [--certs DIR | --root-cert F | --insecure] [--run-config "k=v ..."]
                      submit a run to that SuperLink and stream it (device-profile='measured'
                      unless the run config says otherwise)
  bench NAME [args]   run benchmark bench/NAME.py (e.g. memory); prints a table, saves JSON
  report DIR [DIR ...] [--out PATH]
                      run report: one run folder -> DIR/report.html (static, self-contained);
                      several -> a comparison page (default outputs/comparison-report.html)
  setup               create/refresh .venv only
  lint                ruff check + format check
  help                this text

Config keys and defaults: [tool.flwr.app.config] in pyproject.toml. Overrides go straight to
Flower's --run-config (validated first), e.g.
  ./run.sh run --run-config "strategy='fedavg' num-rounds=5"
  ./run.sh run --run-config "dataset='npz' data-path='../shared/data/cifar10_small.npz'" --supernodes 20
Results: outputs/<run-name>/ (metrics.json, metrics.csv, config.json, model.pt, accuracy.png,
report.html).
EOF
}

setup() {
  local stamp="$VENV/.progfl-stamp" want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  log "installing dependencies (first time: several minutes; torch is large)"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" >"$stamp"
}

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# new_session: a private FLWR_HOME per run.sh invocation (.flwr/runs/<time>-<pid>), so that
# concurrent invocations never share a connection file, a SuperLink or app installs; the 10 most
# recent, and every one whose run.sh is still running, are kept for their logs.
new_session() {
  FLWR_HOME="$FLWR_BASE/runs/$(date +%Y%m%d-%H%M%S)-$$"
  export FLWR_HOME
  mkdir -p "$FLWR_HOME"
  local old dir owner
  old="$(ls -1d "$FLWR_BASE"/runs/*/ 2>/dev/null | sort | head -n -10 || true)"
  for dir in $old; do
    owner="${dir%/}"
    owner="${owner##*-}"
    # a folder whose run.sh is still running stays (its SuperLink and logs are in use)
    if [[ "$owner" =~ ^[0-9]+$ ]] && kill -0 "$owner" 2>/dev/null; then
      continue
    fi
    rm -rf "$dir"
  done
  ln -sfn "$FLWR_HOME" "$FLWR_BASE/last"
}

# descendants PID: every live process below PID (children first, recursively), one per line. Flower's
# SuperExec and Ray start their own sessions and process groups, so killing a process group misses
# them; the parent links do not.
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    descendants "$child"
    echo "$child"
  done
}

# stop_tree GRACE: SIGTERM every process below this script (and below what it started), wait up to
# GRACE seconds, then SIGKILL what is left (Ray's DashboardAgent and RuntimeEnvAgent ignore SIGTERM)
stop_tree() {
  local grace="${1:-5}" pids=() pid
  # shellcheck disable=SC2207
  pids=($(descendants $$))
  for pid in "${STARTED_PIDS[@]+"${STARTED_PIDS[@]}"}"; do
    # shellcheck disable=SC2207
    pids+=($(descendants "$pid") "$pid")
  done
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 $((grace * 5))); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && { alive=1; break; }; done
    [[ "$alive" -eq 0 ]] && break
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  STARTED_PIDS=()
}

cleanup() {
  stop_tree 10
}

# on_interrupt: Ctrl-C, SIGINT or SIGTERM. Stop the run (every process below this script; Flower's
# `flwr stop` where the SuperLink is not ours), mark the run folder interrupted and print one line:
# how to resume. A second interrupt while stopping kills everything at once.
INTERRUPTED=0
RUN_ID=""
RUN_CONN=""
on_interrupt() {
  if [[ "$INTERRUPTED" -eq 1 ]]; then
    stop_tree 0
    exit 130
  fi
  INTERRUPTED=1
  if [[ -n "$RUN_ID" && ${#STARTED_PIDS[@]} -eq 0 ]]; then
    # a SuperLink this script did not start (deploy run): ask it to stop the run
    timeout 3 flwr stop "$RUN_ID" "$RUN_CONN" >/dev/null 2>&1 || true
  fi
  stop_tree 3
  local folder
  folder="$(run_folder_of_session)"
  if [[ -n "$folder" && -d "$folder" ]]; then
    "$PY" -m common.runfolder interrupted "$folder" >&2 || true
  fi
  exit 130
}
trap cleanup EXIT
trap on_interrupt INT TERM

# run_folder_of_session: the run folder the ServerApp of this invocation reported ("run folder: ...")
run_folder_of_session() {
  local f
  for f in "${PROGFL_PROGRESS_FILE:-}" "$FLWR_HOME/run.log"; do
    [[ -n "$f" && -f "$f" ]] || continue
    grep -m1 -oE '\[progfl\] run folder: .*' "$f" 2>/dev/null | sed 's/^\[progfl\] run folder: //' && return 0
  done
  return 0
}

# start_bg LOGFILE CMD...: start CMD in its own session (process group = its PID), remember the PID
start_bg() {
  local logfile="$1"
  shift
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  STARTED_PIDS+=("$!")
  LAST_PID=$!
}

# wait_health PORT PID LOGFILE [CA [HOST]]: wait for the SuperLink's /health (https, verified
# against CA, when CA is given; HOST defaults to 127.0.0.1)
wait_health() {
  local port="$1" pid="$2" logfile="$3" ca="${4:-}" host="${5:-127.0.0.1}" url
  url="$([[ -n "$ca" ]] && echo https || echo http)://$host:$port/health"
  for _ in $(seq 1 150); do
    if "$PY" -c "import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else None
if ctx:
    ctx.check_hostname = False
urllib.request.urlopen(sys.argv[1], timeout=1, context=ctx)" "$url" "$ca" 2>/dev/null; then
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$logfile" >&2; die "process $pid exited before becoming healthy"; }
    sleep 0.2
  done
  cat "$logfile" >&2
  die "SuperLink on port $port not healthy after 30 s"
}

write_connection() {
  local name="$1" port="$2"
  mkdir -p "$FLWR_HOME"
  cat >"$FLWR_HOME/config.toml" <<EOF
# Written by run.sh for this invocation only: the SuperLink it started (gone when run.sh returns).
[superlink]
default = "$name"

[superlink.$name]
address = "127.0.0.1:$port"
insecure = true
EOF
}

# flwr_run CONNECTION OVERRIDES [extra flwr args...]: run the app, stream logs, fail if the run failed
flwr_run() {
  local conn="$1" overrides="$2"
  shift 2
  local logfile="$FLWR_HOME/run.log" rid
  local args=(run "$ROOT" "$conn" --stream "$@")
  [[ -n "$overrides" ]] && args+=(--run-config "$overrides")
  RUN_CONN="$conn"
  set +e
  # in the background and waited for: an interrupt's trap runs at once, not when the stream ends
  flwr "${args[@]}" 2>&1 | tee "$logfile" | grep --line-buffered -v -E '^\s*$' | grep --line-buffered -v -E 'WARNING .*(deprecat|Deprecat)' &
  local stream=$!
  while kill -0 "$stream" 2>/dev/null; do
    [[ -z "$RUN_ID" ]] && RUN_ID="$(grep -oE 'run [0-9]+' "$logfile" 2>/dev/null | head -1 | grep -oE '[0-9]+' || true)"
    sleep 0.5
  done
  wait "$stream"
  set -e
  rid="$(run_id "$logfile")" || exit 2
  finish_run "$conn" "$rid" "$logfile"
}

# run_id LOGFILE: the id of the run that `flwr run` started, from its output (dies without one)
run_id() {
  local rid
  rid="$(grep -oE 'run [0-9]+' "$1" | head -1 | grep -oE '[0-9]+' || true)"
  [[ -n "$rid" ]] || die "flwr run did not start a run (see $1)"
  printf '%s\n' "$rid"
}

# run_status CONNECTION RUN_ID: the run's status as Flower reports it (e.g. finished:completed)
run_status() {
  flwr list "$1" --run-id "$2" --format json 2>/dev/null |
    "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["runs"][0]["status"])' 2>/dev/null || echo unknown
}

# finish_run CONNECTION RUN_ID LOGFILE [SHOW_LOG]: succeed if the run completed, else die with its
# status (SHOW_LOG=1: after printing Flower's full log of the run, which nothing has shown yet)
finish_run() {
  local conn="$1" rid="$2" logfile="$3" show="${4:-0}" status
  status="$(run_status "$conn" "$rid")"
  if [[ "$status" != "finished:completed" ]]; then
    if [[ "$show" -eq 1 ]]; then
      log "Flower's log of run $rid:"
      flwr log "$rid" "$conn" --show >&2 2>&1 || true
    fi
    die "run $rid ended with status '$status' (log: $logfile)"
  fi
  log "run $rid completed"
}

# flwr_follow CONNECTION OVERRIDES PORT SUPERLINK_PID [extra flwr args...]: quiet simulations. Submit
# the run without a log stream and print the ServerApp's copy of its output ($PROGFL_PROGRESS_FILE,
# server_app/progress.py) as it grows, until the run's flwr-simulation process (the one talking to
# the SuperLink on PORT) has exited: no `flwr run --stream` process alive for the whole run (~80 MB,
# ~10 CPU s per 20-round run). Fails, with Flower's full log of the run, if the run did not complete.
flwr_follow() {
  local conn="$1" overrides="$2" port="$3" sl="$4"
  shift 4
  local logfile="$FLWR_HOME/run.log" progress="$PROGFL_PROGRESS_FILE" rid status
  local args=(run "$ROOT" "$conn" "$@")
  [[ -n "$overrides" ]] && args+=(--run-config "$overrides")
  : >"$progress"
  if ! flwr "${args[@]}" >"$logfile" 2>&1; then
    cat "$logfile" >&2
    die "flwr run could not submit the run (log: $logfile)"
  fi
  rid="$(run_id "$logfile")" || { cat "$logfile" >&2; exit 2; }
  RUN_ID="$rid"
  RUN_CONN="$conn"
  # --pid: tail ends with this script even if it is killed before it stops the follower itself
  (tail --pid=$$ -n +1 -s 0.2 -F "$progress" 2>/dev/null | tee -a "$logfile" | grep --line-buffered -v -E '^\s*$') 2>/dev/null &
  local tailer=$!
  local pattern="flwr-simulation --runtime-api-address 127.0.0.1:$port" seen=0 waited=0
  while kill -0 "$sl" 2>/dev/null; do
    if pgrep -f -- "$pattern" >/dev/null; then
      seen=1
    elif [[ "$seen" -eq 1 ]]; then
      break
    elif ((waited > 0 && waited % 30 == 0)); then
      # not started yet: a run that ended (or failed) before its simulation was seen ends the wait
      status="$(run_status "$conn" "$rid")"
      [[ "$status" == finished:* ]] && break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  sleep 1  # the last lines reach the terminal (tail polls every 0.2 s)
  pkill -P "$tailer" 2>/dev/null || true
  wait "$tailer" 2>/dev/null || true
  finish_run "$conn" "$rid" "$logfile" 1
}

# quiet_env OVERRIDES: unless the run config says verbose=true, silence what means nothing to a
# user: Flower's INFO/WARNING chatter (FLWR_LOG_LEVEL), the torch profiler's per-start/stop lines
# (KINETO_LOG_LEVEL) and the Ray workers' own output (RAY_TO_DRIVER=false: federation config
# init-args-log-to-driver; ClientApp errors still reach the ServerApp as error replies and are
# logged). Errors stay. Values already in the environment win.
quiet_env() {
  if [[ " $1 " == *" verbose=true "* ]]; then
    export FLWR_LOG_LEVEL="${FLWR_LOG_LEVEL:-INFO}" KINETO_LOG_LEVEL="${KINETO_LOG_LEVEL:-3}"
    RAY_TO_DRIVER=true
  else
    export FLWR_LOG_LEVEL="${FLWR_LOG_LEVEL:-ERROR}" KINETO_LOG_LEVEL="${KINETO_LOG_LEVEL:-6}"
    RAY_TO_DRIVER=false
  fi
}

PREFLIGHT_ARGS=()
preflight() {
  # prints the validated, normalised overrides; exits 2 with a clear message on bad config, data or
  # partition plan (PREFLIGHT_ARGS: --num-partitions N, --cpus-per-client C for those checks)
  local args=(-m common.preflight --project "$ROOT" --output-dir "$OUTPUTS" "${PREFLIGHT_ARGS[@]+"${PREFLIGHT_ARGS[@]}"}")
  local rc
  for rc in "$@"; do args+=(--run-config "$rc"); done
  [[ "${PROGFL_DEBUG:-}" == 1 ]] && args+=(--debug)
  "$PY" "${args[@]}"
}

cmd_run() {
  local supernodes=10 cpus=1 rcs=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --run-config) rcs+=("$2"); shift 2 ;;
      --overwrite) rcs+=("overwrite=true"); shift ;;
      --supernodes) supernodes="$2"; shift 2 ;;
      --cpus-per-client) cpus="$2"; shift 2 ;;
      --ray-address)
        [[ -n "${2:-}" ]] || die "--ray-address needs the address of a running Ray cluster's head, e.g. 10.0.0.5:6379"
        export RAY_ADDRESS="$2"; shift 2 ;;
      *) die "run: unknown option '$1' (valid: --run-config, --overwrite, --supernodes, --cpus-per-client, --ray-address)" ;;
    esac
  done
  [[ "$supernodes" =~ ^[1-9][0-9]*$ ]] || die "--supernodes must be a positive integer, got '$supernodes'"
  [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-client must be a positive integer, got '$cpus'"
  local overrides
  PREFLIGHT_ARGS=(--num-partitions "$supernodes" --cpus-per-client "$cpus")
  overrides="$(preflight "${rcs[@]+"${rcs[@]}"}")" || exit 2
  quiet_env "$overrides"
  [[ -n "${RAY_ADDRESS:-}" ]] && log "clients run on the Ray cluster at $RAY_ADDRESS"
  local port
  port="$(free_port)"
  mkdir -p "$OUTPUTS"
  new_session
  export PROGFL_OUTPUT_DIR="$OUTPUTS"
  # quiet runs follow the ServerApp's copy of its output instead of a `flwr run --stream` process
  if [[ "$RAY_TO_DRIVER" == false ]]; then
    export PROGFL_PROGRESS_FILE="$FLWR_HOME/progress.log"
  else
    unset PROGFL_PROGRESS_FILE
  fi
  start_bg "$FLWR_HOME/superlink.log" flower-superlink --insecure --simulation --host 127.0.0.1 --port "$port"
  local sl=$LAST_PID
  wait_health "$port" "$sl" "$FLWR_HOME/superlink.log"
  write_connection sim "$port"
  local federation="num-supernodes=$supernodes client-resources-num-cpus=$cpus init-args-log-to-driver=$RAY_TO_DRIVER"
  if [[ -n "${PROGFL_PROGRESS_FILE:-}" ]]; then
    flwr_follow sim "$overrides" "$port" "$sl" --federation-config "$federation"
  else
    flwr_run sim "$overrides" --federation-config "$federation"
  fi
}

cmd_deploy_local() {
  local nodes=2 rcs=() memlist="" worker=1 launcher=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --run-config) rcs+=("$2"); shift 2 ;;
      --overwrite) rcs+=("overwrite=true"); shift ;;
      --nodes) nodes="$2"; shift 2 ;;
      --memory-mb) memlist="$2"; shift 2 ;;
      --no-worker) worker=0; shift ;;
      --no-launcher) launcher=0; shift ;;
      *) die "deploy-local: unknown option '$1' (valid: --run-config, --overwrite, --nodes, --memory-mb, --no-worker, --no-launcher)" ;;
    esac
  done
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
  local mems=() m
  if [[ -n "$memlist" ]]; then
    IFS=',' read -r -a mems <<<"$memlist"
    for m in "${mems[@]}"; do
      [[ "$m" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk "BEGIN{exit !($m > 0)}" ||
        die "--memory-mb: '$m' is not a positive number of MB (give one value or $nodes, comma-separated)"
    done
    [[ ${#mems[@]} -eq 1 || ${#mems[@]} -eq "$nodes" ]] ||
      die "--memory-mb: ${#mems[@]} values for $nodes nodes (give one value or $nodes, comma-separated)"
  fi
  local overrides
  PREFLIGHT_ARGS=(--num-partitions "$nodes")
  overrides="$(preflight "${rcs[@]+"${rcs[@]}"}")" || exit 2
  mkdir -p "$OUTPUTS"
  new_session
  export PROGFL_OUTPUT_DIR="$OUTPUTS"
  local port
  port="$(free_port)"
  start_bg "$FLWR_HOME/superlink.log" flower-superlink --insecure --host 127.0.0.1 --port "$port"
  wait_health "$port" "$LAST_PID" "$FLWR_HOME/superlink.log"
  local i node_config sock mem
  for ((i = 0; i < nodes; i++)); do
    node_config="partition-id=$i num-partitions=$nodes"
    mem=""
    [[ ${#mems[@]} -gt 0 ]] && mem="${mems[$((${#mems[@]} == 1 ? 0 : i))]}"
    [[ -n "$mem" ]] && node_config+=" memory-mb=$mem"
    if [[ "$worker" -eq 1 ]]; then
      sock="$FLWR_HOME/workers/node-$i/worker.sock"
      start_worker "$FLWR_HOME/worker-$i.log" "$sock" "node$i-$$" "$mem"
      node_config+=" worker-socket=\"$sock\""
    fi
    LAUNCH_ENV=()
    [[ "$launcher" -eq 1 ]] && start_launcher "$FLWR_HOME/launchers/node-$i" "$FLWR_HOME/launcher-$i.log"
    start_bg "$FLWR_HOME/supernode-$i.log" env "${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"}" flower-supernode --insecure \
      --superlink "127.0.0.1:$port" --node-config "$node_config" --host 127.0.0.1 --port "$(free_port)"
  done
  write_connection deploy "$port"
  flwr_run deploy "$overrides"
}

# start_worker LOGFILE SOCKET NAME [MEMORY_MB]: a node's warm worker (its supervisor, in the
# background), under an OS memory limit of MEMORY_MB where the machine allows it
start_worker() {
  local logfile="$1" sock="$2" name="$3" mem="${4:-}" args=()
  args=(--socket "$sock" --name "$name" --parent-pid "$$")
  [[ -n "$mem" ]] && args+=(--memory-mb "$mem")
  mkdir -p "$(dirname "$sock")"
  chmod 700 "$(dirname "$sock")"
  start_bg "$logfile" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m client_app.worker "${args[@]}"
  # say at start-up which OS memory limit is in force, or that none could be set
  local line="" _
  for _ in $(seq 1 50); do
    line="$(grep -m1 -oE '(memory limit .* enforced by .*|NO OS memory limit in force.*|no memory limit asked.*)' "$logfile" 2>/dev/null || true)"
    [[ -n "$line" ]] && break
    sleep 0.1
  done
  [[ -n "$line" ]] && log "worker $name: $line"
  return 0
}

# start_launcher DIR LOGFILE: pre-imported flwr-clientapp processes for one SuperNode (client_app/launcher.py):
# writes the flwr-clientapp shim into DIR/shim and sets LAUNCH_ENV, the environment to start the SuperNode with
start_launcher() {
  local dir="$1" logfile="$2" real
  real="$(command -v flwr-clientapp)" || die "flwr-clientapp is not on PATH (run ./run.sh setup)"
  mkdir -p "$dir"
  chmod 700 "$dir"
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m client_app.launcher --write-shim "$dir/shim" >/dev/null ||
    die "could not write the flwr-clientapp shim into $dir/shim"
  start_bg "$logfile" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m client_app.launcher --socket "$dir/launcher.sock" \
    --parent-pid "$$"
  LAUNCH_ENV=(PATH="$dir/shim:$PATH" PROGFL_LAUNCHER_SOCKET="$dir/launcher.sock" PROGFL_REAL_CLIENTAPP="$real")
}

# ---------------------------------------------------------------- deploy (real devices)
# `deploy superlink|supernode|register|run`: foreground processes for a federation over the network.
# TLS is the default; --insecure only when asked. Certificates and SuperNode keys come from
# scripts/make_certs.sh (default folder ./certs).

is_loopback() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }

check_port() {
  [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 && "$2" -le 65535 ]] || die "$1 must be a port number in 1..65535, got '$2'"
}

check_address() {
  [[ "$1" =~ ^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+):([0-9]+)$ ]] || die "--superlink must be HOST:PORT (e.g. 192.168.1.10:9091), got '$1'"
  check_port "--superlink port" "${BASH_REMATCH[2]}"
}

readable_file() {
  [[ -f "$2" && -r "$2" ]] || die "$1 '$2': no such readable file"
}

# root_cert CERTS ROOT_CERT INSECURE: the CA file the client side verifies the SuperLink with
# (empty when insecure); dies when TLS has no CA to use.
root_cert() {
  local certs="$1" ca="$2" insecure="$3"
  if [[ "$insecure" -eq 1 ]]; then
    [[ -z "$certs" && -z "$ca" ]] || die "--insecure and --certs/--root-cert exclude each other"
    return 0
  fi
  [[ -n "$certs" && -n "$ca" ]] && die "give --certs DIR or --root-cert FILE, not both"
  if [[ -z "$ca" ]]; then
    ca="${certs:-$ROOT/certs}/ca.crt"
    [[ -f "$ca" ]] || die "TLS is the default and '$ca' does not exist: copy the CA certificate from the SuperLink machine (--certs DIR or --root-cert FILE), or pass --insecure (trusted test network only)"
  fi
  readable_file "--root-cert" "$ca"
  printf '%s\n' "$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
}

# deploy_connection NAME HOST:PORT CA: a connection in $FLWR_HOME/config.toml (CA empty = insecure)
deploy_connection() {
  local name="$1" address="$2" ca="$3"
  mkdir -p "$FLWR_HOME"
  {
    printf '# Written by run.sh deploy for this invocation.\n[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "%s"\n' \
      "$name" "$name" "$address"
    if [[ -n "$ca" ]]; then printf 'root-certificates = "%s"\n' "$ca"; else printf 'insecure = true\n'; fi
  } >"$FLWR_HOME/config.toml"
}

# register_keys CONNECTION KEY.pub...: register SuperNode public keys at the SuperLink (idempotent)
register_keys() {
  local conn="$1" key out
  shift
  for key in "$@"; do
    if out="$(flwr supernode register "$key" "$conn" 2>&1)"; then
      log "registered SuperNode key $key"
    elif grep -q "already in use" <<<"$out"; then
      log "SuperNode key $key was already registered"
    else
      printf '%s\n' "$out" >&2
      die "could not register SuperNode key '$key'"
    fi
  done
}

# pub_keys ARG...: public key files from files and folders (every *.pub in a folder)
pub_keys() {
  local arg f found
  for arg in "$@"; do
    if [[ -d "$arg" ]]; then
      found=0
      for f in "${arg%/}"/*.pub; do
        [[ -f "$f" ]] || continue
        printf '%s\n' "$f"
        found=1
      done
      [[ "$found" -eq 1 ]] || die "--auth-keys folder '$arg' holds no *.pub file"
    else
      readable_file "--auth-keys" "$arg"
      printf '%s\n' "$arg"
    fi
  done
}

deploy_superlink() {
  local host=0.0.0.0 port=9091 certs="" insecure=0 database="" keys=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --host) host="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --certs) certs="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      --database) database="$2"; shift 2 ;;
      --auth-keys)
        shift
        while [[ $# -gt 0 && "$1" != --* ]]; do keys+=("$1"); shift; done
        [[ ${#keys[@]} -gt 0 ]] || die "--auth-keys needs public key files or a folder of *.pub files"
        ;;
      *) die "deploy superlink: unknown option '$1' (valid: --host, --port, --certs, --insecure, --auth-keys, --database)" ;;
    esac
  done
  check_port "--port" "$port"
  local args=(flower-superlink --host "$host" --port "$port") ca="" scheme=https
  if [[ "$insecure" -eq 1 ]]; then
    [[ -z "$certs" ]] || die "--insecure and --certs exclude each other"
    [[ ${#keys[@]} -eq 0 ]] || die "--auth-keys needs TLS: drop --insecure and give --certs DIR"
    is_loopback "$host" || log "warning: SuperLink on $host without TLS: traffic is not encrypted and any SuperNode may join"
    args+=(--insecure)
    scheme=http
  else
    certs="${certs:-$ROOT/certs}"
    local f
    for f in ca.crt server.crt server.key; do
      [[ -f "$certs/$f" ]] || die "TLS is the default and '$certs/$f' does not exist: run scripts/make_certs.sh --out $certs --host <this machine's name or IP>, or pass --insecure (trusted test network only)"
      readable_file "--certs" "$certs/$f"
    done
    certs="$(cd "$certs" && pwd)"
    ca="$certs/ca.crt"
    args+=(--ssl-ca-certfile "$ca" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key")
  fi
  local pubs=()
  if [[ ${#keys[@]} -gt 0 ]]; then
    local listed
    listed="$(pub_keys "${keys[@]}")" || exit 2
    mapfile -t pubs <<<"$listed"
    args+=(--enable-supernode-auth)
  elif [[ "$insecure" -eq 0 ]]; then
    log "warning: no --auth-keys: SuperNode authentication is off, any SuperNode that trusts the CA may join"
  fi
  [[ -n "$database" ]] && args+=(--database "$database")
  FLWR_HOME="$FLWR_BASE/deploy/superlink-$port"
  export FLWR_HOME
  mkdir -p "$FLWR_HOME"
  log "starting the SuperLink on $host:$port ($([[ -n "$ca" ]] && echo TLS || echo insecure)$([[ ${#pubs[@]} -gt 0 ]] && echo ", SuperNode authentication"))"
  "${args[@]}" &
  local pid=$!
  STARTED_PIDS+=("$pid")
  local local_host="$host"
  [[ "$host" == "0.0.0.0" || "$host" == "::" ]] && local_host=127.0.0.1
  wait_health "$port" "$pid" /dev/null "$ca" "$local_host"
  if [[ ${#pubs[@]} -gt 0 ]]; then
    deploy_connection admin "$local_host:$port" "$ca"
    register_keys admin "${pubs[@]}"
  fi
  log "SuperLink ready: $scheme://$host:$port (stop with Ctrl-C)"
  wait "$pid"
}

deploy_supernode() {
  local superlink="" pid_="" nparts="" memory="" data="" extra="" certs="" ca="" key="" insecure=0
  local host=127.0.0.1 port="" worker=1 launcher=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --superlink) superlink="$2"; shift 2 ;;
      --partition-id) pid_="$2"; shift 2 ;;
      --num-partitions) nparts="$2"; shift 2 ;;
      --memory-mb) memory="$2"; shift 2 ;;
      --data-path) data="$2"; shift 2 ;;
      --node-config) extra="$2"; shift 2 ;;
      --certs) certs="$2"; shift 2 ;;
      --root-cert) ca="$2"; shift 2 ;;
      --auth-key) key="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      --host) host="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --no-worker) worker=0; shift ;;
      --no-launcher) launcher=0; shift ;;
      *) die "deploy supernode: unknown option '$1' (valid: --superlink, --partition-id, --num-partitions, --memory-mb, --data-path, --node-config, --certs, --root-cert, --auth-key, --insecure, --host, --port, --no-worker, --no-launcher)" ;;
    esac
  done
  [[ -n "$superlink" ]] || die "deploy supernode: --superlink HOST:PORT is required"
  check_address "$superlink"
  [[ -n "$pid_" && -n "$nparts" ]] || die "deploy supernode: --partition-id I and --num-partitions N are required (the data partition this device trains on)"
  [[ -z "$port" ]] && port="$(free_port)"
  check_port "--port" "$port"
  local node_args=(--partition-id "$pid_" --num-partitions "$nparts")
  [[ -n "$memory" ]] && node_args+=(--memory-mb "$memory")
  [[ -n "$data" ]] && node_args+=(--data-path "$data")
  [[ -n "$extra" ]] && node_args+=(--node-config "$extra")
  FLWR_HOME="$FLWR_BASE/deploy/supernode-$port"
  export FLWR_HOME
  mkdir -p "$FLWR_HOME"
  local sock="$FLWR_HOME/worker/worker.sock"
  [[ "$worker" -eq 1 ]] && node_args+=(--worker-socket "$sock")
  local node_config
  node_config="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m common.node "${node_args[@]}")" || exit 2
  local args=(flower-supernode --superlink "$superlink" --node-config "$node_config" --host "$host" --port "$port")
  local root
  root="$(root_cert "$certs" "$ca" "$insecure")" || exit 2
  if [[ "$insecure" -eq 1 ]]; then
    [[ -z "$key" ]] || die "--auth-key needs TLS: drop --insecure"
    args+=(--insecure)
  else
    args+=(--root-certificates "$root")
    if [[ -n "$key" ]]; then
      readable_file "--auth-key" "$key"
      args+=(--auth-supernode-private-key "$key")
    fi
  fi
  log "starting a SuperNode for $superlink ($([[ "$insecure" -eq 1 ]] && echo insecure || echo TLS)$([[ -n "$key" ]] && echo ", key $key")): $node_config"
  if [[ "$worker" -eq 1 ]]; then
    start_worker "$FLWR_HOME/worker.log" "$sock" "supernode-$port" "$memory"
    log "warm worker pid $LAST_PID at $sock (log: $FLWR_HOME/worker.log)"
  fi
  LAUNCH_ENV=()
  if [[ "$launcher" -eq 1 ]]; then
    start_launcher "$FLWR_HOME/launcher" "$FLWR_HOME/launcher.log"
    log "flwr-clientapp launcher pid $LAST_PID (log: $FLWR_HOME/launcher.log)"
  fi
  # in the foreground, but as a child: the EXIT trap then stops the worker when the SuperNode ends
  env "${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"}" "${args[@]}" &
  STARTED_PIDS+=("$!")
  local rc=0
  wait "$!" || rc=$?
  exit "$rc"
}

deploy_register() {
  local superlink="" certs="" ca="" keys=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --superlink) superlink="$2"; shift 2 ;;
      --certs) certs="$2"; shift 2 ;;
      --root-cert) ca="$2"; shift 2 ;;
      --*) die "deploy register: unknown option '$1' (valid: --superlink, --certs, --root-cert, then KEY.pub files)" ;;
      *) keys+=("$1"); shift ;;
    esac
  done
  [[ -n "$superlink" ]] || die "deploy register: --superlink HOST:PORT is required"
  check_address "$superlink"
  [[ ${#keys[@]} -gt 0 ]] || die "deploy register: name the SuperNode public keys (*.pub) to register"
  local root pubs=() listed
  root="$(root_cert "$certs" "$ca" 0)" || exit 2
  listed="$(pub_keys "${keys[@]}")" || exit 2
  mapfile -t pubs <<<"$listed"
  new_session
  deploy_connection admin "$superlink" "$root"
  register_keys admin "${pubs[@]}"
}

deploy_run() {
  local superlink="" certs="" ca="" insecure=0 rcs=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --superlink) superlink="$2"; shift 2 ;;
      --certs) certs="$2"; shift 2 ;;
      --root-cert) ca="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      --run-config) rcs+=("$2"); shift 2 ;;
      *) die "deploy run: unknown option '$1' (valid: --superlink, --certs, --root-cert, --insecure, --run-config)" ;;
    esac
  done
  [[ -n "$superlink" ]] || die "deploy run: --superlink HOST:PORT is required"
  check_address "$superlink"
  local root overrides
  root="$(root_cert "$certs" "$ca" "$insecure")" || exit 2
  # real devices report their own budget and speed unless the run config says otherwise
  overrides="$(preflight "device-profile='measured'" "${rcs[@]+"${rcs[@]}"}")" || exit 2
  mkdir -p "$OUTPUTS"
  new_session
  export PROGFL_OUTPUT_DIR="$OUTPUTS"
  deploy_connection deploy "$superlink" "$root"
  flwr_run deploy "$overrides"
}

cmd_deploy() {
  local sub="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$sub" in
    superlink) deploy_superlink "$@" ;;
    supernode) deploy_supernode "$@" ;;
    register) deploy_register "$@" ;;
    run) deploy_run "$@" ;;
    *) die "deploy: name what to start: superlink, supernode, register or run (got '${sub}'); see ./run.sh help" ;;
  esac
}

# resume DIR: the config saved in DIR's checkpoint plus resume=true, run like `run`
cmd_resume() {
  [[ $# -gt 0 && "$1" != --* ]] || die "resume: name a run folder, e.g. ./run.sh resume outputs/<run-name>"
  local dir="$1" supernodes="" cpus=1 rcs=()
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --run-config) rcs+=(--run-config "$2"); shift 2 ;;
      --supernodes) supernodes="$2"; shift 2 ;;
      --cpus-per-client) cpus="$2"; shift 2 ;;
      *) die "resume: unknown option '$1' (valid: --run-config, --supernodes, --cpus-per-client)" ;;
    esac
  done
  [[ -d "$dir" ]] || die "resume: no such run folder '$dir'"
  dir="$(cd "$dir" && pwd)"
  local helper=(env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m server_app.checkpoint)
  local overrides
  overrides="$("${helper[@]}" overrides "$dir" "${rcs[@]+"${rcs[@]}"}")" || exit 2
  [[ -n "$supernodes" ]] || supernodes="$("${helper[@]}" nodes "$dir")" || exit 2
  log "resuming $dir with $supernodes simulated clients"
  cmd_run --supernodes "$supernodes" --cpus-per-client "$cpus" --run-config "$overrides"
}

main() {
  local cmd="${1:-run}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    help | -h | --help) usage ;;
    setup) setup ;;
    run) setup; cmd_run "$@" ;;
    resume) setup; cmd_resume "$@" ;;
    deploy-local) setup; cmd_deploy_local "$@" ;;
    deploy) setup; cmd_deploy "$@" ;;
    bench)
      setup
      [[ $# -gt 0 ]] || die "bench: name a benchmark: $(cd "$ROOT/bench" && ls -- *.py | grep -v __init__ | sed 's/\.py$//' | tr '\n' ' ')"
      local name="$1"
      shift
      [[ -f "$ROOT/bench/$name.py" ]] || die "bench: unknown benchmark '$name'; valid: $(cd "$ROOT/bench" && ls -- *.py | grep -v __init__ | sed 's/\.py$//' | tr '\n' ' ')"
      cd "$ROOT"
      "$PY" -m "bench.$name" "$@" &  # waited for, so that an interrupt's trap runs at once
      wait $!
      ;;
    test) setup; cd "$ROOT"; exec_tests "$@" ;;
    test-fast) setup; cd "$ROOT"; exec_tests -m "not slow" "$@" ;;
    lint) setup; cd "$ROOT"; ruff check . && ruff format --check . ;;
    report)
      setup
      [[ $# -gt 0 ]] || die "report: name one or more run folders, e.g. ./run.sh report outputs/<run-name>"
      PROGFL_OUTPUT_DIR="$OUTPUTS" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m server_app.report "$@"
      ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

exec_tests() {
  "$PY" -m pytest "$@"
}

main "$@"
