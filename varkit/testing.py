"""Contract checks for plugins: the checks varkit runs over its own plugins, for yours.

A plugin package tests that its classes keep the contract of their kind with one call
each, in its own test suite (pytest shows the failed check and why)::

    from varkit.testing import check_sampler

    from varkit_minp import MinP


    def test_min_p_keeps_the_sampler_contract():
        check_sampler(MinP)
        check_sampler(MinP, MinP.Config(min_p=0.5, cfg=0.0))

| kind | check | what it runs |
| --- | --- | --- |
| any | `check_plugin` | `name`, a frozen kw-only attrs `Config` with a default for every field, `available()` |
| tokenizer | `check_tokenizer` | shapes and ranges of codes, features and images; `embed` is a codebook lookup; the feature API agrees with itself; batch items independent; weights round-trip; `training_losses` when defined |
| prediction unit | `check_unit` | the layout fits the tokenizer; teacher forcing equals generation step by step; refusals of other tokenizers are `PluginError`s |
| attention backend | `check_attention_backend` | equals a float64 reference on block-causal and cached-decoding inputs; keeps the dtype |
| sampler | `check_sampler` | codes of the right shape and range; the same seed gives the same codes; never a code whose logit is -inf; guidance; soft weights |

Every check raises ``AssertionError`` naming the plugin and what broke. ``ToyTokenizer``
is a tokenizer of a few hundred parameters with the whole feature API, for testing
units without training one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from varkit.base import AttentionBackend, PluginBase, PredictionUnit, Sampler, Tokenizer, TokenizerLosses
from varkit.errors import PluginError
from varkit.masks import BlockCausal
from varkit.plugins import NAME_RE

__all__ = [
    "ToyConfig",
    "ToyTokenizer",
    "check_attention_backend",
    "check_plugin",
    "check_sampler",
    "check_tokenizer",
    "check_unit",
    "reference_attention",
]


def _expect(condition: bool, who: Any, message: str) -> None:
    if not condition:
        name = getattr(who, "name", None) or getattr(who, "__name__", repr(who))
        raise AssertionError(f"{name!r}: {message}")


def _close(
    a: torch.Tensor, b: torch.Tensor, who: Any, what: str, *, atol: float = 1e-5, rtol: float = 1e-4
) -> None:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    except AssertionError as exc:
        _expect(False, who, f"{what}:\n{exc}")


# ----------------------------------------------------------------------- any plugin


def check_plugin(cls: type[PluginBase]) -> None:
    """The contract every plugin class keeps, whatever its kind.

    A ``name`` of ``[a-z][a-z0-9_]*``; a nested attrs ``Config`` that is frozen and
    keyword-only with a default for every field; ``available()`` returning
    ``(bool, str)`` without raising, with a reason when it says no.
    """
    _expect(isinstance(cls, type) and issubclass(cls, PluginBase), cls, "is not a varkit plugin class")
    name = getattr(cls, "name", None)
    _expect(isinstance(name, str) and bool(NAME_RE.match(name)), cls, f"name {name!r} is not [a-z][a-z0-9_]*")
    config_cls = cls.Config
    _expect(attrs.has(config_cls), cls, "Config is not an attrs class")
    try:
        config = config_cls()
    except TypeError as exc:
        raise AssertionError(f"{name!r}: every Config field needs a default ({exc})") from None
    for field in attrs.fields(config_cls):
        _expect(field.kw_only or not field.init, cls, f"Config field {field.name!r} is not keyword-only")
    probe = next((f.name for f in attrs.fields(config_cls)), "_probe")
    try:
        setattr(config, probe, getattr(config, probe, None))
    except (attrs.exceptions.FrozenInstanceError, AttributeError):
        pass
    else:
        raise AssertionError(f"{name!r}: Config is not frozen (make it @attrs.frozen(kw_only=True))")
    ok, why = cls.available()
    _expect(isinstance(ok, bool) and isinstance(why, str), cls, "available() must return (bool, str)")
    _expect(ok or bool(why), cls, "available() says no without a reason")


# ------------------------------------------------------------------------ sampler


def _logits(b: int, l: int, v: int, seed: int) -> torch.Tensor:
    return torch.randn(b, l, v, generator=torch.Generator().manual_seed(seed)) * 3


def check_sampler(cls: type[Sampler], config: Any = None, *, vocab: int = 50) -> None:
    """Check a sampler class (with ``config``, default ``cls.Config()``) against its contract.

    Codes ``(b, l)`` int64 in ``[0, v)``; the same generator seed gives the same codes
    and soft weights; a code whose logit is -inf is never drawn; ``guidance_scale``
    is a float >= 0 at every step; soft weights, when given, are ``(b, l, v)``
    distributions; with ``top_k = 1`` (when the Config has it) the codes are the argmax.
    """
    check_plugin(cls)
    sampler = cls(config if config is not None else cls.Config())
    logits = _logits(3, 5, vocab, 0)

    def draw(seed: int, x: torch.Tensor = logits):
        g = torch.Generator().manual_seed(seed)
        codes = sampler.sample(x, step=1, num_steps=3, generator=g)
        return codes, sampler.soft_weights(x, step=1, num_steps=3, generator=g)

    codes, weights = draw(7)
    _expect(
        isinstance(codes, torch.Tensor) and codes.shape == (3, 5),
        cls,
        f"codes of shape {getattr(codes, 'shape', codes)}, not (3, 5)",
    )
    _expect(codes.dtype == torch.int64, cls, f"codes are {codes.dtype}, not int64")
    _expect(bool(((codes >= 0) & (codes < vocab)).all()), cls, "a code outside [0, v)")
    again, weights_again = draw(7)
    _expect(torch.equal(codes, again), cls, "the same generator seed gave other codes")
    _expect(
        (weights is None) == (weights_again is None)
        and (weights is None or torch.equal(weights, weights_again)),
        cls,
        "the same generator seed gave other soft weights",
    )
    if weights is not None:
        _expect(
            weights.shape == (3, 5, vocab),
            cls,
            f"soft weights of shape {tuple(weights.shape)}, not (b, l, v)",
        )
        _expect(bool((weights >= 0).all()), cls, "negative soft weights")
        _close(weights.sum(-1).float(), torch.ones(3, 5), cls, "soft weights do not sum to 1")
    # half of the vocabulary impossible: never drawn, whatever the options
    masked = logits.clone()
    masked[..., vocab // 2 :] = float("-inf")
    for seed in range(4):
        codes, weights = draw(seed, masked)
        _expect(bool((codes < vocab // 2).all()), cls, "drew a code whose logit is -inf")
        if weights is not None:
            _expect(
                not bool(weights[..., vocab // 2 :].any()), cls, "soft weight on a code whose logit is -inf"
            )
    for num_steps in (1, 4, 10):
        for step in range(num_steps):
            t = sampler.guidance_scale(step, num_steps)
            _expect(
                isinstance(t, float) and t >= 0,
                cls,
                f"guidance_scale({step}, {num_steps}) is {t!r}, not a float >= 0",
            )
    if "top_k" in attrs.fields_dict(type(sampler.config)):
        greedy = cls(attrs.evolve(sampler.config, top_k=1))
        codes = greedy.sample(logits, step=0, num_steps=2, generator=torch.Generator().manual_seed(0))
        _expect(torch.equal(codes, logits.argmax(-1)), cls, "top_k=1 does not give the argmax")


# ------------------------------------------------------------------- attention


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: BlockCausal | None, scale: float
) -> torch.Tensor:
    """Attention in float64 from its definition: what every backend must equal."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale  # (b, nh, lq, lk)
    if mask is not None:
        scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def _qkv(b, nh, lq, lk, hd, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, nh, lq, hd, generator=g).to(dtype),
        torch.randn(b, nh, lk, hd, generator=g).to(dtype),
        torch.randn(b, nh, lk, hd, generator=g).to(dtype),
    )


