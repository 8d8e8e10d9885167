"""`opsearch list`: every registry; a known layer by its formula, a plugin by its description and
its options with their defaults, in text and in JSON; a user's plugin file shows up too."""
from __future__ import annotations

import json
import textwrap

from opsearch import cli


def test_list_json_has_formulas_and_options_with_defaults(capsys, tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text(textwrap.dedent('''
        from opsearch import register_filter
        from opsearch.rejection import Filter

        @register_filter("always_passes")
        class AlwaysPasses(Filter):
            """Lets every candidate through."""
            def __init__(self, patience: int = 3):
                self.patience = patience
            def check(self, candidate, context):
                return self.accept()
    '''))
    assert cli.main(["list", "--json", "--plugin", str(plugin)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"search_spaces", "layers", "algorithms", "rejection_filters",
                            "architectures", "datasets", "evaluators"}
    assert listing["layers"]["evonorm_b0"] == {"formula": "x / max(std_b(x), v0*x + std_i(x))"}
    assert listing["layers"]["bn_relu"]["formula"] == "max((x - mean_b(x)) / std_b(x) * v0 + v1, 0)"
    assert listing["algorithms"]["regularized_evolution"]["options"]["population_size"] == 20
    assert listing["algorithms"]["nsga2"]["options"]["mutation_prob"] is None
    assert listing["rejection_filters"]["quality"]["options"] == {"steps": 100, "min_accuracy": 0.2,
                                                                  "early_exit": True, "parent_margin": None}
    assert listing["rejection_filters"]["always_passes"] == {"doc": "Lets every candidate through.",
                                                            "options": {"patience": 3}}
    assert listing["search_spaces"]["evonorm"]["options"] == {"num_nodes": 10, "batch_independent": False}
    assert listing["architectures"]["resnet"]["options"]["width"] == 8
    assert listing["datasets"]["digits"]["options"]["val_fraction"] == 0.2
    assert listing["evaluators"]["lightning"]["options"]["steps"] == 300
    assert listing["algorithms"]["random"]["options"] == {"generator": "valid", "init_nodes": 4,
                                                          "avoid_duplicates": True}


def test_list_text_shows_formulas_not_the_graph_docstring(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "x*sigmoid(v0*x) / std_g(x)" in out
    assert "options: steps=100, min_accuracy=0.2, early_exit=true" in out
    assert "A list of nodes; value i < 4" not in out  # the LayerGraph docstring
    lines = [line for line in out.splitlines() if line.strip().startswith("evonorm_s0 ")]
    assert lines and lines[0].split(None, 1)[1] == "x*sigmoid(v0*x) / std_g(x)"
