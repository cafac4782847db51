"""Generation strategies: the extension point and the built-in ``collaborative`` and ``jacobi``."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from helpers.tiny import tiny_model, tokenizer_for

from varkit import recipe as recipe_mod
from varkit.base import Strategy
from varkit.build import build_strategy
from varkit.errors import VarkitError
from varkit.generation import generate_codes
from varkit.generation.loop import Generation
from varkit.hookspecs import hookimpl
from varkit.plugins import registry

RASTER = ["token", "patch"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: a second thread only waits for the other (2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sampler(name="topk_topp", **options):
    cls = registry().get("sampler", name)
    return cls(cls.Config(**options))


def setup(unit_name, *, seed=0, num_classes=4, **model_options):
    tokenizer = tokenizer_for(unit_name)
    torch.manual_seed(seed)
    model = tiny_model(unit_name, tokenizer, num_classes=num_classes, **model_options).eval()
    return model, tokenizer


def codes_of(model, tokenizer, smp, labels, seed=0, **kwargs):
    codes, f_hat = generate_codes(
        model, tokenizer, smp, labels, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return codes, f_hat


def reference_codes(model, tokenizer, smp, labels, seed=0):
    """The step loop written out by hand: forward_step, guidance, sampling, the unit."""
    g = torch.Generator().manual_seed(seed)
    num_steps = len(model.unit.step_lengths)
    ts = [smp.guidance_scale(s, num_steps) for s in range(num_steps)]
    doubled = any(t != 0 for t in ts)
    both = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if doubled else labels
    cache = model.new_cache(both.shape[0])
    state = model.unit.start_generation(labels.shape[0], tokenizer)
    inputs = None
    with torch.inference_mode():
        for step in range(num_steps):
            x = torch.cat([inputs, inputs]) if doubled and inputs is not None else inputs
            logits = model.forward_step(x, both, cache, step)
            cond, uncond = logits.chunk(2) if doubled else (logits, None)
            codes, weights = smp.sample_guided(
                cond, uncond, t=ts[step], step=step, num_steps=num_steps, generator=g
            )
            emb = tokenizer.embed(codes) if weights is None else weights @ tokenizer.codebook
            inputs = model.unit.generation_step(state, step, codes, emb, tokenizer)
        return model.unit.generated_codes(state), model.unit.finish_generation(state, tokenizer)


class Stepwise(Strategy):
    """Every step in order through the phases: what a strategy that changes nothing does."""

    name = "stepwise"

    def run(self, gen) -> None:
        for step in range(gen.num_steps):
            logits = gen.forward(step)
            with gen.full_precision():
                gen.accept(step, *gen.choose(step, logits))


# ------------------------------------------------------------------- the extension point


@pytest.mark.parametrize("unit_name", ["scale", *RASTER])
@pytest.mark.parametrize(
    "smp", [sampler(cfg=1.5, top_k=8), sampler("gumbel", cfg=0.0)], ids=["topk", "gumbel"]
)
def test_without_a_strategy_generation_is_the_plain_step_loop(unit_name, smp):
    model, tokenizer = setup(unit_name)
    labels = torch.tensor([0, 3])
    codes, f_hat = codes_of(model, tokenizer, smp, labels)
    ref_codes, ref_f_hat = reference_codes(model, tokenizer, smp, labels)
    assert all(torch.equal(a, b) for a, b in zip(codes, ref_codes, strict=True))
    assert torch.equal(f_hat, ref_f_hat)
    # a strategy driving the phases step by step changes nothing either
    again, again_f_hat = codes_of(model, tokenizer, smp, labels, strategy=Stepwise())
    assert all(torch.equal(a, b) for a, b in zip(codes, again, strict=True))
    assert torch.equal(f_hat, again_f_hat)


PREFIX = {"conditioning": "prefix", "class_tokens": 3}


@pytest.mark.parametrize(
    ("unit_name", "options"), [("scale", {}), ("token", {}), ("patch", {}), ("token", PREFIX)], ids=str
)
@pytest.mark.parametrize("first", [0, 1])
def test_forward_steps_is_the_steps_one_by_one(unit_name, options, first):
    model, tokenizer = setup(unit_name, **options)
    labels = torch.tensor([1, 2])
    codes = [torch.randint(0, tokenizer.vocab_size, (2, h, w)) for h, w in tokenizer.schedule]
    inputs = model.unit.teacher_forcing(codes, tokenizer)  # (b, l - l_0, c)
    starts = [s - model.step_starts[1] for s in model.step_starts[1:]]  # of steps 1.. in inputs
    last = min(len(model.unit.step_lengths), first + 3)
    with torch.inference_mode():
        one = model.new_cache(2)
        stepwise = []
        for step in range(last):
            x = None if step == 0 else inputs[:, starts[step - 1] : starts[step]]
            stepwise.append(model.forward_step(x, labels, one, step))
        span_cache = model.new_cache(2)
        for step in range(first):
            model.forward_step(
                None if step == 0 else inputs[:, starts[step - 1] : starts[step]], labels, span_cache, step
            )
        span = model.forward_steps(
            inputs[:, starts[max(first, 1) - 1] : starts[last - 1]], labels, span_cache, first, last
        )
    torch.testing.assert_close(span, torch.cat(stepwise[first:last], dim=1), atol=1e-5, rtol=1e-5)
    assert span_cache.length == one.length
    torch.testing.assert_close(
        span_cache.kv[..., : one.length, :], one.kv[..., : one.length, :], atol=1e-5, rtol=1e-5
    )


def test_a_strategy_must_accept_every_step_in_order():
    class Lazy(Strategy):
        name = "lazy"

        def run(self, gen):
            gen.accept(0, *gen.choose(0, gen.forward(0)))

    class Skipper(Strategy):
        name = "skipper"

        def run(self, gen):
            gen.forward(0)
            gen.accept(1, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 8))

    model, tokenizer = setup("scale")
    with pytest.raises(VarkitError, match="accepted 1 of 3 steps"):
        codes_of(model, tokenizer, sampler(), torch.tensor([0]), strategy=Lazy())
    with pytest.raises(VarkitError, match="out of order"):
        codes_of(model, tokenizer, sampler(), torch.tensor([0]), strategy=Skipper())


def test_a_strategy_refuses_a_unit_it_does_not_support_naming_both():
    model, tokenizer = setup("scale")
    with pytest.raises(VarkitError, match=r"strategy 'jacobi' does not work with unit 'scale'"):
        codes_of(model, tokenizer, sampler(), torch.tensor([0]), strategy="jacobi")


def test_strategy_options_without_a_strategy_or_unknown_are_refused():
    model, tokenizer = setup("token")
    with pytest.raises(VarkitError, match="without a strategy"):
        codes_of(model, tokenizer, sampler(), torch.tensor([0]), window=4)
    with pytest.raises(VarkitError, match="has no option 'windw'"):
        codes_of(model, tokenizer, sampler(), torch.tensor([0]), strategy="jacobi", windw=4)


# --------------------------------------------------------------------------- jacobi


@pytest.mark.parametrize(
    ("unit_name", "options"),
    [("token", {}), ("patch", {}), ("token", PREFIX)],
    ids=["token", "patch", "prefix"],
)
@pytest.mark.parametrize("window", [2, 5, 64])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_jacobi_with_greedy_sampling_gives_the_plain_greedy_codes(unit_name, options, window, cfg):
    model, tokenizer = setup(unit_name, **options)
    labels = torch.tensor([0, 1, 3])
    greedy = sampler("greedy", cfg=cfg)
    plain, _ = codes_of(model, tokenizer, greedy, labels)
    for adaptive in (True, False):
        fast, _ = codes_of(
            model, tokenizer, greedy, labels, strategy="jacobi", window=window, adaptive=adaptive
        )
        assert torch.equal(plain[0], fast[0])


def test_jacobi_accepts_several_steps_per_pass_where_the_model_is_predictable():
    """A model trained to copy one code everywhere: drafted copies are right, passes are few."""
    from helpers.tiny import train_steps

    model, tokenizer = setup("token")
    codes = [torch.full((4, 4, 4), 5)]
    train_steps(model, tokenizer, codes, torch.tensor([0, 1, 2, 3]), steps=40)
    model.eval()
    gen = Generation(
        model, tokenizer, sampler("greedy", cfg=0.0), torch.tensor([0]), generator=torch.Generator()
    )
    with torch.inference_mode():
        codes_out, _ = gen.run_strategy(registry().get("strategy", "jacobi")())
    assert (codes_out[0] == 5).all()
    assert gen.forward_passes < gen.num_steps / 2


def test_jacobi_keeps_the_distribution_of_a_stochastic_sampler():
    """Every accepted code is a fresh draw given the accepted prefix: the codes of two
    steps follow the same joint law as plain generation (a two-sample check).

    The model is trained a little on maps whose codes count up (c, c+1, c+2, ... mod 3),
    so each step depends on the one before, softly: a rule that kept a draw made from a
    wrong draft would shift the joint law of neighbouring steps.
    """
    from helpers.tiny import train_steps

    tokenizer = FakeTokenizer(FakeConfig(schedule=(2,), vocab_size=3))
    torch.manual_seed(3)
    model = tiny_model("token", tokenizer)
    maps = torch.stack([(torch.arange(4) + c) % 3 for c in range(3)]).reshape(3, 2, 2)
    train_steps(model, tokenizer, [maps], torch.zeros(3, dtype=torch.long), steps=12, lr=1e-2)
    model.eval()
    smp = sampler(cfg=0.0, top_k=0, top_p=1.0)
    labels = torch.tensor([0])
    counts = {}
    for how in ("plain", "jacobi"):
        pairs = torch.zeros(9)
        for seed in range(500):
            options = {"strategy": "jacobi", "window": 4} if how == "jacobi" else {}
            (codes,), _ = codes_of(model, tokenizer, smp, labels, seed=seed, **options)
            flat = codes.flatten()
            pairs[flat[1] * 3 + flat[2]] += 1
        counts[how] = pairs
    # chi-square statistic of a 2 x 9 contingency table; 8 degrees of freedom, p = 0.001 at 26.1
    table = torch.stack([counts["plain"], counts["jacobi"]]) + 1e-9
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.1, (counts, chi2)


# ------------------------------------------------------------------- collaborative


@pytest.mark.parametrize("switch_step", [1, 2])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_collaborative_with_the_refiner_as_drafter_is_plain_generation(switch_step, cfg):
    model, tokenizer = setup("scale")
    labels = torch.tensor([0, 2])
    smp = sampler(cfg=cfg, top_k=8)
    plain, plain_f_hat = codes_of(model, tokenizer, smp, labels, seed=5)
    drafter = types.SimpleNamespace(model=copy.deepcopy(model), tokenizer=tokenizer)
    fast, f_hat = codes_of(
        model,
        tokenizer,
        smp,
        labels,
        seed=5,
        strategy="collaborative",
        draft=drafter,
        switch_step=switch_step,
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, fast, strict=True))
    torch.testing.assert_close(f_hat, plain_f_hat)


def test_collaborative_runs_the_early_steps_with_the_drafter():
    model, tokenizer = setup("scale", seed=0)
    other, _ = setup("scale", seed=1)
    labels = torch.tensor([0, 2])
    smp = sampler(cfg=1.5, top_k=8)
    drafted, _ = codes_of(other, tokenizer, smp, labels, seed=2)
    gen = Generation(model, tokenizer, smp, labels, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        mixed, _ = gen.run_strategy(
            registry().get("strategy", "collaborative")(
                registry().get("strategy", "collaborative").Config(switch_step=2)
            ),
            draft=types.SimpleNamespace(model=other, tokenizer=tokenizer),
        )
    assert torch.equal(mixed[0], drafted[0]) and torch.equal(mixed[1], drafted[1])
    assert gen.stats["draft_passes"] == 2 and gen.forward_passes == 2  # one prefill pass, one step


def _collab(model, tokenizer, draft, switch_step=1):
    return codes_of(
        model,
        tokenizer,
        sampler(),
        torch.tensor([0]),
        strategy="collaborative",
        draft=draft,
        switch_step=switch_step,
    )


def test_collaborative_refuses_bad_drafters_and_switch_steps():
    model, tokenizer = setup("scale")
    pair = (copy.deepcopy(model), tokenizer)
    for k in (0, 3, None):
        with pytest.raises(VarkitError, match=r"switch_step is .* must lie in \[1, 2\]"):
            _collab(model, tokenizer, pair, switch_step=k)
    with pytest.raises(VarkitError, match="needs a drafter"):
        _collab(model, tokenizer, None)
    with pytest.raises(VarkitError, match="is a path; load it first"):
        _collab(model, tokenizer, "runs/big")
    other_classes, _ = setup("scale", num_classes=7)
    with pytest.raises(VarkitError, match="drafter has 7 classes, the refiner 4"):
        _collab(model, tokenizer, (other_classes, tokenizer))
    wider = FakeTokenizer(FakeConfig(schedule=(1, 2, 4), vocab_size=64))
    with pytest.raises(VarkitError, match="tokenizer's vocab_size is 64, the refiner's 32"):
        _collab(model, tokenizer, (tiny_model("scale", wider), wider))
    finer = FakeTokenizer(FakeConfig(schedule=(1, 4)))
    with pytest.raises(VarkitError, match="tokenizer's schedule"):
        _collab(model, tokenizer, (tiny_model("scale", finer), finer))
    retrained = copy.deepcopy(tokenizer)
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(1.0)
    with pytest.raises(VarkitError, match="another codebook"):
        _collab(model, tokenizer, (copy.deepcopy(model), retrained))


# ------------------------------------------------------------------- recipes and CLI

RECIPES = Path(__file__).parent / "foundation" / "recipes"


def test_a_recipe_has_no_strategy_unless_it_names_one():
    plain = recipe_mod.load(RECIPES / "base.yaml")
    assert plain.strategy is None and "strategy" not in plain.to_dict()
    r = recipe_mod.load(RECIPES / "base.yaml", ["strategy=collaborative", "strategy.switch_step=3"])
    assert r.strategy.name == "collaborative" and r.strategy.config.switch_step == 3
    assert recipe_mod.from_dict(r.to_dict()) == r
    chosen, models = build_strategy(r)
    assert chosen.name == "collaborative" and models == {}


def test_cli_refuses_a_strategy_that_does_not_support_the_unit(capsys):
    from varkit.cli import main

    assert main(["validate", str(RECIPES / "base.yaml"), "strategy=jacobi", "--schema-only"]) == 2
    err = capsys.readouterr().err
    assert "strategy 'jacobi' does not work with unit 'scale'" in err and "token, patch" in err


def test_varkit_plugins_lists_the_strategies(capsys):
    from varkit.cli import main

    assert main(["plugins", "--kind", "strategy"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["strategy", "collaborative", "varkit", "yes"] in rows
    assert ["strategy", "jacobi", "varkit", "yes"] in rows


# -------------------------------------------------------------------- prune_tokens


def test_prune_tokens_at_ratio_one_is_plain_generation():
    model, tokenizer = setup("scale")
    labels = torch.tensor([0, 2])
    smp = sampler(cfg=1.5, top_k=8)
    plain, plain_f_hat = codes_of(model, tokenizer, smp, labels, seed=4)
    same, f_hat = codes_of(model, tokenizer, smp, labels, seed=4, strategy="prune_tokens", ratios=[1.0])
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    assert torch.equal(f_hat, plain_f_hat)


def test_forward_positions_of_every_position_is_forward_step():
    model, tokenizer = setup("scale")
    labels = torch.tensor([1, 3])
    inputs = torch.randn(2, 4, tokenizer.code_dim)
    with torch.inference_mode():
        a, b = model.new_cache(2), model.new_cache(2)
        model.forward_step(None, labels, a, 0)
        model.forward_step(None, labels, b, 0)
        whole = model.forward_step(inputs, labels, a, 1)
        some = model.forward_positions(inputs, labels, b, 1, torch.arange(4))
    torch.testing.assert_close(some, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.kv[..., : a.length, :], a.kv[..., : a.length, :], atol=1e-5, rtol=1e-5)


def test_skipped_positions_are_invisible_to_later_steps():
    """What a skipped position is fed changes nothing: not the kept positions, not later steps."""
    model, tokenizer = setup("scale")
    labels = torch.tensor([1, 3])
    step1, step2 = torch.randn(2, 4, tokenizer.code_dim), torch.randn(2, 16, tokenizer.code_dim)
    index = torch.tensor([0, 3])
    outs = []
    for noise in (0.0, 5.0):
        x = step1.clone()
        x[:, [1, 2]] += noise
        with torch.inference_mode():
            cache = model.new_cache(2)
            model.forward_step(None, labels, cache, 0)
            kept = model.forward_positions(x, labels, cache, 1, index)
            later = model.forward_step(step2, labels, cache, 2)
        outs.append((kept, later))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_prune_tokens_runs_fewer_positions():
    tokenizer = FakeTokenizer(FakeConfig(schedule=(1, 2, 4, 8)))
    model = tiny_model("scale", tokenizer).eval()
    smp = sampler(cfg=1.5, top_k=8)
    gen = Generation(model, tokenizer, smp, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    cls = registry().get("strategy", "prune_tokens")
    with torch.inference_mode():
        codes, f_hat = gen.run_strategy(cls(cls.Config(ratios=(0.5, 0.25))))
    assert [tuple(c.shape) for c in codes] == [(2, 1, 1), (2, 2, 2), (2, 4, 4), (2, 8, 8)]
    assert gen.stats == {"positions_run": 1 + 4 + 8 + 16, "positions": 85}
    assert torch.isfinite(f_hat).all()
    with pytest.raises(VarkitError, match="prune at most the last 2"):
        codes_of(model, tokenizer, smp, torch.tensor([0]), strategy="prune_tokens", ratios=[0.5, 0.5, 0.5])
    with pytest.raises(VarkitError, match=r"ratios must lie in \(0, 1\]"):
        codes_of(model, tokenizer, smp, torch.tensor([0]), strategy="prune_tokens", ratios=[0.0])


# ------------------------------------------------- a third-party strategy, through a recipe


class Counted(Strategy):
    """A plugin's strategy: every step in order, counting its runs (that it registers and runs)."""

    name = "counted"
    units = ("token", "patch")
    runs = 0

    def run(self, gen) -> None:
        type(self).runs += 1
        for step in range(gen.num_steps):
            logits = gen.forward(step)
            with gen.full_precision():
                gen.accept(step, *gen.choose(step, logits))


