#!/usr/bin/env bash
# Create .venv and install csm-voice-api into it, pinned to poetry.lock.
#
# Usage: scripts/setup.sh [--dev] [--force]
#   --dev    also install the test tools (the `dev` extra)
#   --force  reinstall even if nothing changed since the last run
# PYTHON=/path/to/python3.x picks the interpreter (default: python3), used only to create .venv.
set -euo pipefail

dev=0
force=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        --force) force=1 ;;
        -h | --help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=.venv
python=${PYTHON:-python3}
silentcipher="silentcipher==1.0.5"
start=$SECONDS

# requires-python in pyproject.toml; checked here so the message beats pip's.
version_ok='import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)'
version_of='import sys; print("%d.%d.%d" % sys.version_info[:3])'

if [[ ! -x "$venv/bin/python" ]]; then
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "setup.sh: '$python' not found. Install Python 3.10-3.13, or set PYTHON=/path/to/python3.x" >&2
        exit 1
    fi
    if ! "$python" -c "$version_ok"; then
        echo "setup.sh: csm-voice-api needs Python 3.10-3.13, but $python is $("$python" -c "$version_of")." >&2
        echo "          Set PYTHON=/path/to/python3.11 (for example) and run again." >&2
        exit 1
    fi
    echo "setup.sh: creating $venv with $python ($("$python" -c "$version_of"))"
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "setup.sh: '$python -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
elif ! "$venv/bin/python" -c "$version_ok"; then
    echo "setup.sh: $venv has Python $("$venv/bin/python" -c "$version_of"); 3.10-3.13 is needed." >&2
    echo "          Remove $venv and run again (with PYTHON=/path/to/python3.x if needed)." >&2
    exit 1
fi

# What the install depends on; an unchanged stamp means there is nothing to do.
want=$(cat pyproject.toml requirements/constraints.txt "${BASH_SOURCE[0]}" | "$venv/bin/python" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
stamp="$venv/.csm-voice-api-setup"
if [[ $force == 0 && -f "$stamp" && -x "$venv/bin/csm-voice-api" ]]; then
    read -r have_hash have_dev <"$stamp" || true
    if [[ "$have_hash" == "$want" && "${have_dev:-0}" -ge $dev ]]; then
        echo "setup.sh: $venv is up to date (pyproject.toml and constraints unchanged; --force reinstalls)"
        exit 0
    fi
fi

target="."
[[ $dev == 1 ]] && target=".[dev]"
pip=("$venv/bin/python" -m pip)
echo "setup.sh: upgrading pip"
"${pip[@]}" install --quiet --upgrade pip
echo "setup.sh: installing -e '$target' pinned by requirements/constraints.txt"
"${pip[@]}" install --quiet -c requirements/constraints.txt -e "$target"
# silentcipher declares torch<=2.0, which must never reach the resolver; its real runtime
# needs are in pyproject.toml.
echo "setup.sh: installing $silentcipher with --no-deps"
"${pip[@]}" install --quiet --no-deps "$silentcipher"

# Written last, so an interrupted install is redone on the next run.
echo "$want $dev" >"$stamp"

"$venv/bin/python" -c 'import torch, csm_voice_api; print(f"setup.sh: torch {torch.__version__}, csm_voice_api from {csm_voice_api.__path__[0]}")'
echo "setup.sh: done in $((SECONDS - start))s: $venv ($("$venv/bin/python" -c "$version_of"), $([[ $dev == 1 ]] && echo 'with dev extras' || echo 'runtime only'))"
echo "          serve: $venv/bin/csm-voice-api serve    test: $venv/bin/python -m pytest -q"
