"""The repository's own contracts: the linter passes, docstring references to the design document
resolve, only modiff_export/manifest.py parses manifest.json, and no module imports from a later step
of the pipeline (docs/design.md section 8)."""
from __future__ import annotations

import ast
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


def _layout() -> dict[str, int]:
    """{top-level module or package of modiff_export: step} from the list in docs/design.md section 8."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("<!-- layout")[1].split("<!-- /layout -->")[0].splitlines()[1:]
    steps = {}
    for line in block:
        step, _, *names = line.split()
        steps.update({name: int(step) for name in names})
    return steps


def _imports(path: Path, rel: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """(line, top-level modiff_export module) of every import in `path`, lazy ones inside functions too;
    `rel`: the module's parts below modiff_export/ (default: from its path)."""
    rel = rel or path.relative_to(ROOT / "modiff_export").with_suffix("").parts
    package = list(rel[:-1])  # the package this module's relative imports start from
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # `from . import x` at the top: x is a top-level module
                    out += [(node.lineno, a.name) for a in node.names]
                    continue
                out.append((node.lineno, parts[0]))
            elif node.module and node.module.split(".")[0] == "modiff_export":
                parts = node.module.split(".")[1:]
                out += [(node.lineno, parts[0])] if parts else [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names
                    if a.name.startswith("modiff_export.")]
    return out


def test_no_module_imports_from_a_later_step():
    steps = _layout()
    assert len(set(steps.values())) >= 10, "docs/design.md section 8 lost its layout list"
    backwards, unplaced = [], []
    for path in sorted((ROOT / "modiff_export").rglob("*.py")):
        if "triton_models" in path.parts:  # runs inside Triton, imports nothing of the package
            continue
        top = path.relative_to(ROOT / "modiff_export").with_suffix("").parts[0]
        if top not in steps:
            unplaced.append(top)
            continue
        for line, target in _imports(path):
            if target not in steps:
                unplaced.append(target)
            elif steps[target] > steps[top]:
                backwards.append(f"{path.relative_to(ROOT)}:{line} ({top}, step {steps[top]}) imports {target} "
                                 f"(step {steps[target]})")
    assert not unplaced, f"modules missing from docs/design.md section 8: {sorted(set(unplaced))}"
    assert not backwards, "imports against the pipeline:\n" + "\n".join(backwards)


def test_the_layout_check_sees_a_back_arrow(tmp_path):
    """The checker itself: a relative and an absolute import from a later step are both found."""
    probe = tmp_path / "probe.py"  # read as if it were modiff_export/quant/probe.py
    probe.write_text("from . import gptq\nfrom ..sampling import run_batches\n\n\ndef f():\n"
                     "    import modiff_export.serving.sampler\n")
    assert {t for _, t in _imports(probe, ("quant", "probe"))} == {"quant", "sampling", "serving"}


def test_quant_imports_only_config_and_errors():
    """quant/ is the math: nothing but config, errors and itself (docs/design.md section 8)."""
    bad = [(str(p.relative_to(ROOT)), t) for p in (ROOT / "modiff_export" / "quant").rglob("*.py")
           for _, t in _imports(p) if t not in ("config", "errors", "quant")]
    assert not bad, bad