def _plugin_module():
    module = types.ModuleType("my_strategies")

    @hookimpl
    def varkit_register_strategies(register):
        register(Counted)

    module.varkit_register_strategies = varkit_register_strategies
    return module


def test_a_third_party_strategy_registers_and_runs_through_a_recipe(fresh_registry, capsys):
    from varkit.cli import main
    from varkit.pipeline import Pipeline

    fresh_registry.add(_plugin_module(), distribution="my-strategies")
    assert main(["plugins", "--kind", "strategy"]) == 0
    assert ["strategy", "counted", "my-strategies", "yes"] in [
        line.split() for line in capsys.readouterr().out.splitlines()
    ]
    recipe = recipe_mod.load(RECIPES / "base.yaml", ["unit=token", "tokenizer=vq", "strategy=counted"])
    assert recipe.strategy.name == "counted"
    model, tokenizer = setup("token")
    pipe = Pipeline(tokenizer, model, recipe=recipe)
    Counted.runs = 0
    images = pipe.generate([0, 1], seed=3)
    assert Counted.runs == 1 and images.shape[:2] == (2, 3)
    # the same images as plain generation: the strategy changes nothing
    plain = Pipeline(
        tokenizer, model, recipe=recipe_mod.load(RECIPES / "base.yaml", ["unit=token", "tokenizer=vq"])
    )
    assert torch.equal(images, plain.generate([0, 1], seed=3))
    # a unit it does not support: refused, naming both (the CLI exits 2)
    assert main(["validate", str(RECIPES / "base.yaml"), "strategy=counted", "--schema-only"]) == 2
    assert "strategy 'counted' does not work with unit 'scale'" in capsys.readouterr().err
    scale_model, scale_tokenizer = setup("scale")
    with pytest.raises(VarkitError, match="strategy 'counted' does not work with unit 'scale'"):
        Pipeline(scale_tokenizer, scale_model, recipe=recipe_mod.load(RECIPES / "base.yaml")).generate(
            [0], strategy="counted"
        )


