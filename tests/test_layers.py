"""The package's layers import only downwards: ops ← model ← data ← infer ← train ← serve ← cli (training samples
and predicts with the inference code; inference never imports training)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tnlora"
# What each package may not import (its own layer or above).
FORBIDDEN = {
    "ops": ("tnlora.model", "tnlora.data", "tnlora.train", "tnlora.infer", "tnlora.serve", "tnlora.cli"),
    "model": ("tnlora.data", "tnlora.train", "tnlora.infer", "tnlora.serve", "tnlora.cli"),
    "data": ("tnlora.train", "tnlora.infer", "tnlora.serve", "tnlora.cli"),
    "infer": ("tnlora.train", "tnlora.serve", "tnlora.cli"),
    "train": ("tnlora.serve", "tnlora.cli"),
    "serve": ("tnlora.train", "tnlora.bench", "tnlora.cli"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package: str) -> None:
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, bad
