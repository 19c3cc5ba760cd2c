"""The package has no import cycle and no seqpar import hidden inside a function.

Each module is imported first, on its own, in a fresh interpreter: a cycle that a particular import order happens to
resolve fails here for the module that starts it. Function-level imports of seqpar modules (the usual way to hide a
cycle) are refused outright; optional third-party dependencies may still be imported lazily.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts[-1] == "__main__":
            continue
        names.append(".".join(("seqpar", *parts)))
    return names


def test_every_module_imports_first_in_a_fresh_interpreter():
    """One interpreter per module would take a minute; instead a child imports each module after clearing every
    seqpar module from `sys.modules`, so each starts as the first seqpar import (third-party modules stay loaded)."""
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {_modules()!r}:\n"
        "    for m in [m for m in sys.modules if m == 'seqpar' or m.startswith('seqpar.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_every_module_imports_in_reverse_order():
    """The same modules imported one after another in reverse order in one interpreter (a partly initialised module
    met through a cycle fails with ImportError here)."""
    script = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in reversed(_modules()))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_function_level_seqpar_imports():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                found += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names
                          if n == "seqpar" or n.startswith("seqpar.")]
    assert not found, "import these at module level:\n" + "\n".join(found)


def test_the_training_stack_does_not_import_torch_compiler():
    """A rank's modules leave out torch._dynamo (and so inductor): importing it costs every process about 70 MiB of
    anonymous memory, which the planner's runtime baseline would then count in every rank. (torch's
    `torch.nn.attention.bias` pulls it in, for one.)"""
    script = ("import sys, seqpar.trainer.loop, seqpar.trainer.job, seqpar.plan.estimate; "
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
