"""The scripts of benchmarks/ as modules (the folder is not a package), for their tests."""
from __future__ import annotations

import importlib.util
import pathlib
import types


def load_benchmark(name: str) -> types.ModuleType:
    """benchmarks/<name>.py, executed as a fresh module named ``name``."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