def check_attention_backend(
    cls: type[AttentionBackend],
    config: Any = None,
    *,
    step_lengths: Iterable[Sequence[int]] = ((1, 4, 9), (1,) * 12, (3, 1, 5, 2), (7,)),
    device: str = "cpu",
) -> None:
    """Check an attention backend against `reference_attention`.

    Block-causal masks of the given step lengths, cached decoding (``mask=None``,
    fewer queries than keys), the output shape, and bfloat16 kept as bfloat16. A
    backend not available here (``available()`` says no) is only checked for its
    plugin contract.
    """
    check_plugin(cls)
    if not cls.available()[0]:
        return
    backend = cls(config if config is not None else cls.Config())
    for seed, lengths in enumerate(step_lengths):
        mask = BlockCausal(lengths)
        q, k, v = (t.to(device) for t in _qkv(2, 3, mask.seq_len, mask.seq_len, 16, seed))
        out = backend.attend(q, k, v, mask=mask, scale=0.3)
        _expect(out.shape == q.shape, cls, f"output {tuple(out.shape)} for queries {tuple(q.shape)}")
        _close(out.cpu(), reference_attention(q, k, v, mask=mask, scale=0.3).cpu(), cls, f"mask {mask}")
    for lq, lk in ((1, 1), (1, 9), (4, 13)):
        q, k, v = (t.to(device) for t in _qkv(2, 2, lq, lk, 16, lq * 31 + lk))
        out = backend.attend(q, k, v, mask=None, scale=0.125)
        _close(
            out.cpu(), reference_attention(q, k, v, mask=None, scale=0.125).cpu(), cls, f"cached {lq} of {lk}"
        )
    q, k, v = (t.to(device) for t in _qkv(1, 2, 5, 5, 16, 99, dtype=torch.bfloat16))
    out = backend.attend(q, k, v, mask=BlockCausal((2, 3)), scale=0.25)
    _expect(out.dtype == torch.bfloat16, cls, f"bfloat16 inputs gave {out.dtype}")
    expected = reference_attention(q.float(), k.float(), v.float(), mask=BlockCausal((2, 3)), scale=0.25)
    _close(out.float().cpu(), expected.cpu(), cls, "bfloat16", atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------- tokenizer


@attrs.frozen(kw_only=True)
class ToyConfig:
    """Options of `ToyTokenizer`."""

    #: Side of each code map, coarse to fine (``(h, w)`` pairs allowed); one entry: a
    #: single-scale tokenizer.
    schedule: tuple = (1, 2, 4)
    vocab_size: int = 32
    code_dim: int = 8
    #: Pixels per latent position along each axis.
    patch: int = 4


class ToyTokenizer(Tokenizer):
    """A tiny tokenizer with the whole feature API, for testing units and engines.

    It follows the arithmetic of a multi-scale residual tokenizer (scales added to
    ``f_hat`` after a bicubic upsampling and a 1×1 "phi" conv; next inputs by area
    downsampling) over a linear patch encoder, so tests run in milliseconds. With a
    one-entry schedule it is a single-scale tokenizer.
    """

    name = "toy"
    Config = ToyConfig

    def __init__(self, config: ToyConfig = ToyConfig()):
        super().__init__(config)
        g = torch.Generator().manual_seed(1234)
        self.codebook_weight = nn.Parameter(torch.randn(config.vocab_size, config.code_dim, generator=g))
        self.phi = nn.Conv2d(config.code_dim, config.code_dim, 1)
        self.enc = nn.Conv2d(3, config.code_dim, config.patch, stride=config.patch)
        self.dec = nn.Conv2d(config.code_dim, 3 * config.patch**2, 1)

    @property
    def schedule(self):
        return tuple((s, s) if isinstance(s, int) else tuple(s) for s in self.config.schedule)

    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def code_dim(self):
        return self.config.code_dim

    @property
    def downsample(self):
        return self.config.patch

    @property
    def codebook(self):
        return self.codebook_weight

    def embed(self, codes):
        return F.embedding(codes, self.codebook_weight)

    def add_scale(self, f_hat, k, emb):
        if len(self.schedule) == 1:
            return emb
        latent = self.schedule[-1]
        if tuple(emb.shape[-2:]) != latent:
            emb = F.interpolate(emb, size=latent, mode="bicubic")
        delta = 0.5 * emb + 0.5 * self.phi(emb)
        return delta if f_hat is None else f_hat + delta

    def next_input(self, f_hat, k):
        return F.interpolate(f_hat, size=self.schedule[k + 1], mode="area")

    def encode(self, images):
        residual = self.enc(images).float()  # (b, c, hK, wK)
        codes, f_hat = [], None
        for k, (h, w) in enumerate(self.schedule):
            down = F.interpolate(residual, size=(h, w), mode="area")
            flat = down.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
            code = torch.cdist(flat, self.codebook_weight).argmin(-1).reshape(-1, h, w)
            codes.append(code)
            new = self.add_scale(f_hat, k, self.embed(code).permute(0, 3, 1, 2))
            residual = residual - (new if f_hat is None else new - f_hat)
            f_hat = new
        return codes

    def features_to_image(self, f_hat):
        return torch.tanh(F.pixel_shuffle(self.dec(f_hat), self.config.patch))


def check_tokenizer(cls: type[Tokenizer], config: Any = None, *, batch: int = 2, seed: int = 0) -> None:
    """Check a tokenizer class (with ``config``: keep it small) against its contract.

    - facts: a non-empty schedule of ``(h, w)`` pairs within the last (the latent
      grid), a vocabulary, a code dimension and a downsampling;
    - ``encode`` of images ``(b, 3, H, W)`` in [-1, 1] gives code maps ``(b, h_k, w_k)``
      int64 in ``[0, v)``, the same on a second call, and each image's codes do not
      depend on the rest of the batch;
    - ``embed`` is the lookup of ``codebook`` ``(v, c)``;
    - ``codes_to_features`` gives ``(b, c, hK, wK)`` and equals adding the scales one
      by one; ``teacher_forcing_inputs`` equals ``next_input`` step by step (the two
      paths that training and generation take);
    - ``decode`` gives finite images ``(b, 3, H, W)`` in [-1, 1];
    - the weights round-trip through ``state_dict`` into a fresh instance;
    - ``training_losses``, when the tokenizer defines it, gives a finite scalar
      generator loss with a gradient.
    """
    check_plugin(cls)
    tokenizer = cls(config if config is not None else cls.Config()).eval()
    schedule = tokenizer.schedule
    _expect(len(schedule) >= 1, cls, "empty schedule")
    _expect(
        all(len(hw) == 2 and min(hw) >= 1 for hw in schedule), cls, f"schedule {schedule} is not (h, w) pairs"
    )
    hK, wK = schedule[-1]
    _expect(
        all(h <= hK and w <= wK for h, w in schedule),
        cls,
        f"schedule {schedule}: the last map must be the finest",
    )
    v, c, ds = tokenizer.vocab_size, tokenizer.code_dim, tokenizer.downsample
    _expect(min(v, c, ds) >= 1, cls, f"vocab_size {v}, code_dim {c}, downsample {ds} must be >= 1")
    H, W = hK * ds, wK * ds
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, H, W, generator=g) * 2 - 1
    with torch.no_grad():
        codes = tokenizer.encode(images)
        _expect(
            len(codes) == len(schedule), cls, f"encode gave {len(codes)} code maps for {len(schedule)} scales"
        )
        for k, (code, (h, w)) in enumerate(zip(codes, schedule)):
            _expect(
                tuple(code.shape) == (batch, h, w),
                cls,
                f"code map {k} is {tuple(code.shape)}, not {(batch, h, w)}",
            )
            _expect(code.dtype == torch.int64, cls, f"code map {k} is {code.dtype}, not int64")
            _expect(bool(((code >= 0) & (code < v)).all()), cls, f"code map {k} holds codes outside [0, {v})")
        again = tokenizer.encode(images)
        _expect(
            all(torch.equal(a, b) for a, b in zip(codes, again)),
            cls,
            "encode is not deterministic in eval mode",
        )
        alone = tokenizer.encode(images[:1])
        _expect(
            all(torch.equal(a, b[:1]) for a, b in zip(alone, codes)),
            cls,
            "an image's codes depend on the rest of the batch",
        )
        codebook = tokenizer.codebook
        _expect(tuple(codebook.shape) == (v, c), cls, f"codebook is {tuple(codebook.shape)}, not {(v, c)}")
        emb = tokenizer.embed(codes[-1])
        _expect(
            tuple(emb.shape) == (batch, hK, wK, c),
            cls,
            f"embed gave {tuple(emb.shape)}, not {(batch, hK, wK, c)}",
        )
        _close(emb, codebook[codes[-1]], cls, "embed is not the codebook lookup")
        f_hat = tokenizer.codes_to_features(codes)
        _expect(tuple(f_hat.shape) == (batch, c, hK, wK), cls, f"codes_to_features gave {tuple(f_hat.shape)}")
        step, inputs = None, []
        for k, code in enumerate(codes):
            step = tokenizer.add_scale(step, k, tokenizer.embed(code).permute(0, 3, 1, 2))
            if k < len(codes) - 1:
                inputs.append(tokenizer.next_input(step, k))
        _close(step, f_hat, cls, "codes_to_features differs from add_scale one scale at a time")
        forced = tokenizer.teacher_forcing_inputs(codes)
        _expect(len(forced) == len(codes) - 1, cls, f"teacher_forcing_inputs gave {len(forced)} inputs")
        for k, (a, b) in enumerate(zip(forced, inputs)):
            h, w = schedule[k + 1]
            _expect(tuple(a.shape) == (batch, c, h, w), cls, f"input of scale {k + 1} is {tuple(a.shape)}")
            _close(a, b, cls, f"teacher_forcing_inputs differs from next_input at scale {k + 1}")
        out = tokenizer.decode(codes)
        _expect(
            tuple(out.shape) == (batch, 3, H, W),
            cls,
            f"decode gave {tuple(out.shape)}, not {(batch, 3, H, W)}",
        )
        _expect(
            bool(out.isfinite().all()) and out.abs().max() <= 1 + 1e-6,
            cls,
            "decoded images are not finite in [-1, 1]",
        )
        fresh = cls(tokenizer.config).eval()
        fresh.load_state_dict(tokenizer.state_dict(), strict=True)
        _close(fresh.decode(codes), out, cls, "the weights do not round-trip through state_dict")
    if type(tokenizer).training_losses is Tokenizer.training_losses:
        return
    tokenizer.train()
    losses = tokenizer.training_losses(images, step=0)
    _expect(isinstance(losses, TokenizerLosses), cls, "training_losses must return a TokenizerLosses")
    gen = losses.generator
    _expect(gen.dim() == 0 and bool(gen.isfinite()), cls, f"generator loss {gen!r} is not a finite scalar")
    _expect(gen.requires_grad, cls, "the generator loss has no gradient")
    _expect(
        losses.discriminator is None or losses.discriminator.dim() == 0,
        cls,
        "discriminator loss is not a scalar",
    )


