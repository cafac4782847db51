"""The plugin registry: attribution, validation, lookup errors, broken distributions."""

from __future__ import annotations

import types
from pathlib import Path

import attrs
import pytest

import varkit
from varkit.errors import PluginError
from varkit.plugins import Registry


class Greedyish(varkit.Sampler):
    name = "greedyish"

    def sample(self, logits, *, step, num_steps, generator):
        return logits.argmax(-1)


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, varkit.hookimpl(fn))
    return module


def samplers(*classes):
    def varkit_register_samplers(register):
        for cls in classes:
            register(cls)

    return varkit_register_samplers


def test_registration_is_attributed_to_its_distribution():
    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("p1", varkit_register_samplers=samplers(Greedyish)), distribution="dist-one")
    entry = reg.entry("sampler", "greedyish")
    assert entry.cls is Greedyish
    assert entry.distribution == "dist-one"


def test_duplicate_name_names_both_plugins():
    class Other(Greedyish):
        pass

    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("p1", varkit_register_samplers=samplers(Greedyish)), distribution="dist-one")
    with pytest.raises(PluginError) as info:
        reg.add(plugin_module("p2", varkit_register_samplers=samplers(Other)), distribution="dist-two")
    message = str(info.value)
    assert "'greedyish' is registered twice" in message
    assert "dist-one" in message and "dist-two" in message
    assert reg.entry("sampler", "greedyish").cls is Greedyish  # the first one stays


@pytest.mark.parametrize("bad_name", ["Greedy", "1st", "top-k", "", None])
def test_bad_name_is_rejected(bad_name):
    cls = type("Bad", (Greedyish,), {"name": bad_name})
    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match=r"must match \[a-z\]\[a-z0-9_\]\*"):
        reg.add(plugin_module("p", varkit_register_samplers=samplers(cls)))


def test_wrong_base_class_is_rejected():
    class NotASampler:
        name = "nope"

    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match=r"not a subclass of varkit\.Sampler"):
        reg.add(plugin_module("p", varkit_register_samplers=samplers(NotASampler)))


def test_config_must_be_attrs():
    cls = type("NoAttrs", (Greedyish,), {"name": "noattrs", "Config": dict})
    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="`Config` is not an attrs class"):
        reg.add(plugin_module("p", varkit_register_samplers=samplers(cls)))


def test_misspelled_hook_is_rejected():
    def varkit_register_sampler(register):  # missing the final "s"
        register(Greedyish)

    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="unknown hook") as info:
        reg.add(
            plugin_module("typo", varkit_register_sampler=varkit_register_sampler), distribution="typo-dist"
        )
    assert "typo-dist" in str(info.value)
    assert reg.names("sampler") == []


def test_hook_may_take_fewer_arguments():
    calls = []

    def varkit_register_samplers():
        calls.append(1)

    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("p", varkit_register_samplers=varkit_register_samplers))
    assert calls == [1]


def test_registration_failure_is_recorded_and_others_keep_working():
    def boom(register):
        raise RuntimeError("no GPU driver")

    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("good", varkit_register_samplers=samplers(Greedyish)), distribution="good-dist")
    reg.add(plugin_module("bad", varkit_register_samplers=boom), distribution="bad-dist")
    assert [b.distribution for b in reg.broken] == ["bad-dist"]
    assert "no GPU driver" in reg.broken[0].error
    assert reg.get("sampler", "greedyish") is Greedyish


def test_unknown_name_lists_names_and_closest_match():
    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("p", varkit_register_samplers=samplers(Greedyish)))
    with pytest.raises(PluginError) as info:
        reg.get("sampler", "greedyis")
    message = str(info.value)
    assert "unknown sampler 'greedyis'" in message
    assert "did you mean 'greedyish'?" in message
    assert "registered are: greedyish" in message


def test_unavailable_plugin_is_listed_but_refused_with_reason():
    class NeedsGPU(Greedyish):
        name = "needs_gpu"

        @classmethod
        def available(cls):
            return False, "needs a CUDA device"

    reg = Registry(load_entry_points=False)
    reg.add(plugin_module("p", varkit_register_samplers=samplers(NeedsGPU)))
    assert reg.entry("sampler", "needs_gpu").available() == (False, "needs a CUDA device")
    with pytest.raises(PluginError, match="not available on this machine: needs a CUDA device"):
        reg.get("sampler", "needs_gpu")


def test_builtins_arrive_through_entry_points(fresh_registry):
    entry = fresh_registry.entry("attention", "sdpa")
    assert entry.distribution == "varkit"
    for kind, names in {
        "attention": {"sdpa", "math"},
        "sampler": {"topk_topp", "greedy"},
    }.items():
        assert names <= set(fresh_registry.names(kind))


