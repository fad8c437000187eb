"""`montrage bench` runs the checkout's benchmarks in a subprocess; the installed library never imports them."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from montrage.cli import find_checkout, main

REPO = Path(__file__).resolve().parents[2]

FAKE_MAIN = """import json, os, sys
from pathlib import Path
Path(os.environ["FAKE_BENCH_LOG"]).write_text(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
    "caller": os.environ.get("MONTRAGE_CALLER_CWD")}))
sys.exit(3)
"""


def _fake_checkout(root: Path) -> Path:
    (root / "benchmarks").mkdir(parents=True)
    (root / "montrage").mkdir()
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "__main__.py").write_text(FAKE_MAIN)
    return root


def test_outside_a_checkout_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "attribution", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "montrage checkout" in err and "--repo" in err
    assert main(["bench", "--repo", str(tmp_path), "cost"]) == 2


def test_runs_python_m_benchmarks_in_the_checkout(tmp_path, monkeypatch):
    repo = _fake_checkout(tmp_path / "checkout")
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    log = tmp_path / "log.json"
    monkeypatch.setenv("FAKE_BENCH_LOG", str(log))
    monkeypatch.chdir(caller)
    # --repo after KIND is ours, everything else goes to the benchmark untouched
    rc = main(["bench", "attribution", "--repo", str(repo), "--quick", "--seed", "1", "--write-md", "out.md"])
    assert rc == 3  # the benchmark's exit status
    seen = json.loads(log.read_text())
    assert seen["argv"] == ["attribution", "--quick", "--seed", "1", "--write-md", "out.md"]
    assert Path(seen["cwd"]).resolve() == repo.resolve() and Path(seen["caller"]).resolve() == caller.resolve()
    monkeypatch.chdir(repo / "montrage")  # a parent directory that is a checkout is found too
    assert find_checkout() == repo.resolve()


def test_relative_paths_are_the_callers(tmp_path, monkeypatch):
    from benchmarks.cli import BENCHMARKS_MD, build_parser, caller_path

    monkeypatch.setenv("MONTRAGE_CALLER_CWD", str(tmp_path))
    assert caller_path("x/BENCH.md") == tmp_path / "x" / "BENCH.md"
    assert caller_path(str(tmp_path / "abs.md")) == tmp_path / "abs.md"
    args = build_parser().parse_args(["cost", "--write-md"])
    assert Path(args.write_md) == BENCHMARKS_MD == REPO / "BENCHMARKS.md"  # the checkout's, not site-packages
    assert build_parser().parse_args(["cost"]).write_md is None


def test_the_library_never_imports_benchmarks():
    for path in (REPO / "montrage").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "benchmarks" or n.startswith(("benchmarks.", "montrage.bench")) for n in names), path
    cfg = (REPO / "setup.cfg").read_text()
    assert "exclude = benchmarks*" in cfg


def test_no_backend_switch_in_the_library():
    for path in (REPO / "montrage").rglob("*.py"):
        assert "matplotlib.use(" not in path.read_text(), path


@pytest.mark.skipif(sys.platform == "win32", reason="posix paths")
def test_list_needs_no_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "list"]) == 0
    assert "montrage" in capsys.readouterr().out
