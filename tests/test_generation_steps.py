"""How the loop runs its steps: one autocast region, bf16 weights, static-shape steps, CUDA graphs.

The CUDA-graph runner is checked on CPU with an eager stand-in for the capture (same
static buffers, same static-shape steps, same reuse across calls); the real graphs
run in the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model, tokenizer_for

from varkit.errors import VarkitError
from varkit.generation import Generation, generate_codes, generate_images
from varkit.generation.graphs import GraphedSteps
from varkit.pipeline import Pipeline
from varkit.plugins import registry

UNITS = [entry.name for entry in registry() if entry.kind == "unit"]
VARIANTS = {"token": [{}, {"position": "rope2d"}], "patch": [{}, {"position": "rope2d", "k": 2}]}
CASES = [
    pytest.param(name, options, id=f"{name}-{options or 'default'}")
    for name in UNITS
    for options in VARIANTS.get(name, [{}])
]
NUM_CLASSES = 4


def _setup(name, options=None, seed=0, device="cpu"):
    torch.manual_seed(seed)
    tokenizer = tokenizer_for(name)
    cls = registry().get("unit", name)
    unit = cls(cls.Config(**(options or {})), tokenizer=tokenizer, width=32)
    model = tiny_model(unit, tokenizer, num_classes=NUM_CLASSES).eval()
    return model.to(device), tokenizer.to(device)


def _sampler(name="topk_topp", **options):
    cls = registry().get("sampler", name)
    return cls(cls.Config(**options))


def eager_capture(fn, pool):
    """A stand-in for :func:`varkit.generation.graphs.cuda_capture`: replays by running ``fn``
    again into the same output buffer."""
    out = fn()

    def replay():
        out.copy_(fn())

    return replay, out, pool


def _run(model, tokenizer, sampler, labels, seed, runner=None, dtype=None):
    with torch.inference_mode():
        gen = Generation(
            model.eval(),
            tokenizer,
            sampler,
            labels,
            generator=torch.Generator(labels.device).manual_seed(seed),
            dtype=dtype,
            runner=runner,
        )
        codes, _ = gen.run()
    return codes


# --------------------------------------------------------------------------- precision


def test_one_autocast_region_per_generation(monkeypatch):
    """Autocast's cast cache is dropped once per generation, not after every step."""
    model, tokenizer = _setup("token")
    cleared = []
    original = torch.clear_autocast_cache
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (cleared.append(1), original())[1])
    generate_codes(
        model, tokenizer, _sampler(), torch.tensor([0, 1]), generator=torch.Generator(), dtype=torch.bfloat16
    )
    assert len(model.unit.step_lengths) == 16 and cleared == [1]


@pytest.mark.parametrize("name", UNITS)
def test_bfloat16_weights_generate_without_autocast(name, monkeypatch):
    model, tokenizer = _setup(name)
    pipe = Pipeline(tokenizer, model, sampler=_sampler(cfg=1.5))
    assert pipe.to(dtype=torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    assert next(tokenizer.parameters()).dtype == torch.float32  # the tokenizer stays float32
    monkeypatch.setattr(torch, "autocast", None)  # any autocast would fail loudly
    images = pipe.generate([0, 1, 2], seed=0)
    assert images.dtype == torch.float32 and images.shape[:2] == (3, 3) and torch.isfinite(images).all()


def test_bad_dtypes_are_refused():
    model, tokenizer = _setup("scale")
    with pytest.raises(VarkitError, match="not an autocast dtype"):
        generate_codes(
            model, tokenizer, _sampler(), torch.tensor([0]), generator=torch.Generator(), dtype=torch.int8
        )
    with pytest.raises(VarkitError, match="not a floating-point dtype"):
        Pipeline(tokenizer, model, sampler=_sampler()).to(dtype=torch.int64)


# ------------------------------------------------------------------- static-shape steps


@pytest.mark.parametrize(("name", "options"), CASES)
def test_static_shape_steps_give_the_sliced_steps_logits(name, options):
    """forward_step(position=tensor): positions gathered, cache written by index, masked by position."""
    model, tokenizer = _setup(name, options)
    codes = [
        torch.randint(0, tokenizer.vocab_size, (2, h, w), generator=torch.Generator().manual_seed(1))
        for h, w in tokenizer.schedule
    ]
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        inputs = model.unit.teacher_forcing(codes, tokenizer)
        sliced, static = model.new_cache(2), model.new_cache(2, static=True)
        starts = model.step_starts
        for step in range(len(model.unit.step_lengths)):
            x = None if step == 0 else inputs[:, starts[step] - starts[1] : starts[step + 1] - starts[1]]
            a = model.forward_step(x, labels, sliced, step)
            b = model.forward_step(x, labels, static, step, position=torch.tensor(starts[step]))
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static.kv, sliced.kv, rtol=1e-5, atol=1e-5)
        assert static.write_index is None


