"""Write requirements/constraints.txt from poetry.lock.

pip installs with `-c requirements/constraints.txt` so that pip users get exactly the versions
Poetry locked. Every locked package becomes `name==version`; a package locked at several versions
(for different Pythons or platforms) keeps its lock markers so pip picks the right one.

Usage: python scripts/export_constraints.py [--check]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "poetry.lock"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"

HEADER = """\
# Generated from poetry.lock by scripts/export_constraints.py: do not edit by hand.
# Re-lock with scripts/lock.sh, which regenerates this file.
# Used as: pip install -c requirements/constraints.txt -e .
"""


def _marker(package: dict) -> str:
    markers = package.get("markers")
    if isinstance(markers, dict):
        # Poetry writes one marker per dependency group when they differ; any group will do
        # for pip, so join them.
        parts = sorted({m for m in markers.values() if m})
        return " or ".join(f"({m})" for m in parts) if len(parts) > 1 else "".join(parts)
    return markers or ""


def render(lock_text: str) -> str:
    """Constraints file text for a poetry.lock text."""
    packages = tomllib.loads(lock_text)["package"]
    counts = Counter(p["name"] for p in packages)
    lines = []
    for p in sorted(packages, key=lambda p: (p["name"], p["version"])):
        line = f"{p['name']}=={p['version']}"
        marker = _marker(p) if counts[p["name"]] > 1 else ""
        lines.append(f"{line} ; {marker}" if marker else line)
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render(LOCK.read_text())
    if "--check" in argv:
        if not CONSTRAINTS.exists() or CONSTRAINTS.read_text() != text:
            print(f"{CONSTRAINTS.relative_to(ROOT)} is stale: run scripts/export_constraints.py")
            return 1
        return 0
    CONSTRAINTS.parent.mkdir(exist_ok=True)
    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({text.count(chr(10)) - HEADER.count(chr(10))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
