#!/usr/bin/env bash
# Re-lock poetry.lock and regenerate requirements/constraints.txt.
#
# Usage: scripts/lock.sh [extra `poetry lock` args, e.g. --regenerate]
#
# Poetry runs from a throwaway venv. Where Poetry's default source cannot resolve (some
# mirrors serve the simple index but not the per-version JSON API), the index pip uses on
# this machine is added for the duration of the lock as a temporary Poetry source, read
# from pip's configuration at run time. Afterwards the pyproject.toml is restored
# byte-for-byte, the [package.source] blocks are stripped from poetry.lock (so no index
# address is ever committed and Poetry users resolve against their own PyPI), and the
# content-hash is recomputed with Poetry's own Locker so `poetry check --lock` passes.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
source_name=lock-tmp-index

work=$(mktemp -d)
cp pyproject.toml "$work/pyproject.toml.orig"
restore() {
    # Always leave pyproject.toml exactly as it was, even on failure.
    cp "$work/pyproject.toml.orig" pyproject.toml
    rm -rf "$work"
}
trap restore EXIT

echo "lock.sh: installing poetry into a throwaway venv"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$work/venv/bin/python" -m pip install -q "poetry>=2.1,<3"
poetry=("$work/venv/bin/python" -m poetry)
"${poetry[@]}" --version

# The index pip resolves from: PIP_INDEX_URL, else pip's configured index-url, else pip's
# built-in default. Local file:// indexes are skipped (Poetry cannot read them).
index_url=${PIP_INDEX_URL:-}
if [[ -z "$index_url" ]]; then
    index_url=$("$python" -m pip config list 2>/dev/null |
        sed -n "s/^[a-z]*\.index-url='\(.*\)'$/\1/p" | tail -n 1)
fi
if [[ -z "$index_url" ]]; then
    index_url=$("$work/venv/bin/python" -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')
fi
if [[ "$index_url" == file:* ]]; then
    echo "lock.sh: pip's index is a local directory; locking against Poetry's default source"
    index_url=
fi

if [[ -n "$index_url" ]]; then
    echo "lock.sh: adding pip's index as temporary Poetry source '$source_name'"
    "${poetry[@]}" source add --priority=primary "$source_name" "$index_url" >/dev/null
fi

echo "lock.sh: poetry lock $*"
"${poetry[@]}" lock "$@"

# Put pyproject.toml back before hashing: the hash must describe the committed file.
cp "$work/pyproject.toml.orig" pyproject.toml

"$work/venv/bin/python" - "$index_url" <<'PY'
import re
import sys
from pathlib import Path

from poetry.core.pyproject.toml import PyProjectTOML
from poetry.packages.locker import Locker

index_url = sys.argv[1]
lock_path = Path("poetry.lock")
text = lock_path.read_text()
# A [package.source] block runs until the blank line that ends its [[package]] entry.
text = re.sub(r"\n\[package\.source\]\n(?:[^\n]+\n)*", "\n", text)
if index_url and index_url.rstrip("/") in text:
    sys.exit("lock.sh: the temporary index address is still in poetry.lock; refusing to continue")

data = PyProjectTOML(Path("pyproject.toml")).data
content_hash = Locker(lock_path, data)._get_content_hash()
text, n = re.subn(r'^content-hash = ".*"$', f'content-hash = "{content_hash}"', text, flags=re.M)
if n != 1:
    sys.exit("lock.sh: no content-hash line found in poetry.lock")
lock_path.write_text(text)
PY

"${poetry[@]}" check --lock
"$work/venv/bin/python" scripts/export_constraints.py
echo "lock.sh: done; commit poetry.lock and requirements/constraints.txt together"
