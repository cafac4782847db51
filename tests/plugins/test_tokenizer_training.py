"""Training the conv tokenizers: losses fall, dead codes revive, GAN and LPIPS plumbing."""

from __future__ import annotations

import logging

import pytest
import torch

from varkit.base import TokenizerLosses
from varkit_plugins.tokenizers.losses import LPIPS, load_lpips
from varkit_plugins.tokenizers.msvq import MSVQ, MSVQConfig
from varkit_plugins.tokenizers.quantize import MultiScaleQuantizer, restart_dead_codes
from varkit_plugins.tokenizers.vq import VQ, VQConfig

TINY = dict(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, code_dim=8, vocab_size=64)


def simple_images(b: int, seed: int = 0) -> torch.Tensor:
    """Smooth images: a colour per quadrant plus a horizontal ramp, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(b, 3, 2, 2, generator=gen) * 2 - 1
    x = torch.nn.functional.interpolate(colours, size=(16, 16), mode="bilinear", align_corners=True)
    ramp = torch.linspace(-0.2, 0.2, 16).view(1, 1, 1, 16)
    return (x + ramp).clamp(-1, 1)


def train(tok, steps: int, lr: float = 3e-3, batch: int = 8) -> list[tuple[float, TokenizerLosses]]:
    """``steps`` Adam steps; per step the generator loss and the losses (graphs freed)."""
    tok.train()
    main = [p for n, p in tok.named_parameters() if not n.startswith("discriminator.")]
    opt = torch.optim.Adam(main, lr=lr)
    disc_opt = (
        torch.optim.Adam(tok.discriminator_parameters(), lr=lr) if tok.discriminator_parameters() else None
    )
    out = []
    for step in range(steps):
        losses = tok.training_losses(simple_images(batch, seed=step % 4), step=step)
        opt.zero_grad()
        losses.generator.backward()
        opt.step()
        if losses.discriminator is not None:
            disc_opt.zero_grad()
            losses.discriminator.backward()
            disc_opt.step()
        out.append((float(losses.generator.detach()), losses))
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 4, 8], rec_loss="l2")),
        lambda: VQ(VQConfig(**TINY, l2_norm=True)),
    ],
    ids=["msvq", "vq"],
)
def test_loss_falls_on_simple_images(make):
    torch.manual_seed(0)
    history = train(make(), 30)
    first = sum(loss for loss, _ in history[:4]) / 4
    last = sum(loss for loss, _ in history[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    assert history[-1][1].discriminator is None
    metrics = history[-1][1].metrics
    assert {"rec", "codebook", "commit", "usage/0", "perplexity/0"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("usage/"))


def test_per_scale_usage_metrics():
    tok = MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 4, 8]))
    metrics = tok.training_losses(simple_images(4), step=0).metrics
    assert [k for k in metrics if k.startswith("usage/")] == ["usage/0", "usage/1", "usage/2", "usage/3"]
    # from the first step on, usage counts the codes hit (the EMA starts at the hits)
    assert metrics["usage/0"] <= 4 / 64 + 1e-6 < metrics["usage/3"]


def test_restart_moves_dead_codes_onto_features():
    weight = torch.zeros(8, 2)
    last_used = torch.full((8,), -1, dtype=torch.long)
    hits = torch.tensor([5, 0, 0, 0, 0, 0, 0, 0])
    features = [torch.full((3, 2), 7.0), torch.full((100, 2), -7.0)]
    assert restart_dead_codes(weight, last_used, hits, features, step=0, after=2) == 0
    hits = torch.tensor([5, 1, 0, 0, 0, 0, 0, 0])
    assert restart_dead_codes(weight, last_used, hits, features, step=2, after=2) == 6
    assert torch.equal(weight[:2], torch.zeros(2, 2))  # live codes stay
    assert set(weight[2:].abs().flatten().tolist()) == {7.0}  # dead ones took features
    assert (last_used == 2).all()


def test_dead_codes_revive_at_the_coarse_scales():
    # A codebook where every code but one sits far from the features: without restarts
    # each scale uses one code; with them, unused codes move onto current residuals and
    # get picked.
    torch.manual_seed(0)
    grids = [(1, 1), (2, 2), (4, 4)]

    def run(restart_after: int) -> tuple[int, int]:
        q = MultiScaleQuantizer(
            vocab_size=32,
            code_dim=4,
            grids=grids,
            phi="none",
            phi_convs=4,
            phi_ratio=0.5,
            restart_after=restart_after,
        )
        with torch.no_grad():
            q.embedding.weight.fill_(100.0)
            q.embedding.weight[0].zero_()
        q.train()
        restarted = 0
        for step in range(6):
            out = q(torch.randn(8, 4, 4, 4), step=step)
            restarted += out.restarted
        codes, _ = q.quantize(torch.randn(8, 4, 4, 4))
        return len(torch.unique(torch.cat([c.flatten() for c in codes]))), restarted

    used_without, restarted_without = run(0)
    used_with, restarted_with = run(2)
    assert used_without == 1 and restarted_without == 0
    assert restarted_with >= 31 and used_with > 10


def test_discriminator_starts_late_and_trains_alone():
    tok = MSVQ(
        MSVQConfig(**TINY, schedule=[1, 2, 4, 8], disc_weight=0.5, disc_start=2, disc_layers=2, disc_ch=8)
    )
    assert tok.discriminator_parameters()
    assert not any(k.startswith("discriminator.") for k in tok.state_dict())
    x = simple_images(4)
    assert tok.training_losses(x, step=1).discriminator is None
    losses = tok.training_losses(x, step=2)
    assert losses.discriminator is not None and {"g_adv", "disc", "disc_lambda"} <= set(losses.metrics)
    losses.generator.backward(retain_graph=True)
    assert all(p.grad is None for p in tok.discriminator_parameters())  # the generator's loss leaves D alone
    assert tok.decoder.conv_out.weight.grad is not None
    tok.zero_grad()
    losses.discriminator.backward()
    assert all(p.grad is not None for p in tok.discriminator_parameters())
    assert all(p.grad is None for n, p in tok.named_parameters() if not n.startswith("discriminator."))


def test_weights_load_across_loss_options():
    plain = MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 4, 8]))
    with_gan = MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 4, 8], disc_weight=0.5, disc_layers=2))
    with_gan.load_state_dict(plain.state_dict())  # strict: the discriminator is no part of the weights
    plain.load_state_dict(with_gan.state_dict())


def test_lpips_absent_is_skipped_with_one_warning(tmp_path, caplog):
    tok = VQ(VQConfig(**TINY, lpips_weight=1.0, lpips_weights=str(tmp_path / "missing.safetensors")))
    with caplog.at_level(logging.WARNING):
        a = tok.training_losses(simple_images(2), step=0)
        tok.training_losses(simple_images(2), step=1)
    assert "lpips" not in a.metrics
    assert sum("LPIPS weights" in r.message for r in caplog.records) == 1


def narrow_lpips_file(path) -> str:
    """A weights file in the published layout (torchvision vgg16 features + lpips heads), narrow."""
    widths = [4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    net = LPIPS(widths)
    state = {}
    for name, value in net.features.state_dict().items():
        state[f"features.{name}"] = torch.randn_like(value) * 0.3
    for j, lin in enumerate(net.lins):
        state[f"lin{j}.model.1.weight"] = torch.rand_like(lin.weight)
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(state, path)
    return str(path)


def test_lpips_with_weights_enters_the_loss(tmp_path):
    path = narrow_lpips_file(tmp_path / "lpips.pth")
    net = load_lpips(path)
    x, y = simple_images(2, seed=0), simple_images(2, seed=1)
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    assert (net(x, y) > 0).all()
    tok = VQ(VQConfig(**TINY, lpips_weight=1.0, lpips_weights=path))
    losses = tok.training_losses(x, step=0)
    assert losses.metrics["lpips"] > 0
    assert not any("lpips" in k for k in tok.state_dict())
    losses.generator.backward()
    assert tok.encoder.conv_in.weight.grad is not None


def test_losses_work_without_grad_for_validation():
    tok = MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 4, 8], disc_weight=0.5, disc_layers=2)).eval()
    before = tok.quantize.ema_vocab_hit_SV.clone()
    with torch.no_grad():
        losses = tok.training_losses(simple_images(2), step=10)
    assert torch.isfinite(losses.generator) and losses.metrics["disc_lambda"] == 1.0
    assert torch.equal(tok.quantize.ema_vocab_hit_SV, before)  # eval mode keeps the statistics
