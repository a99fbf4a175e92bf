#!/usr/bin/env bash
# Make this checkout runnable: the Debian packages named in the given lists, then a
# virtualenv in .venv with the worker installed (editable) and the given extras.
#   scripts/bootstrap.sh [--packages FILE]... [--extras dev,guestkit]
set -euo pipefail
cd "$(dirname "$0")/.."

lists=()
extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --packages) lists+=("$2"); shift 2 ;;
    --extras) extras="$2"; shift 2 ;;
    *) echo "bootstrap: unknown argument $1" >&2; exit 2 ;;
  esac
done

want=()
for list in "${lists[@]}"; do
  while read -r pkg _; do
    case "$pkg" in ""|\#*) continue ;; esac
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || want+=("$pkg")
  done < "$list"
done
if [ ${#want[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing ${want[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

# The interpreter: $PYTHON when set; else the distribution's /usr/bin/python3 when it is 3.11
# or newer, else python3 on PATH. Debian builds its python3 with LTO and profile-guided
# optimisation and links libpython into the executable: a lone job's latency was 10-15 %
# lower on it than on a self-built one with a shared libpython (docs/architecture.md).
python=${PYTHON:-}
if [ -z "$python" ]; then
  python=python3
  if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=/usr/bin/python3
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
else  # an existing .venv is kept; say when it runs on another interpreter than chosen now
  where='import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
  have=$(.venv/bin/python -c "$where") want=$("$python" -c "$where" 2>/dev/null || true)
  if [ -n "$want" ] && [ "$have" != "$want" ]; then
    echo "bootstrap: note: .venv runs $have, not $want; remove .venv to rebuild it on the latter" >&2
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# The install is editable, so only pyproject.toml (dependencies, entry points) calls for
# pip again: a stamp per set of extras records the pyproject.toml it was done for.
stamp=".venv/.installed${extras:+-${extras//,/-}}"
want_stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
  echo "$want_stamp" > "$stamp"
fi
