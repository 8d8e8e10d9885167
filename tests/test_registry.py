"""Registries: built-ins discovered through entry points, a broken plugin module fails loudly
every time, names come from the decorator, options are checked in one place."""
from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

from opsearch import registry
from opsearch.errors import UserError


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("t12_good_plugin", "t12_broken_plugin"):
        sys.modules.pop(name, None)


def test_a_builtin_module_that_fails_to_import_fails_every_lookup_naming_the_module(plugin_dir, monkeypatch):
    things = registry.Registry("thing")
    (plugin_dir / "t12_good_plugin.py").write_text(
        "from tests_registry_target import things\nthings.add('good', object())\n")
    (plugin_dir / "t12_broken_plugin.py").write_text(
        "from tests_registry_target import things\nthings.add('early', object())\nraise RuntimeError('boom')\n")
    target = type(sys)("tests_registry_target")
    target.things = things
    monkeypatch.setitem(sys.modules, "tests_registry_target", target)
    group = "opsearch.test_plugins"
    loader = registry.EntryPointLoader(group, [EntryPoint("good", "t12_good_plugin", group),
                                               EntryPoint("broken", "t12_broken_plugin", group)])
    monkeypatch.setattr(registry, "_loader", loader)
    for _ in range(3):  # not only the first time: a registry is never left silently half empty
        with pytest.raises(UserError, match=r"plugin module t12_broken_plugin .*failed to import: "
                                            r"RuntimeError: boom"):
            things.get("good")
        with pytest.raises(UserError, match="t12_broken_plugin"):
            things.names()
    (plugin_dir / "t12_broken_plugin.py").write_text(
        "from tests_registry_target import things\nthings.add('early', object())\n")
    sys.modules.pop("t12_broken_plugin", None)
    assert things.names() == ["early", "good"]  # fixed: it loads on the next lookup


def test_builtins_come_from_the_entry_points_of_the_installed_package():
    from importlib import metadata

    declared = {ep.value for ep in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
                if ep.dist is not None and ep.dist.name == "opsearch"}
    assert {"opsearch.plugins.algorithms", "opsearch.plugins.rejection", "opsearch.search_spaces",
            "opsearch.trainers.plugin"} <= declared
    assert "regularized_evolution" in registry.algorithms and "lightning" in registry.evaluators
    assert "bn_relu" in registry.layers and "digits" in registry.datasets


def test_names_come_from_the_decorator():
    things = registry.Registry("thing")

    @things.register("fancy_name")
    class Plugin:
        pass

    assert Plugin.name == "fancy_name"
    assert registry.rejection_filters.get("numerics").name == "numerics"
    assert registry.algorithms.get("pyglove:hill_climb").name == "pyglove:hill_climb"


def test_create_checks_options_in_one_place():
    with pytest.raises(UserError, match=r"rejection filter 'quality': unknown option 'min_acc' "
                                        r"\(did you mean 'min_accuracy'\?\); known: early_exit, min_accuracy, parent_margin, steps"):
        registry.rejection_filters.create("quality", min_acc=0.5)
    assert registry.rejection_filters.create("quality", min_accuracy=0.5).min_accuracy == 0.5
    with pytest.raises(UserError, match=r"search space 'evonorm': unknown option 'nodes'"):
        registry.search_spaces.create("evonorm", nodes=3)
    with pytest.raises(UserError, match="unknown algorithm 'regularised_evolution' "
                                        r"\(did you mean 'regularized_evolution'\?\)"):
        registry.algorithms.create("regularised_evolution")
    assert registry.evaluators.options("lightning")["steps"] == 300


def test_public_registration_api():
    import opsearch

    for name in ("search_space", "register_algorithm", "register_filter", "register_evaluator",
                 "register_dataset", "register_architecture", "register_layer"):
        assert name in opsearch.__all__ and callable(getattr(opsearch, name))


def test_a_lookup_imports_the_modules_of_its_registry_and_the_unnamed_ones(plugin_dir, monkeypatch):
    for name in ("t12_algos", "t12_layers", "t12_thirdparty"):
        (plugin_dir / f"{name}.py").write_text("")
        monkeypatch.delitem(sys.modules, name, raising=False)
    group = "opsearch.test_plugins"
    eps = [EntryPoint("algorithms", "t12_algos", group), EntryPoint("layers", "t12_layers", group),
           EntryPoint("my_package", "t12_thirdparty", group)]
    monkeypatch.setattr(registry, "_loader", registry.EntryPointLoader(group, eps))
    registry.Registry("algorithm", "algorithms").names()
    assert "t12_algos" in sys.modules and "t12_thirdparty" in sys.modules
    assert "t12_layers" not in sys.modules
    registry.Registry("layer", "layers").names()
    assert "t12_layers" in sys.modules


def test_unregister_removes_a_plugin_and_names_an_unknown_one():
    @registry.register_algorithm("_t_unregister_me")
    class _Mine(registry.algorithms.get("random")):
        pass

    assert "_t_unregister_me" in registry.algorithms.names()
    registry.algorithms.unregister("_t_unregister_me")
    assert "_t_unregister_me" not in registry.algorithms.names()
    with pytest.raises(UserError, match="unknown algorithm '_t_unregister_me'"):
        registry.algorithms.unregister("_t_unregister_me")
