"""Every tokenomy module imports on its own, first, in a fresh interpreter (no import cycle depends on which module
a user happens to import first)."""
import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import tokenomy
names = sorted(info.name for info in pkgutil.walk_packages(tokenomy.__path__, "tokenomy."))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "tokenomy" or m.startswith("tokenomy.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        failed.append(f"{name}: {exc}")
print(len(names))
print("\n".join(failed))
"""


def test_every_module_imports_first():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    count, *failed = result.stdout.strip().split("\n")
    assert int(count) > 50
    assert not [line for line in failed if line], failed
