#!/usr/bin/env bash
# Two Ray nodes on one machine, loopback only: a rehearsal of a multi-node cluster.
#
#   cluster/local_multinode.sh start [--no-auth]   # head + one worker node, 1 CPU and 1 "trainslot" each
#   knet run experiments/quickstart.yaml --set 'scaling.resources_per_worker={CPU: 1, trainslot: 1}'
#   cluster/local_multinode.sh submit experiments/quickstart.yaml   # or through the job server (KNET_HOME=./.knet)
#   cluster/local_multinode.sh stop                 # `ray stop`: stops every Ray node of this user here
#
# Auth: Ray 2.60 enables token auth; `ray start` writes the token under ~/.ray/ and local clients read it
# there (RAY_AUTH_MODE=token). Remote clients need the same token file (RAY_AUTH_TOKEN_PATH). --no-auth
# exports RAY_AUTH_MODE=disabled: only on a machine nobody else can reach, since Ray 2.60 listens on every
# interface whatever --node-ip-address says (it rewrites 127.0.0.1 to the machine's address); export the
# same variable in every shell that talks to this cluster.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
GCS_PORT="${KNET_RAY_PORT:-6390}"
DASHBOARD_PORT="${KNET_DASHBOARD_PORT:-8265}"

activate() {
  # Job entrypoints inherit the raylet's environment: the project's venv must come first on PATH.
  if [[ -f "$REPO/.venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    . "$REPO/.venv/bin/activate"
  fi
  command -v ray > /dev/null || { echo "error: ray is not installed (pip install -e '.[platform]')" >&2; exit 2; }
}

auth_mode() {
  if [[ "${1:-}" == "--no-auth" ]]; then
    export RAY_AUTH_MODE=disabled
    echo "token auth disabled: Ray listens on every interface, use this only on a closed machine;"
    echo "run: export RAY_AUTH_MODE=disabled in your other shells"
  else
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  fi
}

start() {
  activate
  auth_mode "${1:-}"
  ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --num-cpus 1 --resources '{"trainslot": 1}' --object-store-memory 200000000 --disable-usage-stats
  ray start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 \
    --num-cpus 1 --resources '{"trainslot": 1}' --object-store-memory 200000000 \
    --dashboard-agent-listen-port "$((DASHBOARD_PORT + 100))" --metrics-export-port 0 --disable-usage-stats
  echo "cluster: RAY_ADDRESS=127.0.0.1:$GCS_PORT  jobs: http://127.0.0.1:$DASHBOARD_PORT"
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

case "${1:-}" in
  start) shift; start "$@" ;;
  submit) shift; submit "$@" ;;
  stop) activate; ray stop ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