# ------------------------------------------------------------------------- units


def check_unit(
    cls: type[PredictionUnit],
    tokenizer: Tokenizer,
    config: Any = None,
    *,
    width: int = 16,
    batches: Sequence[int] = (1, 3),
    seeds: Sequence[int] = (0, 1, 2),
    others: Iterable[Tokenizer] = (),
) -> None:
    """Check a prediction unit with a tokenizer it accepts (e.g. a `ToyTokenizer`).

    - the layout: step lengths >= 1, ``seq_len`` their sum, a block-causal ``mask``
      over them, embeddings ``(1, l_0, d)`` and ``(1, l, d)``, rotary angles None or
      ``(l, head_dim // 2)``, targets ``(b, l)`` int64 holding the codes, teacher-forcing
      inputs ``(b, l - l_0, c)``;
    - teacher forcing equals generation step by step: feeding each step's true codes
      through ``generation_step`` gives exactly the teacher-forcing inputs, then the
      codes themselves and the tokenizer's ``f_hat``;
    - for each tokenizer of ``others`` that ``check_tokenizer`` refuses, the
      constructor raises ``PluginError`` naming the unit, and the reasons are strings.
    """
    check_plugin(cls)
    config = config if config is not None else cls.Config()
    check = cls.check_tokenizer
    accepts_config = "config" in inspect.signature(check).parameters

    def problems(tok):
        found = check(tok, config=config) if accepts_config else check(tok)
        _expect(
            all(isinstance(p, str) and p for p in found),
            cls,
            "check_tokenizer must return a list of messages",
        )
        return found

    _expect(not problems(tokenizer), cls, f"refuses the tokenizer under test: {problems(tokenizer)}")
    for other in others:
        if problems(other):
            try:
                cls(config, tokenizer=other, width=width)
            except PluginError as exc:
                _expect(cls.name in str(exc), cls, f"its PluginError does not name the unit: {exc}")
            else:
                raise AssertionError(
                    f"{cls.name!r}: check_tokenizer refuses {other!r} but the constructor builds"
                )
    unit = cls(config, tokenizer=tokenizer, width=width)
    lengths = unit.step_lengths
    _expect(
        len(lengths) >= 1 and all(isinstance(n, int) and n >= 1 for n in lengths),
        cls,
        f"step lengths {lengths}",
    )
    _expect(unit.seq_len == sum(lengths), cls, "seq_len is not the sum of the step lengths")
    mask = unit.mask()
    _expect(isinstance(mask, BlockCausal) and mask.seq_len == unit.seq_len, cls, f"mask {mask} does not fit")
    _expect(
        tuple(unit.start_embedding().shape) == (1, lengths[0], width),
        cls,
        "start_embedding is not (1, l_0, d)",
    )
    _expect(
        tuple(unit.position_embedding().shape) == (1, unit.seq_len, width),
        cls,
        "position_embedding is not (1, l, d)",
    )
    angles = unit.rotary_angles(8)
    _expect(angles is None or tuple(angles.shape) == (unit.seq_len, 4), cls, "rotary_angles(8) is not (l, 4)")
    c = tokenizer.code_dim
    for b in batches:
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            codes = [
                torch.randint(0, tokenizer.vocab_size, (b, h, w), generator=g) for h, w in tokenizer.schedule
            ]
            with torch.no_grad():
                targets = unit.targets(codes)
                _expect(
                    tuple(targets.shape) == (b, unit.seq_len) and targets.dtype == torch.int64,
                    cls,
                    "targets are not (b, l) int64",
                )
                expected = unit.teacher_forcing(codes, tokenizer)
                _expect(
                    tuple(expected.shape) == (b, unit.seq_len - lengths[0], c),
                    cls,
                    "teacher_forcing is not (b, l - l_0, c)",
                )
                state = unit.start_generation(b, tokenizer)
                fed, start = [], 0
                for s, n in enumerate(lengths):
                    step_codes = targets[:, start : start + n]
                    nxt = unit.generation_step(state, s, step_codes, tokenizer.embed(step_codes), tokenizer)
                    start += n
                    if s == len(lengths) - 1:
                        _expect(nxt is None, cls, "the last generation step must return None")
                    else:
                        _expect(
                            tuple(nxt.shape) == (b, lengths[s + 1], c),
                            cls,
                            f"generation_step {s} returned {tuple(nxt.shape)}",
                        )
                        fed.append(nxt)
                f_hat = unit.finish_generation(state, tokenizer)
                generated = unit.generated_codes(state)
            fed_all = torch.cat(fed, dim=1) if fed else expected.new_zeros(b, 0, c)
            _close(fed_all, expected, cls, "generation step by step differs from teacher forcing")
            _expect(
                len(generated) == len(codes) and all(torch.equal(x, y) for x, y in zip(generated, codes)),
                cls,
                "generated_codes are not the codes fed in",
            )
            _close(
                f_hat,
                tokenizer.codes_to_features(codes),
                cls,
                "finish_generation differs from codes_to_features",
            )
