"""The repository's own contracts: the linter passes, docstring references to the design document
resolve, and only modiff_export/manifest.py parses manifest.json."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("modiff_export", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")] + [ROOT / "cli.py"]


def test_ruff_passes():
    """The linter configured in pyproject.toml ([tool.ruff]) runs as part of the test command."""
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    if not ruff and subprocess.run([*cmd, "--version"], capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    r = subprocess.run([*cmd, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_design_references_resolve():
    """Every 'docs/design.md section N' in a docstring or comment names a section that exists."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    refs = []
    for path in SOURCES:
        for m in re.finditer(r"design\.md,? sections? (\d+)(?:-(\d+))?", path.read_text()):
            refs += [(path, n) for n in m.groups() if n]
    assert refs, "no references found: the pattern is wrong"
    bad = [(str(p.relative_to(ROOT)), n) for p, n in refs if n not in sections]
    assert not bad, f"references to sections that docs/design.md does not have: {bad}"
    stale = [str(p.relative_to(ROOT)) for p in SOURCES
             if p.name != "test_layout.py" and re.search(r"(?<!docs/)design\.md", p.read_text())]
    assert not stale, f"'design.md' without the docs/ path (not in this repository): {stale}"


def test_only_the_manifest_module_parses_manifest_json():
    offenders = []
    for path in (ROOT / "modiff_export").rglob("*.py"):
        if "triton_models" in path.parts:  # run inside Triton's Python backend, where this package is absent
            continue
        text = path.read_text()
        if path.name != "manifest.py" and re.search(r'MANIFEST_NAME|/ "manifest\.json"|\("manifest\.json"', text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"modules reading manifest.json by hand: {offenders}"
