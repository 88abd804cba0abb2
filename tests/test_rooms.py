"""The house rules of DESIGN.md that a test can check: the agent never imports torch or export."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_AGENT = ("torch", "export", "triton")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):  # every import, including ones inside functions
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_agent_module_imports_torch_or_export():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & set(FORBIDDEN_IN_AGENT))
                 for p in (ROOT / "agent").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_agent_module_loads_no_torch():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "agent").rglob("*.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'triton')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_does_not_import_torch():
    code = "import sys; from cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_tensorrt_plugins_load_without_torch():
    """The device registers the plugins before deserializing an engine; it has no torch."""
    code = ("import sys; import trt_plugins.tensorrt_plugins, trt_plugins.names, trt_plugins.attention.config; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr
