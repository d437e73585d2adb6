#!/usr/bin/env bash
# Two Ray nodes on one machine, loopback only: a rehearsal of a multi-node cluster.
#
#   cluster/local_multinode.sh start            # head + one worker node, 1 CPU and 1 "trainslot" each
#   eval "$(cluster/local_multinode.sh env)"    # RAY_ADDRESS and RAY_AUTH_MODE for this shell
#   knet run experiments/quickstart.yaml --set 'scaling.resources_per_worker={CPU: 1, trainslot: 1}'
#   cluster/local_multinode.sh submit experiments/quickstart.yaml   # the same, as a Ray job
#   cluster/local_multinode.sh add-node         # one more worker node (e.g. for one that was lost)
#   cluster/local_multinode.sh stop             # stops these nodes, and no other Ray
#
# Each node has its own temp dir under $KNET_CLUSTER_DIR (default /tmp/knet-cluster-$UID; ports:
# KNET_RAY_PORT, default 6390, KNET_DASHBOARD_PORT, default 8265): nodes that
# share Ray's /tmp/ray delete each other's unpacked job files. Auth: token mode (Ray 2.60); the token is
# ~/.ray/auth_token, created on first start. Ray 2.60 listens on every interface whatever
# --node-ip-address says, so the token is what keeps others out.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
STATE="${KNET_CLUSTER_DIR:-/tmp/knet-cluster-$(id -u)}"   # short: Ray's Unix socket paths live under it
GCS_PORT="${KNET_RAY_PORT:-6390}"
DASHBOARD_PORT="${KNET_DASHBOARD_PORT:-8265}"

activate() {
  # Job entrypoints inherit the raylet's environment: the project's venv must come first on PATH.
  if [[ -f "$REPO/.venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    . "$REPO/.venv/bin/activate"
  fi
  command -v ray > /dev/null || { echo "error: ray is not installed (bin/knet sets up the venv)" >&2; exit 2; }
  export RAY_AUTH_MODE=token
}

env_lines() {
  echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT RAY_AUTH_MODE=token"
}

start() {
  activate
  if [[ -e "$STATE/head" ]]; then
    echo "error: $STATE already holds a cluster; run '$0 stop' first" >&2
    exit 2
  fi
  mkdir -p "$STATE"
  ray get-auth-token --generate > /dev/null
  # agents on ports of their own: Ray's default (52365) may belong to another Ray of this machine, and
  # a head without its agent refuses jobs ("No available agent to submit job")
  ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --temp-dir "$STATE/head" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$((DASHBOARD_PORT + 99))" \
    --num-cpus 1 --resources '{"trainslot": 1}' --object-store-memory 200000000 --disable-usage-stats
  ray start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 --temp-dir "$STATE/worker" \
    --num-cpus 1 --resources '{"trainslot": 1}' --object-store-memory 200000000 \
    --dashboard-agent-listen-port "$((DASHBOARD_PORT + 100))" --metrics-export-port 0 --disable-usage-stats
  wait_for_port "$((DASHBOARD_PORT + 99))"  # the head's agent runs the jobs: submit works from now on
  echo "cluster up: jobs and dashboard at http://127.0.0.1:$DASHBOARD_PORT"
  echo "in every shell that uses it: eval \"\$($0 env)\""
}

wait_for_port() {
  local _
  for _ in $(seq 120); do
    (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0
    sleep 0.5
  done
  echo "error: nothing listens on 127.0.0.1:$1 after 60 s (see $STATE/head/session_latest/logs)" >&2
  exit 1
}

add_node() {
  # another worker node (e.g. to replace a lost one), with a temp dir of its own
  activate
  local n=2
  while [[ -e "$STATE/worker-$n" ]]; do n=$((n + 1)); done
  ray start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 --temp-dir "$STATE/worker-$n" \
    --num-cpus 1 --resources '{"trainslot": 1}' --object-store-memory 200000000 \
    --dashboard-agent-listen-port 0 --metrics-export-port 0 --disable-usage-stats
  echo "added worker node $n"
}

submit() {
  activate
  local experiment="${1:?usage: local_multinode.sh submit EXPERIMENT.yaml [--set k=v ...]}"
  shift
  # the job runs in Ray's copy of the repository: KNET_HOME keeps its results in the checkout's .knet
  ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir "$REPO" \
    --runtime-env-json "{\"env_vars\": {\"KNET_HOME\": \"${KNET_HOME:-$REPO/.knet}\"}}" \
    -- knet run "$experiment" --set 'scaling.resources_per_worker={CPU: 1, trainslot: 1}' "$@"
}

node_processes() {
  # every process whose command line names this cluster's temp dirs (GCS, raylets, dashboard); the
  # Ray workers exit with their raylet. Agents rename themselves (ray::DashboardAgent): found by the
  # log files they hold open under $STATE (one outlived its killed raylet, holding its port).
  {
    pgrep -f -- "$STATE/(head|worker)" || true
    local pid
    for pid in $(pgrep -u "$(id -u)" -- '^ray::' || true); do
      if ls -l "/proc/$pid/fd" 2> /dev/null | grep -q -- "$STATE/"; then echo "$pid"; fi
    done
  } | sort -u
}

stop() {
  local pids
  pids="$(node_processes)"
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2> /dev/null || true
    for _ in $(seq 10); do
      [[ -z "$(node_processes)" ]] && break
      sleep 1
    done
    pids="$(node_processes)"
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2> /dev/null || true
  fi
  rm -rf "$STATE"
  echo "stopped the nodes under $STATE"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  env) env_lines ;;
  add-node) add_node ;;
  submit) shift; submit "$@" ;;
  stop) stop ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
