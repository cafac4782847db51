"""Vector quantisers: VAR's multi-scale residual one and a single-scale (VQGAN) one.

Both look codes up by Euclidean distance in float32 with autocast off (bf16 distances
pick different codes), train with a straight-through estimator, a codebook loss and a
commitment loss, and can restart dead codes: a code that no position picked for
``restart_after`` training steps is moved onto a randomly chosen current feature.

Shapes: features ``(b, c, h, w)``, flat features ``(n, c)``, codebook ``(v, c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

Grid = tuple[int, int]


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row of each row of ``z``, by Euclidean distance.

    Uses ``|z|^2 + |e|^2 - 2 z·e`` in one ``addmm``, the arithmetic of VAR's release,
    so that ties and near-ties resolve as there.

    Args:
        z: ``(n, c)`` float32.
        codebook: ``(v, c)`` float32.

    Returns:
        ``(n,)`` int64.
    """
    dist_nv = z.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)  # (n, v)
    dist_nv = torch.addmm(dist_nv, z, codebook.t(), beta=1.0, alpha=-2.0)
    return dist_nv.argmin(dim=1)


# ------------------------------------------------------------------------ usage stats


def code_histograms(codes: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Hit counts of every code in each code map, ``(K, v)`` int64."""
    return torch.stack([torch.bincount(c.reshape(-1), minlength=vocab_size) for c in codes])


def usage_from_histograms(hist: torch.Tensor) -> torch.Tensor:
    """Fraction of the vocabulary with at least one hit, per row of ``hist`` ``(K, v)``."""
    return (hist > 0).float().mean(dim=1)


def perplexity_from_histograms(hist: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the code distribution of each row of ``hist`` ``(K, v)``.

    1 when one code takes every position, ``v`` when all codes are equally used.
    """
    p = hist.float() / hist.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return entropy.exp()


@torch.no_grad()
def update_hit_ema(ema: torch.Tensor, hits: torch.Tensor, decay: float = 0.9) -> None:
    """EMA of the hit count of every code per scale, ``ema`` ``(K, v)`` updated in place.

    A row that has never been updated (all zeros) takes this step's hits as they are,
    so the usage read off it is meaningful from the first step rather than after the
    EMA has warmed up.
    """
    hits = hits.to(ema.dtype)
    fresh = ema.sum(dim=1, keepdim=True) == 0  # (K, 1)
    ema.copy_(torch.where(fresh, hits, ema * decay + hits * (1.0 - decay)))


def usage_from_hit_ema(ema: torch.Tensor, positions: Sequence[int], margin: float = 0.08) -> torch.Tensor:
    """Per scale, the fraction of codes in use according to the hit EMA ``(K, v)``.

    A code counts as used at scale ``k`` when its EMA hit count is at least ``margin``
    times the share it would get if the ``positions[k]`` positions of a step spread
    evenly over the vocabulary (VAR's rule, margin 0.08). A code picked once at a coarse
    scale stays "used" for a few dozen steps; one never picked is not.
    """
    vocab = ema.shape[1]
    share = torch.tensor([float(n) / vocab for n in positions], device=ema.device)[:, None]
    return (ema >= margin * share).float().mean(dim=1)


# ------------------------------------------------------------------ dead-code restart


@torch.no_grad()
def restart_dead_codes(
    weight: torch.Tensor,
    last_used: torch.Tensor,
    hits: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    *,
    step: int,
    after: int,
) -> int:
    """Move codes unused for ``after`` steps onto random current features.

    Args:
        weight: the codebook ``(v, c)``, changed in place.
        last_used: ``(v,)`` int64, the last step each code was picked (-1: not yet seen
            since this process started), updated in place.
        hits: ``(v,)`` how often each code was picked in this step.
        candidates: one ``(n_k, c)`` tensor of features per scale; a replacement picks a
            scale uniformly first, so that the few coarse-scale features are drawn as
            often as the many fine-scale ones (coarse scales collapse first).
        step: the current training step.
        after: steps without a hit after which a code counts as dead.

    Returns:
        How many codes were restarted.

    Under ``torch.distributed`` the hits are summed over processes and the replacements
    come from rank 0, so that every replica keeps the same codebook.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        hits = hits.clone()
        dist.all_reduce(hits)
    last_used[last_used < 0] = step  # a fresh (or resumed) process starts counting now
    last_used[hits > 0] = step
    dead = (step - last_used) >= after
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    pool = torch.cat([c.reshape(-1, weight.shape[1]) for c in candidates]).to(weight.dtype)
    prob = torch.cat(
        [torch.full((len(c),), 1.0 / (len(c) * len(candidates)), device=pool.device) for c in candidates]
    )
    pick = torch.multinomial(prob, n_dead, replacement=True)
    new_rows = pool[pick]
    if distributed:
        dist.broadcast(new_rows, src=0)
    weight[dead] = new_rows
    last_used[dead] = step
    return n_dead


# ----------------------------------------------------------------------------- phi


class Phi(nn.Conv2d):
    """VAR's residual refinement ``phi(h) = (1 - r)·h + r·conv3x3(h)``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


class PhiSet(nn.Module):
    """The phi convs of a multi-scale quantiser and which scale uses which.

    ``qresi_ls`` (VAR's name, kept for checkpoint compatibility) holds 0 convs
    (``"none"``: phi is the identity), 1 (``"shared"``), ``n`` (``"partial"``) or one per
    scale (``"per_scale"``). With ``"partial"``, scale ``k`` of ``K`` uses the conv whose
    tick is nearest to ``k / (K - 1)``; the ticks are ``linspace(1/(3n), 1 - 1/(3n), n)``
    for ``n = 4`` and ``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise (VAR's rule, computed
    with numpy in float64 as there, so ties resolve identically).
    """

    def __init__(self, channels: int, *, mode: str, num_scales: int, convs: int, ratio: float):
        super().__init__()
        n = {"none": 0, "shared": 1, "partial": convs, "per_scale": num_scales}[mode]
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(n))
        if mode == "none":
            self.index = [None] * num_scales
        elif mode == "per_scale":
            self.index = list(range(num_scales))
        else:
            self.index = [_tick_index(k, num_scales, n) for k in range(num_scales)]

    def forward(self, h: torch.Tensor, k: int) -> torch.Tensor:
        i = self.index[k]
        return h if i is None else self.qresi_ls[i](h)


