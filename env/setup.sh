#!/usr/bin/env bash
# Set up one of the two pinned stacks in .venv-<stack> and build the C++ extensions.
#
#   env/setup.sh [ipex|native]      (default: ipex)
#
# Idempotent: a stamp records the lock file and project metadata it was built
# from; when neither changed, it only re-checks the extension build (seconds).
set -euo pipefail

stack="${1:-ipex}"
case "$stack" in
  ipex|native) ;;
  *) echo "env/setup.sh: unknown stack '$stack'; use 'ipex' (torch 2.8 + IPEX 2.8) or 'native' (current torch)" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/env/$stack.lock"
venv="${IPEX_LARS_VENV:-$root/.venv-$stack}"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null; then
  echo "env/setup.sh: '$python' not found; install Python 3.10+ or set PYTHON=/path/to/python3" >&2; exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "env/setup.sh: $("$python" --version) is too old; ipex-lars needs Python 3.10+" >&2; exit 2
fi

stamp="$venv/.ipex-lars-stamp"
# The editable install maps top-level packages when it runs, so a new package means reinstalling.
want="$( { cat "$lock" "$root/pyproject.toml"; cd "$root" && ls -d */__init__.py; } | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] $stack stack up to date in $venv"
else
  echo "[setup] creating the $stack stack in $venv (a few minutes, ~7 GB)"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
  "$venv/bin/python" -m pip install --quiet -r "$lock"
  PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi

# Build the C++ extensions once, here, so ranks never race to build them.
"$venv/bin/ipex-lars" build
