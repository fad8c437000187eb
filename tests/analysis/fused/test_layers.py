"""The fused package's layers: each module imports only the ones below it, and the arithmetic (kinds, fit, rules)
reads no run, store or model, so that it stays testable on arrays alone."""
import ast
from pathlib import Path

import montrage.analysis.fused as F

PACKAGE = "montrage.analysis.fused"
BELOW = {"kinds": set(), "fit": {"kinds"}, "rules": {"kinds", "fit"}, "channels": {"kinds"},
         "supervision": {"kinds", "fit", "channels"}, "scorer": {"kinds", "fit", "rules", "channels", "supervision"}}
ARITHMETIC = ("kinds", "fit", "rules")
ARITHMETIC_MAY_IMPORT = ("montrage.errors", "montrage.losses")


def _imports(module: str) -> set:
    tree = ast.parse((Path(F.__file__).parent / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_every_module_is_listed_and_imports_only_the_layers_below_it():
    modules = {p.stem for p in Path(F.__file__).parent.glob("*.py")} - {"__init__"}
    assert modules == set(BELOW)
    for module, below in BELOW.items():
        siblings = {m.split(".")[-1] for m in _imports(module) if m.startswith(PACKAGE + ".")}
        assert siblings <= below, (module, siblings - below)


def test_the_arithmetic_reads_no_run():
    for module in ARITHMETIC:
        ours = {m for m in _imports(module) if m.startswith("montrage") and not m.startswith(PACKAGE + ".")}
        assert all(m.startswith(ARITHMETIC_MAY_IMPORT) for m in ours), (module, ours)
