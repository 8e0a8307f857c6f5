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
  run [--run-config "k=v ..."] [--supernodes N] [--cpus-per-client C]
                      federated run in simulation (default command; default job: FedAvg,
                      ResNet10 width 0.25, synthetic data, 10 simulated clients, 5 rounds)
  test [pytest args]  run the test suite (all tests, including end-to-end runs)
  test-fast           unit tests only (-m "not slow")
  deploy-local [--nodes N] [--run-config "k=v ..."]
                      one federated run over the network on localhost: a SuperLink and
                      N SuperNodes (default 2), started and stopped by this script
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
# recent are kept for their logs.
new_session() {
  FLWR_HOME="$FLWR_BASE/runs/$(date +%Y%m%d-%H%M%S)-$$"
  export FLWR_HOME
  mkdir -p "$FLWR_HOME"
  local old
  old="$(ls -1d "$FLWR_BASE"/runs/*/ 2>/dev/null | sort | head -n -10 || true)"
  [[ -n "$old" ]] && echo "$old" | xargs rm -rf
  ln -sfn "$FLWR_HOME" "$FLWR_BASE/last"
}

cleanup() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # whatever is left in the process group (simulation, superexec, Ray) goes too
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg LOGFILE CMD...: start CMD in its own session (process group = its PID), remember the PID
start_bg() {
  local logfile="$1"
  shift
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  STARTED_PIDS+=("$!")
  LAST_PID=$!
}

wait_health() {
  local port="$1" pid="$2" logfile="$3"
  for _ in $(seq 1 150); do
    if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
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
  local logfile="$FLWR_HOME/run.log" rid status
  local args=(run "$ROOT" "$conn" --stream "$@")
  [[ -n "$overrides" ]] && args+=(--run-config "$overrides")
  set +e
  flwr "${args[@]}" 2>&1 | tee "$logfile" | grep --line-buffered -v -E '^\s*$' | grep --line-buffered -v -E 'WARNING .*(deprecat|Deprecat)'
  set -e
  rid="$(grep -oE 'run [0-9]+' "$logfile" | head -1 | grep -oE '[0-9]+' || true)"
  [[ -n "$rid" ]] || die "flwr run did not start a run (see $logfile)"
  status="$(flwr list "$conn" --run-id "$rid" --format json 2>/dev/null | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["runs"][0]["status"])' || echo unknown)"
  if [[ "$status" != "finished:completed" ]]; then
    die "run $rid ended with status '$status' (log: $logfile)"
  fi
  log "run $rid completed"
}

preflight() {
  # prints the validated, normalised overrides; exits 2 with a clear message on bad config
  local args=(-m common.preflight --project "$ROOT" --output-dir "$OUTPUTS")
  local rc
  for rc in "$@"; do args+=(--run-config "$rc"); done
  "$PY" "${args[@]}"
}

cmd_run() {
  local supernodes=10 cpus=1 rcs=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --run-config) rcs+=("$2"); shift 2 ;;
      --supernodes) supernodes="$2"; shift 2 ;;
      --cpus-per-client) cpus="$2"; shift 2 ;;
      *) die "run: unknown option '$1' (valid: --run-config, --supernodes, --cpus-per-client)" ;;
    esac
  done
  [[ "$supernodes" =~ ^[1-9][0-9]*$ ]] || die "--supernodes must be a positive integer, got '$supernodes'"
  [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-client must be a positive integer, got '$cpus'"
  local overrides
  overrides="$(preflight "${rcs[@]+"${rcs[@]}"}")" || exit 2
  local port
  port="$(free_port)"
  mkdir -p "$OUTPUTS"
  new_session
  export PROGFL_OUTPUT_DIR="$OUTPUTS"
  start_bg "$FLWR_HOME/superlink.log" flower-superlink --insecure --simulation --host 127.0.0.1 --port "$port"
  local sl=$LAST_PID
  wait_health "$port" "$sl" "$FLWR_HOME/superlink.log"
  write_connection sim "$port"
  flwr_run sim "$overrides" --federation-config "num-supernodes=$supernodes client-resources-num-cpus=$cpus"
}

cmd_deploy_local() {
  local nodes=2 rcs=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --run-config) rcs+=("$2"); shift 2 ;;
      --nodes) nodes="$2"; shift 2 ;;
      *) die "deploy-local: unknown option '$1' (valid: --run-config, --nodes)" ;;
    esac
  done
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
  local overrides
  overrides="$(preflight "${rcs[@]+"${rcs[@]}"}")" || exit 2
  mkdir -p "$OUTPUTS"
  new_session
  export PROGFL_OUTPUT_DIR="$OUTPUTS"
  local port
  port="$(free_port)"
  start_bg "$FLWR_HOME/superlink.log" flower-superlink --insecure --host 127.0.0.1 --port "$port"
  wait_health "$port" "$LAST_PID" "$FLWR_HOME/superlink.log"
  local i
  for ((i = 0; i < nodes; i++)); do
    start_bg "$FLWR_HOME/supernode-$i.log" flower-supernode --insecure --superlink "127.0.0.1:$port" \
      --node-config "partition-id=$i num-partitions=$nodes" --host 127.0.0.1 --port "$(free_port)"
  done
  write_connection deploy "$port"
  flwr_run deploy "$overrides"
}

main() {
  local cmd="${1:-run}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    help | -h | --help) usage ;;
    setup) setup ;;
    run) setup; cmd_run "$@" ;;
    deploy-local) setup; cmd_deploy_local "$@" ;;
    bench)
      setup
      [[ $# -gt 0 ]] || die "bench: name a benchmark: $(cd "$ROOT/bench" && ls -- *.py | grep -v __init__ | sed 's/\.py$//' | tr '\n' ' ')"
      local name="$1"
      shift
      [[ -f "$ROOT/bench/$name.py" ]] || die "bench: unknown benchmark '$name'; valid: $(cd "$ROOT/bench" && ls -- *.py | grep -v __init__ | sed 's/\.py$//' | tr '\n' ' ')"
      cd "$ROOT"
      "$PY" -m "bench.$name" "$@"
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
