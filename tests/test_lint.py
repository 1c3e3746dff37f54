"""Style and layout rules, checked as part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt")


@pytest.mark.skipif(
    shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff").exists(),
    reason="ruff is not installed (pip install -e '.[testing]')",
)
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, *args, "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_without_gui():
    """Every module outside _widgets imports with napari / Qt unavailable."""
    modules = []
    for pkg in (ROOT / "src" / "napari_mobilesam", ROOT / "batch" / "mobilesam_batch"):
        modules += sorted(
            pkg.name + "." + ".".join(p.relative_to(pkg).with_suffix("").parts)
            for p in pkg.rglob("*.py")
            if "_widgets" not in p.parts and p.name not in ("__init__.py", "__main__.py")
        )
    code = (
        "import sys, importlib\n"
        f"for name in {GUI_MODULES!r}: sys.modules[name] = None\n"
        f"for mod in {modules!r}: importlib.import_module(mod)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r} and sys.modules[m]]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
