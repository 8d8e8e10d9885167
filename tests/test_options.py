"""One `-O` grammar: `opsearch search -O`, `opsearch evaluate -O` and the config file read the
same text as the same value (a TOML value, else a string)."""
from __future__ import annotations

import pytest

from opsearch.commands.evaluate import apply_options
from opsearch.config import build_config, parse_assignment
from opsearch.errors import UserError

SETTINGS = {"steps": ("5", 5), "lr": ("0.05", 0.05), "nesterov": ("true", True),
            "devices": ("[0, 1]", [0, 1]), "precision": ("bf16-mixed", "bf16-mixed"),
            "layer_options.no_act": ("bn", "bn"), "dataset_options.image_size": ("16", 16),
            "arch_options.resnet.zero_init_residual": ("false", False)}


def nested(path, value):
    out = {}
    cursor = out
    for part in path[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[path[-1]] = value
    return out


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_search_evaluate_and_config_file_read_an_option_alike(tmp_path, key):
    text, expected = SETTINGS[key]
    path = key.split(".")
    assert parse_assignment(f"{key}={text}") == (path, expected)
    from_evaluate = apply_options({}, [f"{key}={text}"])
    from_search = build_config(None, {}, [f"evaluator.{key}={text}"]).evaluator
    toml = tmp_path / "run.toml"
    toml.write_text(f"[evaluator]\n{key} = {text if text != 'bf16-mixed' and text != 'bn' else repr(text)}\n")
    from_file = build_config(str(toml), {}, []).evaluator
    assert from_evaluate == from_search == from_file == nested(path, expected)


def test_bad_assignments():
    for text in ("steps", "=3", "a..b=1"):
        with pytest.raises(UserError, match="must look like key=value"):
            parse_assignment(text)
    with pytest.raises(UserError, match=r"unknown option 'stepz' \(did you mean 'steps'\?\)"):
        apply_options({}, ["stepz=3"])