@pytest.mark.parametrize(("name", "options"), CASES)
def test_graph_runner_gives_the_eager_codes_and_reuses_its_graphs(name, options):
    model, tokenizer = _setup(name, options)
    sampler = _sampler(cfg=1.5, top_k=8, top_p=0.9)
    labels = torch.tensor([0, 3, 1])
    runner = GraphedSteps(model, capture=eager_capture)
    eager = _run(model, tokenizer, sampler, labels, seed=4)
    graphed = _run(model, tokenizer, sampler, labels, seed=4, runner=runner)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))

    lengths = model.unit.step_lengths
    keys = set(runner.graphs)
    if len(set(lengths[1:])) == len(lengths) - 1:  # every later step has its own length (scale)
        assert keys == {("step", s) for s in range(len(lengths))}
    else:  # token/patch: step 0, then one static-shape graph for every later step
        assert keys == {("step", 0), ("static", lengths[1])}
    graphs = dict(runner.graphs)

    # A second call (other labels, other seed) replays the same graphs.
    labels = torch.tensor([2, 2, 4])
    again = _run(model, tokenizer, sampler, labels, seed=9, runner=runner)
    assert runner.graphs == graphs
    assert all(torch.equal(a, b) for a, b in zip(again, _run(model, tokenizer, sampler, labels, seed=9)))

    # Another batch size needs other graphs.
    _run(model, tokenizer, sampler, torch.tensor([1]), seed=0, runner=runner)
    assert all(runner.graphs[k] is not graphs[k] for k in graphs)


def test_cuda_graphs_need_a_cuda_device():
    model, tokenizer = _setup("scale")
    with pytest.raises(VarkitError, match="cuda_graphs=True replays CUDA graphs, but the model runs on cpu"):
        generate_images(
            model, tokenizer, _sampler(), torch.tensor([0]), generator=torch.Generator(), cuda_graphs=True
        )


# ------------------------------------------------------------------------------ on CUDA

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_replay_the_steps_they_recorded(name, options, dtype):
    """Replayed graphs give the codes of the same steps run eagerly, on the first call (which
    records them) and on later ones; per-step graphs (scale) give the plain eager loop's."""
    model, tokenizer = _setup(name, options, device="cuda")
    sampler = _sampler(cfg=1.5, top_k=8, top_p=0.9)
    labels = torch.tensor([0, 3, 1, 2], device="cuda")
    static = GraphedSteps(model, capture=eager_capture)
    for seed in (0, 1):
        graphed, _ = generate_codes(
            model,
            tokenizer,
            sampler,
            labels,
            generator=torch.Generator("cuda").manual_seed(seed),
            dtype=dtype,
            cuda_graphs=True,
        )
        same_steps = _run(model, tokenizer, sampler, labels, seed, runner=static, dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(graphed, same_steps))
        if name == "scale":
            eager = _run(model, tokenizer, sampler, labels, seed, dtype=dtype)
            assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


@pytest.mark.gpu
@NO_CUDA
def test_pipeline_in_bfloat16_with_cuda_graphs_decodes_channels_last():
    model, tokenizer = _setup("scale", device="cuda")
    pipe = Pipeline(tokenizer, model, sampler=_sampler(cfg=1.5)).to("cuda", dtype=torch.bfloat16)
    eager = pipe.generate([0, 1], seed=3)
    graphed = pipe.generate([0, 1], seed=3, cuda_graphs=True)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert eager.dtype == torch.float32 and eager.min() >= 0 and eager.max() <= 1
