"""The package's imports point one way: no module imports one that imports it back, and the
layers declared in pyproject.toml (checked by import-linter in .ci/run) hold."""

import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter (and grimp) come with the test extra")


def test_no_module_takes_part_in_an_import_cycle():
    graph = grimp.build_graph("u2zoo")
    cycles = [
        (m, imported)
        for m in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(m)
        if graph.chain_exists(importer=imported, imported=m)
    ]
    assert cycles == []


def test_the_layer_contract_holds():
    root = Path(__file__).resolve().parents[1]
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout
