"""What the runtime does to the model before training: activation checkpointing, compile,
FSDP2 mixed precision, the EMA update, and how streamed images are encoded."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny import random_codes, tokenizer_for
from train_helpers import tiny_recipe

from varkit.model.transformer import ARModel, ModelConfig
from varkit.plugins import registry
from varkit.train import distributed as D
from varkit.train.ar import ARStage
from varkit.train.distributed import DistEnv
from varkit.train.ema import EMA
from varkit.train.loop import TrainingLoop
from varkit.train.metrics import read_metrics


def _model(**options) -> tuple[ARModel, object]:
    tokenizer = tokenizer_for("scale")
    unit_cls = registry().get("unit", "scale")
    unit = unit_cls(unit_cls.Config(), tokenizer=tokenizer, width=32)
    config = ModelConfig(depth=3, width=32, heads=2, num_classes=4, **options)
    attention = registry().get("attention", "sdpa")()
    torch.manual_seed(0)
    model = ARModel(
        config, unit=unit, attention=attention, vocab_size=tokenizer.vocab_size, code_dim=tokenizer.code_dim
    )
    return model, tokenizer


def _step(model, tokenizer, seed: int = 1):
    """One training forward and backward from ``seed``: loss, gradients, saved tensors, RNG after."""
    codes = random_codes(tokenizer, 4, seed=0)
    inputs, targets = model.unit.teacher_forcing(codes, tokenizer), model.unit.targets(codes)
    labels = torch.tensor([0, 1, 2, 3])
    saved = []
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(inputs, labels).flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved), torch.get_rng_state()


def test_activation_checkpointing_is_bitwise_the_same_step_with_fewer_saved_activations():
    # drop path, dropout and class dropout: the recompute must replay the same draws
    plain, tokenizer = _model(drop_path=0.5, dropout=0.1, class_dropout=0.5)
    checkpointed = copy.deepcopy(plain)
    D.checkpoint_activations(checkpointed)
    D.checkpoint_activations(checkpointed)  # applying it twice is harmless
    plain.train(), checkpointed.train()
    loss_a, grads_a, saved_a, rng_a = _step(plain, tokenizer)
    loss_b, grads_b, saved_b, rng_b = _step(checkpointed, tokenizer)
    assert torch.equal(loss_a, loss_b) and torch.equal(rng_a, rng_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert saved_b < 0.6 * saved_a, (saved_a, saved_b)  # only the blocks' inputs are kept
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on what it traces
def test_blocks_compile_on_their_own_and_give_the_same_step():
    plain, tokenizer = _model(drop_path=0.0, class_dropout=0.0)
    compiled = copy.deepcopy(plain)
    D.checkpoint_activations(compiled)
    D.compile_model(compiled, "blocks", backend="eager")  # dynamo's tracing without a code generator
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert compiled._compiled_call_impl is None
    plain.train(), compiled.train()
    loss_a, grads_a, _, _ = _step(plain, tokenizer)
    loss_b, grads_b, _, _ = _step(compiled, tokenizer)
    torch.testing.assert_close(loss_b, loss_a)
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key])
    whole = copy.deepcopy(plain)
    D.compile_model(whole, "model", backend="eager")
    assert whole._compiled_call_impl is not None
    with pytest.raises(ValueError, match="unknown compile mode"):
        D.compile_model(whole, "layers")


def test_the_ar_stage_checkpoints_and_compiles_before_it_wraps(tmp_path, fake_stream, monkeypatch):
    recipe = tiny_recipe(tmp_path, train={"compile": "blocks", "activation_checkpointing": True, "ema": 0.9})
    stage = ARStage(recipe, tokenizer_for("scale"), DistEnv(), tmp_path)
    seen = {}
    real_wrap = D.wrap_model

    def wrap(model, env, mode, *, mixed_precision=None):
        seen["compiled"] = all(b._compiled_call_impl is not None for b in model.blocks)
        seen["checkpointed"] = all(b.forward.func is D._checkpointed for b in model.blocks)
        return real_wrap(model, env, mode, mixed_precision=mixed_precision)

    monkeypatch.setattr(D, "wrap_model", wrap)
    stage.distribute()
    assert seen == {"compiled": True, "checkpointed": True} and stage.net is stage.model
    assert stage.ema is not None


def test_a_run_with_activation_checkpointing_trains_bitwise_like_one_without(tmp_path, fake_stream):
    from varkit import checkpoint as ck
    from varkit.train import run

    model = {"drop_path": 0.3, "depth": 2}
    run(tiny_recipe(tmp_path / "a", model=model, train={"steps": 3}))
    run(tiny_recipe(tmp_path / "b", model=model, train={"steps": 3, "activation_checkpointing": True}))
    a = ck.load_weights(ck.latest_checkpoint(tmp_path / "a"), "model")
    b = ck.load_weights(ck.latest_checkpoint(tmp_path / "b"), "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_mixed_precision_gathers_bf16_and_reduces_fp32():
    policy = D.fsdp_mixed_precision(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert not policy.cast_forward_inputs  # autocast picks the dtypes; rotary angles stay fp32
    for dtype in (None, torch.float16):
        assert D.fsdp_mixed_precision(dtype).param_dtype is None


def test_ema_update_is_one_foreach_lerp_equal_to_per_tensor_lerps(monkeypatch):
    model, _ = _model()
    ema = EMA(model, 0.9)
    reference = {name: t.clone() for name, t in ema.shadow.items()}
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        for name, p in model.named_parameters():
            reference[name].lerp_(p.detach(), 0.1)
    assert calls == [1, 1, 1]
    assert all(torch.equal(reference[name], ema.shadow[name]) for name in reference)


def test_mfu_is_logged_for_both_stages_when_the_peak_is_known(tmp_path, fake_stream, monkeypatch):
    monkeypatch.setenv("VARKIT_PEAK_FLOPS", "1e12")
    out = tmp_path / "run"
    tokenizer_train = {"steps": 1, "batch_size": 4, "precision": "fp32", "log_every": 1}
    loop_stages = []
    real_setup = TrainingLoop.setup
    monkeypatch.setattr(
        TrainingLoop, "setup", lambda self: loop_stages.append(self.stage) or real_setup(self)
    )
    from varkit.train import run

    run(tiny_recipe(out, tokenizer_train=tokenizer_train, train={"steps": 1}))
    (tok,) = [r for r in read_metrics(out / "tokenizer" / "metrics.jsonl") if "loss" in r]
    (ar,) = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert tok["mfu"] > 0  # counted on its first micro-batch
    flops = loop_stages[1].model.flops_per_image(training=True)  # the AR model's own count
    assert ar["mfu"] == pytest.approx(ar["images_per_s"] * flops / 1e12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_images_are_encoded_in_bf16_channels_last_on_cuda(tmp_path, fake_stream):
    from varkit.build import build_tokenizer

    recipe = tiny_recipe(tmp_path, train={"precision": "bf16"})
    env = DistEnv(device="cuda")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(recipe)
    reference = copy.deepcopy(tokenizer).cuda().eval()
    stage = ARStage(recipe, tokenizer, env, tmp_path)
    images = torch.rand(8, 3, 16, 16, device="cuda") * 2 - 1
    dtypes = []
    conv = next(m for m in stage.tokenizer.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda m, i, o: dtypes.append((o.dtype, i[0].is_contiguous(memory_format=torch.channels_last)))
    )
    codes = stage.encode(images)
    with torch.no_grad():
        expected = reference.encode(images)
    assert dtypes[0] == (torch.bfloat16, True)
    agree = sum((a == b).sum().item() for a, b in zip(codes, expected)) / sum(c.numel() for c in codes)
    assert agree > 0.9, agree  # bf16 convolutions move few features across a code boundary
