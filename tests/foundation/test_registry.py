"""The plugin registry: attribution, validation, lookup errors, broken distributions."""

from __future__ import annotations

import types

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