def test_a_recipe_names_the_drafter_by_path_and_the_pipeline_loads_it(tmp_path):
    from varkit.build import build_model, build_tokenizer
    from varkit.pipeline import Pipeline

    tiny = [
        "tokenizer.image_size=32", "tokenizer.ch=16", "tokenizer.ch_mult=[1,2,2]", "tokenizer.num_res_blocks=1",
        "tokenizer.norm_groups=8", "tokenizer.vocab_size=64", "tokenizer.code_dim=8", "tokenizer.schedule=[1,2,4,8]",
        "data.resolution=32", "model.depth=1", "model.width=32", "model.heads=2", "model.num_classes=10", "data.num_classes=10",
    ]  # fmt: skip
    recipe = recipe_mod.load(RECIPES / "base.yaml", tiny)
    tokenizer = build_tokenizer(recipe)
    torch.manual_seed(1)
    Pipeline(tokenizer, build_model(recipe, tokenizer), recipe=recipe).save_pretrained(tmp_path / "big")
    with_strategy = recipe_mod.load(
        RECIPES / "base.yaml",
        [*tiny, "strategy=collaborative", f"strategy.draft={tmp_path / 'big'}", "strategy.switch_step=3"],
    )
    refiner = Pipeline(tokenizer, build_model(recipe, tokenizer), recipe=with_strategy)
    drafted = refiner.generate([0, 9], seed=1)
    assert len(refiner._companions) == 1
    big = next(iter(refiner._companions.values()))
    assert torch.equal(
        drafted, refiner.generate([0, 9], seed=1, strategy="collaborative", draft=big, switch_step=3)
    )
    assert not torch.equal(drafted, refiner.generate([0, 9], seed=1, strategy="prune_tokens", ratios=[1.0]))
