#!/usr/bin/env bash
# Sourced by bin/knet and bin/test: make sure the project's virtual environment exists and matches
# pyproject.toml. First use creates it (a few minutes: torch comes from this machine's disk); later uses
# compare one stamp and return at once.
set -euo pipefail

KNET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KNET_VENV="${KNET_VENV:-$KNET_ROOT/.venv}"
KNET_EXTRAS="${KNET_EXTRAS:-platform,dev}"

_knet_find_python() {
  for candidate in "${KNET_PYTHON:-}" python3.11 python3 python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "bin/bootstrap.sh: no Python >= 3.10 found; install one or set KNET_PYTHON=/path/to/python3.11" >&2
  return 1
}

_knet_stamp() {
  cat "$KNET_ROOT/pyproject.toml" "$KNET_ROOT/bin/bootstrap.sh" | sha256sum | cut -c1-16
  echo "$KNET_EXTRAS"
}

knet_bootstrap() {
  local want have
  want="$(_knet_stamp)"
  have="$(cat "$KNET_VENV/.knet-stamp" 2>/dev/null || true)"
  if [ -x "$KNET_VENV/bin/python" ] && [ "$want" = "$have" ]; then
    return 0
  fi
  local python
  python="$(_knet_find_python)"
  echo "Setting up $KNET_VENV (first use; later runs skip this) ..." >&2
  [ -x "$KNET_VENV/bin/python" ] || "$python" -m venv "$KNET_VENV"
  "$KNET_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$KNET_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$KNET_ROOT[$KNET_EXTRAS]" >&2
  echo "$want" > "$KNET_VENV/.knet-stamp"
  echo "Environment ready: $KNET_VENV" >&2
}

knet_bootstrap
