"""Base classes of the five plugin kinds.

A plugin is a class with a class attribute ``name`` (its registry name), a nested attrs
class ``Config`` (its recipe options; frozen, kw_only) and a constructor that takes that
config first. It may define ``available()`` to say whether it can run on this machine.

Shape glossary (einops axis names used across varkit): ``b`` batch, ``l`` positions,
``s`` step, ``h w`` grid, ``nh`` heads, ``hd`` head dim, ``d`` model width,
``c`` latent (code) channels, ``v`` vocabulary.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import nn

from varkit.errors import PluginError
from varkit.masks import BlockCausal, PreparedMask


@attrs.frozen(kw_only=True)
class EmptyConfig:
    """The config of a plugin that takes no options."""


class PluginBase:
    """What every plugin class has, whatever its kind."""

    #: Registry name, ``[a-z][a-z0-9_]*``; what recipes write after ``name:``.
    name: ClassVar[str]
    #: attrs class of the plugin's recipe options (frozen, kw_only, validated).
    Config: ClassVar[type] = EmptyConfig

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether the plugin can run here, and if not, why (shown by ``varkit plugins``).

        Must be cheap and must not raise: check for an optional import or a device.
        """
        return True, ""


# --------------------------------------------------------------------------- tokenizer


class Tokenizer(PluginBase, nn.Module):
    """Image <-> a pyramid of discrete code maps, coarse to fine.

    ``encode`` turns images ``(b, 3, H, W)`` in [-1, 1] into a list of code maps
    ``[(b, h1, w1), ..., (b, hK, wK)]`` (K = 1 for a single-scale tokenizer) and
    ``decode`` turns such a list back into images. Between them lies the continuous
    feature map ``f_hat`` of shape ``(b, c, hK, wK)`` that the codes stand for.

    The feature API below is what prediction units build their inputs from, so any
    tokenizer that implements it works with every unit that accepts its number of
    scales.
    """

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config

    # -- facts ---------------------------------------------------------------
    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        """The ``(h, w)`` of each code map, coarse to fine; the last is the latent grid."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of codes ``v`` (shared by every scale)."""
        raise NotImplementedError

    @property
    def code_dim(self) -> int:
        """Channels ``c`` of a code's embedding and of ``f_hat``."""
        raise NotImplementedError

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each axis (16 for VAR's VQ-VAE)."""
        raise NotImplementedError

    # -- codes <-> images ----------------------------------------------------
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(b, 3, H, W)`` in [-1, 1] -> code maps ``[(b, h_k, w_k)]`` (int64)."""
        raise NotImplementedError

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code maps ``[(b, h_k, w_k)]`` -> images ``(b, 3, H, W)`` in [-1, 1]."""
        return self.features_to_image(self.codes_to_features(codes))

    # -- the feature API used by prediction units ----------------------------
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: codes ``(...)`` -> embeddings ``(..., c)``."""
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:
        """The code embeddings ``(v, c)``; soft samplers mix its rows."""
        raise NotImplementedError

    def codes_to_features(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """The final feature map ``f_hat`` ``(b, c, hK, wK)`` that the codes stand for."""
        f_hat = None
        for k, code in enumerate(codes):
            f_hat = self.add_scale(f_hat, k, self.embed(code).permute(0, 3, 1, 2))
        return f_hat

    def add_scale(self, f_hat: torch.Tensor | None, k: int, emb: torch.Tensor) -> torch.Tensor:
        """Add scale ``k``'s code embeddings ``(b, c, h_k, w_k)`` to ``f_hat``.

        ``f_hat`` is None before the first scale. Returns the new ``f_hat``
        ``(b, c, hK, wK)``. A single-scale tokenizer returns ``emb`` as it is.
        """
        if len(self.schedule) != 1:
            raise NotImplementedError
        return emb

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """The input of scale ``k + 1`` after ``k + 1`` scales were added to ``f_hat``.

        Returns ``(b, c, h_{k+1}, w_{k+1})``. Only multi-scale tokenizers define it.
        """
        raise NotImplementedError(f"tokenizer {self.name!r} has a single scale")

    def teacher_forcing_inputs(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs of scales 2..K at once, as generation would build them step by step.

        Returns ``[(b, c, h_2, w_2), ..., (b, c, h_K, w_K)]``; empty for one scale.
        """
        inputs, f_hat = [], None
        for k, code in enumerate(codes[:-1]):
            f_hat = self.add_scale(f_hat, k, self.embed(code).permute(0, 3, 1, 2))
            inputs.append(self.next_input(f_hat, k))
        return inputs

    def features_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode a feature map ``(b, c, hK, wK)`` into images ``(b, 3, H, W)`` in [-1, 1]."""
        raise NotImplementedError

    # -- released weights ------------------------------------------------------
    @classmethod
    def from_release(cls, state: dict[str, torch.Tensor], **overrides) -> Tokenizer:
        """A tokenizer holding the weights of a published release's own state dict.

        Importers of foreign checkpoints (`varkit.importers`) find the plugin in the
        registry and call this, so the knowledge of a release's layout stays with the
        plugin that implements its architecture. ``overrides`` set config fields the
        state dict cannot tell. Raises `varkit.CheckpointError` naming the keys
        that do not fit.
        """
        raise NotImplementedError(f"tokenizer {cls.name!r} reads no released weights")

    # -- training --------------------------------------------------------------
    def training_losses(self, images: torch.Tensor, *, step: int) -> TokenizerLosses:
        """The tokenizer's own training losses on images ``(b, 3, H, W)`` in [-1, 1].

        The training loop back-propagates ``generator`` into every parameter except
        ``discriminator_parameters()`` and, when it is not None, ``discriminator`` into
        those alone (computed on detached reconstructions).
        """
        raise NotImplementedError(f"tokenizer {self.name!r} cannot be trained by varkit")

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters of an adversarial discriminator, trained by their own optimizer."""
        return []


@attrs.define
class TokenizerLosses:
    """What one tokenizer training step returns."""

    #: Loss of the encoder, quantiser and decoder (reconstruction, VQ, perceptual, GAN).
    generator: torch.Tensor
    #: Loss of the discriminator alone, or None when there is none (or before it starts).
    discriminator: torch.Tensor | None
    #: Scalars to log, e.g. ``{"rec": 0.1, "vq": 0.02, "usage/0": 0.9}``: floats or 0-dim
    #: tensors; tensors are best, as the trainer reads them only at log steps (no device
    #: sync per step).
    metrics: dict[str, torch.Tensor | float]


# ------------------------------------------------------------------- prediction unit


class PredictionUnit(PluginBase, nn.Module):
    """How a code pyramid becomes an autoregressive sequence.

    A unit cuts the sequence into steps; step ``s`` predicts ``step_lengths[s]``
    positions at once and sees every position of steps ``<= s``. The transformer's
    input at the positions of step 0 is the class embedding plus ``pos_start``; at the
    positions of step ``s > 0`` it is ``word_embed`` of the unit's input features
    ``(b, l_s, c)``, computed from the codes of the steps before. Every position also
    adds ``position_embedding()``.

    A unit is built as ``Unit(config, tokenizer=tok, width=d)`` and owns its
    embeddings (they are parameters of the model that holds it).
    """

    #: What a position of steps 1.. is fed: False, code features ``(b, l_s, c)`` that the
    #: model projects (VAR); True, the codes themselves ``(b, l_s)``, which the model looks
    #: up in a table of its own (LlamaGen). ``teacher_forcing`` and ``generation_step``
    #: return that kind of input.
    input_codes: bool = False

    def __init__(self, config, *, tokenizer: Tokenizer, width: int):
        nn.Module.__init__(self)
        self.config = config

    @classmethod
    def check_tokenizer(cls, tokenizer: Tokenizer, config=None) -> list[str]:
        """Problems pairing this unit with ``tokenizer`` (empty when they fit).

        Recipe validation calls it before anything is built, with the unit's ``config``
        from the recipe (e.g. to check that a cell size divides the tokenizer's grid).
        A unit may define it without ``config``; it is then called with the tokenizer alone.
        The constructor raises `varkit.PluginError`, naming the unit, for every tokenizer
        this refuses (never a bare ``ValueError``); ``varkit.testing.check_unit`` checks it.
        """
        return []

    @property
    def step_lengths(self) -> tuple[int, ...]:
        """Positions predicted by each step, e.g. ``(1, 4, 9, ...)`` for VAR."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Positions in the whole sequence ``l``."""
        return sum(self.step_lengths)

    def mask(self) -> BlockCausal:
        """The training attention mask: each step sees itself and the steps before."""
        return BlockCausal(self.step_lengths)

    def start_embedding(self) -> torch.Tensor:
        """``pos_start`` ``(1, l_0, d)``, added to the class embedding at step 0."""
        raise NotImplementedError

    def position_embedding(self) -> torch.Tensor:
        """Position and step embeddings ``(1, l, d)`` added to every position."""
        raise NotImplementedError

    def rotary_angles(self, head_dim: int) -> torch.Tensor | None:
        """Rotary position angles ``(l, head_dim // 2)`` in radians, or None (the default).

        A unit that places positions by rotation (e.g. 2-D RoPE) returns one angle per
        position and frequency; the transformer then rotates each head's query and key
        pairs ``(x[..., i], x[..., i + head_dim // 2])`` by them before attention.
        """
        return None

    def rotary_tables(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cosines and sines ``(l, head_dim // 2)`` that rotate each position's q and k.

        By default those of `rotary_angles`. A unit may override it to scale the
        rotation too: LlamaGen's zero rows for its class prefix zero that position's
        query and key (each of its keys scores 0 with every query).
        """
        angles = self.rotary_angles(head_dim)
        if angles is None:
            return None
        angles = angles.float()
        return angles.cos(), angles.sin()

    def targets(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code maps -> the codes to predict in sequence order, ``(b, l)``."""
        raise NotImplementedError

    def teacher_forcing(self, codes: list[torch.Tensor], tokenizer: Tokenizer) -> torch.Tensor:
        """Inputs of steps 1.. for training: features ``(b, l - l_0, c)``, or codes
        ``(b, l - l_0)`` when `input_codes`."""
        raise NotImplementedError

    # -- generation ------------------------------------------------------------
    def start_generation(self, batch: int, tokenizer: Tokenizer) -> dict:
        """A fresh generation state for ``batch`` images (any dict the unit likes)."""
        return {}

    def generation_step(
        self, state: dict, step: int, codes: torch.Tensor, emb: torch.Tensor, tokenizer: Tokenizer
    ) -> torch.Tensor | None:
        """Record step ``step``'s codes ``(b, l_s)`` and embeddings ``(b, l_s, c)``.

        ``emb`` is ``tokenizer.embed(codes)`` or, with a soft sampler, a mixture of
        codebook rows (during an edit, the kept positions hold the image's codes and
        their embeddings). Returns the next step's input features ``(b, l_{s+1}, c)``
        (codes ``(b, l_{s+1})`` when `input_codes`), or None after the last step.
        """
        raise NotImplementedError

    def finish_generation(self, state: dict, tokenizer: Tokenizer) -> torch.Tensor:
        """The final feature map ``f_hat`` ``(b, c, hK, wK)`` to decode."""
        raise NotImplementedError

    def generated_codes(self, state: dict) -> list[torch.Tensor]:
        """The generated code maps ``[(b, h_k, w_k)]``."""
        raise NotImplementedError

    # -- editing -----------------------------------------------------------------
    def keep_positions(self, keep: torch.Tensor) -> torch.Tensor:
        """Which positions of the sequence an edit takes from the image: ``(b, l)`` bool.

        Zero-shot editing (inpainting, outpainting, class-conditional editing) keeps
        the image's own code wherever this is True and samples the others; the
        generation loop does the replacing, so this mapping is all a unit provides.

        Args:
            keep: ``(b, hK, wK)`` float in [0, 1] on the tokenizer's last code grid:
                the share of each latent position that the edit keeps (1: keep the
                image, 0: regenerate it).

        Returns:
            ``(b, l)`` bool in the order of `targets`: True where the image's
            code is kept at that position.

        A unit that cannot say which of its positions a mask covers does not define
        it; editing with it then stops with this error.
        """
        raise PluginError(
            f"unit {self.name!r} cannot edit images: it does not map an edit mask onto the positions of "
            "its steps (PredictionUnit.keep_positions); generate with it, or edit with a unit that defines it"
        )


# ------------------------------------------------------------------ attention backend


class AttentionBackend(PluginBase):
    """``attend(q, k, v, mask)``: multi-head attention with a given softmax scale.

    Every backend must agree with the ``math`` reference to float rounding on the same
    inputs; the contract tests check this for every registered backend that is
    available.

    A model asks its backend once, when it is built, to `prepare` the unit's
    mask, and hands the result to every training call of `attend`; the tensors
    it holds are buffers of the model, so they follow ``model.to(device)`` and a
    compiled forward never rebuilds them. `kernel` says in words which kernel
    runs (``varkit plugins`` shows it, and building a model logs it).
    """

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def prepare(self, mask: BlockCausal) -> PreparedMask:
        """What `attend` needs to realise ``mask``, built once per layout.

        Runs eagerly on the default device when the model is built (never inside a
        compiled forward). The default keeps the step ids and, unless the mask is
        plainly causal, the dense boolean ``(l, l)`` matrix; a backend that needs
        something else (a block mask, a bias) returns a `PreparedMask`
        subclass holding it as buffers.
        """
        return PreparedMask(mask, dense=not mask.is_causal)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: BlockCausal | PreparedMask | None,
        scale: float,
    ) -> torch.Tensor:
        """Attention output ``(b, nh, lq, hd)``.

        Args:
            q: queries ``(b, nh, lq, hd)``.
            k: keys ``(b, nh, lk, hd)``.
            v: values ``(b, nh, lk, hd)``.
            mask: None when every query sees every key (a cached generation step, whose
                keys are the cache so far), else the block-causal structure of a full
                sequence (``lq == lk``): what `prepare` returned (from a model),
                or a bare `varkit.masks.BlockCausal` (from a direct call;
                both answer ``dense()``, ``step_ids()``, ``is_causal``).
            scale: softmax temperature multiplying ``q @ k^T`` (VAR uses 1 with
                l2-normalised q and k).
        """
        raise NotImplementedError

    def kernel(
        self,
        mask: BlockCausal | None,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        head_dim: int = 64,
    ) -> str:
        """The kernel `attend` runs for ``mask`` on ``device``, in words.

        ``mask`` None describes a cached generation step. Asked with small inputs of
        ``dtype`` and ``head_dim``; a backend that cannot tell says so.
        """
        return f"{self.name} (the backend does not describe its kernel)"


# ------------------------------------------------------------------------ sampler


class Sampler(PluginBase):
    """Turns one step's logits into codes, and decides classifier-free guidance."""

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def guidance_scale(self, step: int, num_steps: int) -> float:
        """Guidance ``t`` at ``step``: logits become ``(1 + t) * cond - t * uncond``.

        0 means no guidance (and no batch doubling when it is 0 at every step).
        """
        return 0.0

    def sample(
        self, logits: torch.Tensor, *, step: int, num_steps: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Logits ``(b, l, v)`` (guidance already applied) -> codes ``(b, l)`` (int64)."""
        raise NotImplementedError

    def soft_weights(
        self, logits: torch.Tensor, *, step: int, num_steps: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """Optional weights ``(b, l, v)`` over the codebook to embed instead of hard codes.

        None (the default) embeds the sampled codes as they are.
        """
        return None

    def sample_guided(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        *,
        t: float,
        step: int,
        num_steps: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step's codes (and soft weights) from its conditional and unconditional logits.

        This is what the generation loop calls, once per step, with ``t =
        guidance_scale(step, num_steps)``. The default applies guidance with
        `apply_guidance` and calls `sample` and then `soft_weights` on
        the result, so a sampler that only defines `sample` works as it is; a
        sampler may override it to fuse guidance into its own pass over the logits.

        Args:
            cond: logits of the batch's labels ``(b, l, v)``.
            uncond: logits of the "no class" index ``(b, l, v)``, or None when the loop
                does not double the batch (``t`` is then 0).
            t: the guidance of this step.

        Returns:
            ``(codes, weights)``: codes ``(b, l)`` int64 and, as `soft_weights`,
            weights ``(b, l, v)`` or None. Every random draw comes from ``generator``.
        """
        logits = apply_guidance(cond, uncond, t)
        codes = self.sample(logits, step=step, num_steps=num_steps, generator=generator)
        weights = self.soft_weights(logits, step=step, num_steps=num_steps, generator=generator)
        return codes, weights


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, t: float) -> torch.Tensor:
    """Classifier-free guidance: ``(1 + t) · cond - t · uncond``; ``cond`` itself when ``t`` is 0.

    ``uncond`` may be None only when ``t`` is 0.
    """
    if t == 0:
        return cond
    if uncond is None:
        raise ValueError(f"guidance t={t} needs the unconditional logits")
    return (1 + t) * cond - t * uncond


# ---------------------------------------------------------------------- strategy


class Strategy(PluginBase):
    """How a generation runs its steps: which model runs which step, which positions are
    recomputed, and how many steps one forward pass accepts.

    Without a strategy the generation loop (`varkit.generation.loop.Generation`) runs
    every step in order, one forward pass each::

        for step in range(gen.num_steps):
            logits = gen.forward(step)              # (b or 2b, l_s, v): model + KV cache
            codes, emb = gen.choose(step, logits)   # (b, l_s), (b, l_s, c): sampler, guidance
            gen.accept(step, codes, emb)            # the unit records them, builds gen.inputs

    A strategy's `run` drives the same phases in its own order instead of copying
    them: it may run several steps in one pass (``gen.forward_steps(first, last,
    inputs)``), take back steps it drafted (``gen.rewind(step)``), run some steps with
    another model (``gen.companion(model, tokenizer)`` is a generation of the same batch
    sharing the generator), or run a step on some of its positions. Sampling, guidance,
    editing and the unit's bookkeeping stay the loop's, so a strategy works with every
    sampler and tokenizer its units accept.

    The class attributes say what a strategy needs; the host checks them before any
    step runs and refuses a mismatch with a `varkit.VarkitError` naming both.
    """

    #: The prediction units (registry names) the strategy works with; None: every unit.
    units: ClassVar[tuple[str, ...] | None] = None
    #: Options that name another model (collaborative decoding's drafter). In a recipe
    #: such an option is the path of a pretrained directory or run, which the pipeline
    #: loads; in Python it is a loaded pipeline (anything with ``model`` and
    #: ``tokenizer`` attributes) or a ``(model, tokenizer)`` pair. `run` receives them
    #: by name as keyword arguments.
    models: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def supports(cls, unit: str) -> bool:
        """Whether the strategy works with the prediction unit registered as ``unit``."""
        return cls.units is None or unit in cls.units

    def check(self, gen, **models) -> None:
        """Refuse, with a `varkit.VarkitError` saying what to change, a generation this
        strategy cannot run (e.g. a drafter with another tokenizer).

        Called once before `run`, with the same arguments. The default accepts all.
        """

    def run(self, gen, **models) -> None:
        """Run every step of ``gen`` (a `varkit.generation.loop.Generation`, started).

        It must leave ``gen`` having accepted every step in order, ``0 ..
        gen.num_steps - 1``, each once (``gen.accept``), so that ``gen.finish()`` returns
        the generated codes. ``gen.forward_passes`` counts the forward passes it ran.
        The whole call runs inside the loop's autocast region; wrap the sampler and unit
        calls in ``gen.full_precision()`` as `varkit.generation.loop.Generation.run` does.
        """
        raise NotImplementedError