def test_broken_distribution_is_named_and_others_load(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[varkit]\nbroken = varkit_no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert [b.distribution for b in reg.broken] == ["broken-plugin"]
    assert "No module named 'varkit_no_such_module_here'" in reg.broken[0].error
    assert "sdpa" in reg.names("attention")


def test_plugin_configs_are_attrs_frozen_kw_only(fresh_registry):
    for entry in fresh_registry:
        config_cls = entry.cls.Config
        assert attrs.has(config_cls), entry
        config = config_cls()  # every option has a default
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            for field in attrs.fields(config_cls):
                setattr(config, field.name, getattr(config, field.name))
            raise attrs.exceptions.FrozenInstanceError  # a Config without fields is frozen too


def _fake_distribution(tmp_path, name: str, module: str, source: str) -> None:
    """An installed distribution (dist-info + module) whose entry point registers ``module``."""
    dist = tmp_path / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[varkit]\n{module} = {module}\n")
    (tmp_path / f"{module}.py").write_text(source)


CLASHING = """
import varkit


class MyGreedy(varkit.Sampler):
    name = "greedy"

    def sample(self, logits, *, step, num_steps, generator):
        return logits.argmin(-1)


class Fine(varkit.Sampler):
    name = "fine_one"

    def sample(self, logits, *, step, num_steps, generator):
        return logits.argmax(-1)


@varkit.hookimpl
def varkit_register_samplers(register):
    register(Fine)
    register(MyGreedy)
"""


def test_a_plugin_reusing_a_builtin_name_is_isolated_and_the_builtin_kept(tmp_path, monkeypatch, capsys):
    _fake_distribution(tmp_path, "clashing-plugin", "clashing_plugin_mod", CLASHING)
    monkeypatch.syspath_prepend(str(tmp_path))  # found before varkit's own entry points
    reg = Registry()
    assert reg.entry("sampler", "greedy").distribution == "varkit"
    assert "fine_one" not in reg.names("sampler")  # the whole distribution is out, as on a failed import
    (broken,) = reg.broken
    assert broken.distribution == "clashing-plugin"
    assert "'greedy' is registered twice" in broken.error and "varkit" in broken.error

    from varkit import plugins
    from varkit.cli import main

    plugins.reset()
    try:
        assert main(["plugins", "--kind", "sampler"]) == 0
        out = capsys.readouterr().out
        assert "greedy" in out and "broken  clashing-plugin: registration refused" in out
        assert main(["validate", str(Path(__file__).parent / "recipes" / "child.yaml")]) == 0
    finally:
        plugins.reset()


def _sampler_with(annotation, default):
    config = attrs.make_class(
        "Config", {"option": attrs.field(default=default, type=annotation)}, frozen=True
    )
    return type("Typed", (Greedyish,), {"name": "typed", "Config": config})


@pytest.mark.parametrize(
    ("annotation", "default"),
    [(set, frozenset()), (frozenset[int], frozenset()), (complex, 1j), (type, int), (list[complex], [])],
)
def test_a_config_field_the_recipe_loader_cannot_fill_is_refused_at_registration(annotation, default):
    reg = Registry(load_entry_points=False)
    with pytest.raises(PluginError) as info:
        reg.add(
            plugin_module("p", varkit_register_samplers=samplers(_sampler_with(annotation, default))),
            distribution="typed-dist",
        )
    message = str(info.value)
    assert (
        "'typed-dist' registered" in message and "Config field 'option' cannot come from a recipe" in message
    )


@pytest.mark.parametrize(
    ("annotation", "default", "yaml_value", "expected"),
    [
        (tuple, (), [1, "a"], (1, "a")),
        (list[int], [], [1, 2], [1, 2]),
        (list, [], [1, "x"], [1, "x"]),
        (Path, Path("."), "/ckpt/w.pth", Path("/ckpt/w.pth")),
        (Path | None, None, "a/b", Path("a/b")),
        (dict, {}, {"a": 1}, {"a": 1}),
    ],
)
def test_config_fields_of_collection_and_path_types_come_from_recipes(
    annotation, default, yaml_value, expected
):
    from varkit.config_types import Problem, structure_attrs, unstructure

    cls = _sampler_with(annotation, default)
    Registry(load_entry_points=False).add(plugin_module("p", varkit_register_samplers=samplers(cls)))
    problems: list[Problem] = []
    config = structure_attrs(cls.Config, {"option": yaml_value}, "sampler", problems)
    assert not problems and config.option == expected
    round_trip = structure_attrs(cls.Config, unstructure(config), "sampler", problems)
    assert not problems and round_trip == config


def test_a_bad_element_of_a_list_field_names_its_index():
    from varkit.config_types import Problem, structure_attrs

    problems: list[Problem] = []
    structure_attrs(_sampler_with(list[int], []).Config, {"option": [1, "two"]}, "sampler", problems)
    assert [p.path for p in problems] == ["sampler.option[1]"]
