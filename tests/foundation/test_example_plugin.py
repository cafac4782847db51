"""The third-party example package: installed with pip, found through its entry point."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "examples" / "plugin-minp"
HERE = Path(__file__).parent / "recipes"


def pip(*args):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def installed_minp():
    already = importlib.util.find_spec("varkit_minp") is not None
    if not already:
        flags = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        proc = pip("install", "--no-deps", *flags, "-e", str(EXAMPLE))
        assert proc.returncode == 0, proc.stderr
    # The editable install's import hook is read at interpreter start; this process
    # finds the package through its source directory (the entry point is in site-packages).
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
        importlib.invalidate_caches()
    from varkit import plugins

    plugins.reset()
    yield
    if not already:
        pip("uninstall", "-y", "varkit-minp")
    plugins.reset()


def test_varkit_plugins_lists_min_p_with_its_distribution(installed_minp):
    proc = subprocess.run(
        [sys.executable, "-m", "varkit", "plugins", "--kind", "sampler"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["sampler", "min_p", "varkit-minp", "yes"] in rows


def test_recipe_with_min_p_uses_it(installed_minp):
    from varkit import recipe as recipe_mod
    from varkit.build import build_sampler

    r = recipe_mod.load(HERE / "base.yaml", ["sampler.name=min_p", "sampler.min_p=0.5"])
    sampler = build_sampler(r)
    assert type(sampler).__module__ == "varkit_minp" and sampler.config.min_p == 0.5
    # With min_p=0.5 only codes within half the top probability survive: here codes 0 and 1.
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.1, 0.1]]])).expand(1, 64, 4)
    codes = sampler.sample(logits, step=1, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert set(codes.unique().tolist()) == {0, 1}


def test_the_example_packages_own_tests_pass(installed_minp):
    """Its tests use varkit.testing, as any plugin package can."""
    spec = importlib.util.spec_from_file_location("minp_tests", EXAMPLE / "tests" / "test_minp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()
