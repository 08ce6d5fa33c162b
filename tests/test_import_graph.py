"""The package's import graph (tools/import_graph.py, read with ast, function-local imports
included): no cycle, no import from a lower layer to a higher one, every module placed."""

from tools import import_graph


def test_no_cycle_and_no_upward_import():
    edges = import_graph.graph()
    assert "vq4dit.io.packed" in edges and "vq4dit.quantize" in edges["vq4dit.io.packed"]
    assert import_graph.cycles(edges) == []
    assert import_graph.upward_imports(edges) == []


def test_the_checker_sees_function_local_imports_and_cycles(tmp_path):
    source = tmp_path / "convert.py"
    source.write_text("import torch\n\ndef f():\n    from .quantize import vq_layers\n    from . import io\n")
    known = {"vq4dit", "vq4dit.convert", "vq4dit.quantize", "vq4dit.io"}
    found = import_graph.imports_of("vq4dit.convert", source, known)
    assert found == {"vq4dit.quantize", "vq4dit.io"}
    edges = {"vq4dit.convert": found, "vq4dit.quantize": {"vq4dit.io"}, "vq4dit.io": {"vq4dit.convert"}}
    assert import_graph.cycles(edges) == [["vq4dit.convert", "vq4dit.io", "vq4dit.quantize"]]
    assert "vq4dit.convert (models) -> vq4dit.quantize (layers)" in import_graph.upward_imports(edges)
