"""The benchmark scripts and their helper modules import (they are not run here: tests never time anything)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_imports(path, monkeypatch):
    # As Python runs a script: its folder first on the path, so that it finds its helper modules (peers.py)
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # As Python registers a script it runs (its dataclasses need it)
    monkeypatch.setitem(sys.modules, spec.name, module)
    # Top-level imports and definitions; main() only runs as a script
    spec.loader.exec_module(module)
    if 'if __name__ == "__main__":' in path.read_text():  # a script, not a helper module
        assert callable(module.main)
