"""pyproject.toml, poetry.lock, requirements/constraints.txt, README and CI agree."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "poetry.lock"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def _exporter():
    spec = importlib.util.spec_from_file_location("export_constraints", ROOT / "scripts" / "export_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _locked() -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for p in tomllib.loads(LOCK.read_text())["package"]:
        versions.setdefault(canonicalize_name(p["name"]), set()).add(p["version"])
    return versions


def _constrained() -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            versions.setdefault(canonicalize_name(req.name), set()).add(spec.version)
    return versions


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_constraints_file_is_exactly_what_the_lock_renders_to():
    assert CONSTRAINTS.read_text() == _exporter().render(LOCK.read_text()), (
        "requirements/constraints.txt is stale: run scripts/export_constraints.py (or scripts/lock.sh)"
    )


def test_constraints_pin_every_locked_version_and_nothing_else():
    assert _constrained() == _locked()


def test_declared_dependencies_are_satisfied_by_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    pins = _constrained()
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: run scripts/lock.sh"
        for version in pins[name]:
            assert req.specifier.contains(version, prereleases=True), (
                f"{line!r} is not satisfied by the locked {version}: run scripts/lock.sh"
            )


def test_lock_and_constraints_carry_no_index_address():
    # Poetry users resolve against their own PyPI; a mirror address must never be committed.
    lock = LOCK.read_text()
    assert "[package.source]" not in lock
    assert not re.search(r"^url = ", lock, flags=re.M)
    assert "://" not in CONSTRAINTS.read_text()


def test_ci_runs_the_readme_test_command_verbatim():
    serve, test = _quick_start_commands()
    assert serve == "./scripts/setup.sh && .venv/bin/csm-voice-api serve"
    assert test == "./scripts/setup.sh --dev && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"if {test}; then" in ci


def test_silentcipher_pin_is_the_same_in_setup_and_readme():
    (pin,) = re.findall(r"silentcipher==[\w.]+", (ROOT / "scripts" / "setup.sh").read_text())
    readme = (ROOT / "README.md").read_text()
    assert f"pip install --no-deps {pin}" in readme
    # It must stay out of the resolver: never a declared dependency.
    assert "silentcipher" not in _locked()


def test_poetry_check_lock_passes():
    poetry = shutil.which("poetry")
    if poetry is None:
        pytest.skip("poetry is not on PATH (.ci/run installs it; locally: scripts/lock.sh runs the same check)")
    result = subprocess.run(
        [poetry, "check", "--lock"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All set!" in result.stdout


# Imported by the package but deliberately not a declared dependency: silentcipher is installed
# with --no-deps by scripts/setup.sh (its torch<=2.0 must not reach the resolver).
_UNDECLARED_OK = {"silentcipher"}


def _runtime_closure(names: set[str]) -> set[str]:
    """The runtime dependencies and everything they require (no extras), as installed here."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_every_module_level_import_of_the_package_is_a_runtime_dependency():
    """What the server imports when it starts must come with the runtime install (setup.sh without
    --dev): a dev-only dependency imported at module level passes CI (dev extras) and breaks
    `serve`, as httpx did. Imports inside functions are the optional features' (YouTube, ASR)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _runtime_closure({canonicalize_name(Requirement(d).name) for d in project["dependencies"]})
    dists = packages_distributions()
    missing = set()
    for path in (ROOT / "csm_voice_api").rglob("*.py"):
        for node in ast.parse(path.read_text(), str(path)).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top in _UNDECLARED_OK or top in ("csm_voice_api", "__future__"):
                    continue
                if not {canonicalize_name(d) for d in dists.get(top, [top])} & runtime:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported at module level but not a runtime dependency: {sorted(missing)}"