def _tick_index(k: int, num_scales: int, n: int) -> int:
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    at = k / (num_scales - 1) if num_scales > 1 else 1.0  # a lone scale is the finest one
    return int(np.argmin(np.abs(ticks - at)))


@torch.no_grad()
def init_phi(phi: PhiSet) -> None:
    """Phi convs start as the identity (Dirac kernels, zero bias), so phi(h) = h at first."""
    for conv in phi.qresi_ls:
        nn.init.dirac_(conv.weight)
        nn.init.zeros_(conv.bias)


# ------------------------------------------------------------------------ quantisers


@attrs.define
class Quantized:
    """What a quantiser returns while training."""

    #: Features for the decoder ``(b, c, h, w)``: the quantised ones on the forward pass,
    #: gradients straight through to the encoder's features.
    f_hat: torch.Tensor
    #: Codebook loss: quantised features pulled towards the (frozen) encoder features.
    codebook_loss: torch.Tensor
    #: Commitment loss: encoder features pulled towards the (frozen) quantised ones.
    commit_loss: torch.Tensor
    #: The codes of each scale ``[(b, h_k, w_k)]``.
    codes: list[torch.Tensor]
    #: Hit counts per scale ``(K, v)``.
    hits: torch.Tensor
    #: Number of codes restarted in this step.
    restarted: int = 0


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantiser with one codebook shared by all scales.

    For each scale ``k`` (coarse to fine) with residual ``r`` (starting at ``f``): area
    down to ``grids[k]`` (the last scale uses ``r`` as is), nearest code per position,
    embed, bicubic up to the latent grid (the last scale: no resize), phi_k, add to
    ``f_hat``, subtract from ``r``.

    State-dict names are VAR's: ``ema_vocab_hit_SV`` (an EMA, decay 0.9, of the hit
    count of each code at each scale while training; ``(K, v)``), ``quant_resi.qresi_ls``
    (phi convs), ``embedding``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        code_dim: int,
        grids: Sequence[Grid],
        phi: str,
        phi_convs: int,
        phi_ratio: float,
        restart_after: int,
    ):
        super().__init__()
        self.vocab_size, self.code_dim = vocab_size, code_dim
        self.grids = tuple(tuple(g) for g in grids)
        self.restart_after = restart_after
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.grids), vocab_size))
        self.quant_resi = PhiSet(
            code_dim, mode=phi, num_scales=len(self.grids), convs=phi_convs, ratio=phi_ratio
        )
        self.embedding = nn.Embedding(vocab_size, code_dim)
        # Not in the state dict: after a resume the counting starts again, which only
        # delays a restart by at most ``restart_after`` steps.
        self.register_buffer(
            "code_last_used", torch.full((vocab_size,), -1, dtype=torch.long), persistent=False
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Codebook uniform in ``±1/v`` (as in VQGAN), phi convs as the identity."""
        nn.init.uniform_(self.embedding.weight, -1.0 / self.vocab_size, 1.0 / self.vocab_size)
        init_phi(self.quant_resi)
        self.ema_vocab_hit_SV.zero_()
        self.code_last_used.fill_(-1)

    @property
    def latent(self) -> Grid:
        return self.grids[-1]

    @property
    def hit_ema(self) -> torch.Tensor:
        """EMA of the hits of each code at each scale ``(K, v)`` (``ema_vocab_hit_SV``)."""
        return self.ema_vocab_hit_SV

    def scale_delta(self, emb: torch.Tensor, k: int) -> torch.Tensor:
        """What scale ``k`` adds to ``f_hat``: ``phi_k(up(emb))``, ``(b, c, hK, wK)``.

        Args:
            emb: code embeddings of scale ``k`` ``(b, c, h_k, w_k)``.
        """
        # float32 with autocast off: f_hat accumulates ten of these, and generation must
        # rebuild exactly the f_hat that encoding built.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            emb = emb.float().contiguous()
            if k != len(self.grids) - 1:
                emb = F.interpolate(emb, size=self.latent, mode="bicubic")
            return self.quant_resi(emb, k)

    @property
    def codebook(self) -> torch.Tensor:
        """The code embeddings ``(v, c)``."""
        return self.embedding.weight

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(...)`` -> embeddings ``(..., c)``."""
        return F.embedding(codes, self.embedding.weight)

    def embed_map(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(b, h, w)`` -> embeddings ``(b, c, h, w)``."""
        return rearrange(self.embed(codes), "b h w c -> b c h w")

    def reset_bookkeeping(self) -> None:
        """Fresh training bookkeeping (not saved) on the codebook's device, e.g. after loading
        weights into a model built on the meta device."""
        self.code_last_used = torch.full(
            (self.vocab_size,), -1, dtype=torch.long, device=self.embedding.weight.device
        )

    def _residual_loop(self, f: torch.Tensor, *, with_losses: bool):
        b = f.shape[0]
        f = f.float()
        f_frozen = f.detach()
        rest = f_frozen.clone()
        f_hat = None
        codebook_w = self.embedding.weight.detach()
        codes, candidates, hits = [], [], []
        codebook_loss = commit_loss = f.new_zeros(())
        last = len(self.grids) - 1
        for k, (h, w) in enumerate(self.grids):
            rest_k = rest if k == last else F.interpolate(rest, size=(h, w), mode="area")
            z = rearrange(rest_k, "b c h w -> (b h w) c")
            idx = nearest_code(z, codebook_w)  # (b*h*w,)
            code = idx.view(b, h, w)
            delta = self.scale_delta(self.embed_map(code), k)  # (b, c, hK, wK)
            f_hat = delta if f_hat is None else f_hat + delta
            rest = rest - delta.detach()
            codes.append(code)
            if with_losses:
                candidates.append(z)
                hits.append(torch.bincount(idx, minlength=self.vocab_size))
                # VAR's loss: every scale's running f_hat is compared with f, so the
                # coarse codes learn to stand for the whole map, not only for their share.
                codebook_loss = codebook_loss + F.mse_loss(f_hat, f_frozen)
                commit_loss = commit_loss + F.mse_loss(f_hat.detach(), f)
        return codes, f_hat, codebook_loss, commit_loss, candidates, hits

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder features ``(b, c, hK, wK)`` -> codes ``[(b, h_k, w_k)]`` and ``f_hat``."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            codes, f_hat, *_ = self._residual_loop(f, with_losses=False)
        return codes, f_hat

    def forward(self, f: torch.Tensor, *, step: int) -> Quantized:
        """Training pass: quantise ``f`` ``(b, c, hK, wK)`` with losses and bookkeeping."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            codes, f_hat, codebook_loss, commit_loss, candidates, hits = self._residual_loop(
                f, with_losses=True
            )
            num_scales = len(self.grids)
            hits_kv = torch.stack(hits)  # (K, v)
            restarted = 0
            if self.training:
                update_hit_ema(self.ema_vocab_hit_SV, hits_kv)
                if self.restart_after > 0:
                    restarted = restart_dead_codes(
                        self.embedding.weight,
                        self.code_last_used,
                        hits_kv.sum(0),
                        candidates,
                        step=step,
                        after=self.restart_after,
                    )
            f = f.float()
            f_ste = f + (f_hat - f).detach()
        return Quantized(
            f_hat=f_ste,
            codebook_loss=codebook_loss / num_scales,
            commit_loss=commit_loss / num_scales,
            codes=codes,
            hits=hits_kv,
            restarted=restarted,
        )


class VectorQuantizer(nn.Module):
    """Single-scale quantiser, optionally with l2-normalised lookup (LlamaGen's VQGAN).

    With ``l2_norm`` both the features and the codebook rows are l2-normalised before
    the lookup, and the quantised features are the normalised rows: nearest by
    Euclidean distance on the unit sphere is nearest by cosine similarity.
    """

    def __init__(self, *, vocab_size: int, code_dim: int, l2_norm: bool, restart_after: int):
        super().__init__()
        self.vocab_size, self.code_dim = vocab_size, code_dim
        self.l2_norm = l2_norm
        self.restart_after = restart_after
        self.embedding = nn.Embedding(vocab_size, code_dim)
        # Not in the state dict (see MultiScaleQuantizer); bookkeeping of training only.
        self.register_buffer(
            "code_last_used", torch.full((vocab_size,), -1, dtype=torch.long), persistent=False
        )
        self.register_buffer("hit_ema", torch.zeros(1, vocab_size), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Codebook uniform in ``±1/v`` (VQGAN's, also LlamaGen's)."""
        nn.init.uniform_(self.embedding.weight, -1.0 / self.vocab_size, 1.0 / self.vocab_size)
        self.code_last_used.fill_(-1)
        self.hit_ema.zero_()

    @property
    def codebook(self) -> torch.Tensor:
        """The rows that codes stand for ``(v, c)`` (normalised with ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(...)`` -> embeddings ``(..., c)`` (normalised with ``l2_norm``).

        Rows are gathered before they are normalised, so autograd keeps only the
        indices and a dead-code restart may rewrite the codebook in place.
        """
        emb = F.embedding(codes, self.embedding.weight)
        return F.normalize(emb, dim=-1) if self.l2_norm else emb

    def embed_map(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(b, h, w)`` -> embeddings ``(b, c, h, w)``."""
        return rearrange(self.embed(codes), "b h w c -> b c h w")

    def reset_bookkeeping(self) -> None:
        """Fresh training bookkeeping (not saved) on the codebook's device, e.g. after loading
        weights into a model built on the meta device."""
        device = self.embedding.weight.device
        self.code_last_used = torch.full((self.vocab_size,), -1, dtype=torch.long, device=device)
        self.hit_ema = torch.zeros(1, self.vocab_size, device=device)

    def _normalise(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=1) if self.l2_norm else f

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features ``(b, c, h, w)`` -> ``[codes (b, h, w)]`` and quantised features."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            b, _, h, w = f.shape
            z = rearrange(self._normalise(f.float()), "b c h w -> (b h w) c")
            code = nearest_code(z, self.codebook.detach()).view(b, h, w)
            return [code], self.embed_map(code)

    def forward(self, f: torch.Tensor, *, step: int) -> Quantized:
        """Training pass: quantise ``f`` ``(b, c, h, w)`` with losses and bookkeeping."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            b, _, h, w = f.shape
            f = self._normalise(f.float())
            z = rearrange(f.detach(), "b c h w -> (b h w) c")
            idx = nearest_code(z, self.codebook.detach())
            code = idx.view(b, h, w)
            q = self.embed_map(code)  # (b, c, h, w), grads to the codebook
            hits = torch.bincount(idx, minlength=self.vocab_size)
            restarted = 0
            if self.training:
                update_hit_ema(self.hit_ema, hits[None])
            if self.training and self.restart_after > 0:
                restarted = restart_dead_codes(
                    self.embedding.weight, self.code_last_used, hits, [z], step=step, after=self.restart_after
                )
            return Quantized(
                f_hat=f + (q - f).detach(),
                codebook_loss=F.mse_loss(q, f.detach()),
                commit_loss=F.mse_loss(q.detach(), f),
                codes=[code],
                hits=hits[None],
                restarted=restarted,
            )
