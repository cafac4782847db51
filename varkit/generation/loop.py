"""The generation loop: one for every prediction unit, sampler and tokenizer.

A `Generation` is one batch being generated. Each step has three phases, each
a method, called in this order by `Generation.run`:

1. **forward** (`Generation.forward`): a *step runner* computes the step's
   logits from its inputs with the model and its KV cache. `EagerSteps` calls
   ``model.forward_step``; `varkit.generation.graphs.GraphedSteps` replays
   CUDA graphs of the same steps.
2. **choose** (`Generation.choose`): the sampler turns the logits into codes,
   applying classifier-free guidance; where an edit keeps the image, the image's own
   codes replace the sampled ones; the codes (or a soft sampler's mixture) are
   embedded.
3. **accept** (`Generation.accept`): the unit records the step's codes and
   builds the next step's inputs from them.

The unit and the tokenizer decide what a step is; this loop never asks which unit it
runs. Guidance doubles the batch: rows ``[0, b)`` carry the labels and rows ``[b, 2b)``
the "no class" index ``model.config.num_classes``; the sampler receives both halves
and ``t = sampler.guidance_scale(step, num_steps)``. When ``t`` is 0 at every step the
batch is not doubled at all.

A generation *strategy* (`varkit.Strategy`, ``generate_codes(..., strategy=...)``)
drives these phases in its own order: several steps in one pass (`Generation.forward_steps`),
drafted steps taken back (`Generation.rewind`), some steps run by another model
(`Generation.companion`). Without one, `Generation.run` runs every step in order.

The transformer runs inside one autocast region for the whole loop (so autocast casts
each weight once per generation, not once per step); the sampler, the editing and
the unit's feature arithmetic run in float32 inside it, with autocast switched off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Protocol

import attrs
import torch

from varkit.base import Sampler, Strategy, Tokenizer
from varkit.build import build_strategy
from varkit.errors import VarkitError
from varkit.generation.graphs import graphed_steps
from varkit.model.kv_cache import KVCache

log = logging.getLogger(__name__)

#: Autocast dtypes the loop accepts besides None / float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels that are not ``(b,)`` integers in ``[0, num_classes]`` (one device sync)."""
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise VarkitError(
            f"labels must be class indices of shape (b,) and integer dtype, got {tuple(labels.shape)} "
            f"{labels.dtype}"
        )
    if labels.numel() == 0:
        raise VarkitError("labels is empty: pass one class index per image to generate")
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync
    if low < 0 or high > num_classes:
        raise VarkitError(
            f"labels must lie in [0, {num_classes}] ({num_classes} is 'no class'), got values in [{low}, {high}]"
        )


# ------------------------------------------------------------------------ step runners


class StepRunner(Protocol):
    """What runs the model for the loop's forward phase.

    `start` is called once per generation with the (possibly doubled) labels;
    then the runner is called with ``(step, inputs)`` for the steps in order and
    returns that step's logits ``(b or 2b, l_s, v)``. The runner owns the KV cache.
    """

    cache: KVCache

    def start(self, labels: torch.Tensor, dtype: torch.dtype | None) -> None: ...

    def __call__(self, step: int, inputs: torch.Tensor | None) -> torch.Tensor: ...


class EagerSteps:
    """Runs each step with ``model.forward_step`` and a fresh preallocated cache."""

    def __init__(self, model):
        self.model = model
        self.labels: torch.Tensor | None = None
        self.cache: KVCache | None = None

    def start(self, labels: torch.Tensor, dtype: torch.dtype | None) -> None:
        self.labels = labels
        self.cache = self.model.new_cache(labels.shape[0], dtype=dtype, device=labels.device)

    def __call__(self, step: int, inputs: torch.Tensor | None) -> torch.Tensor:
        return self.model.forward_step(inputs, self.labels, self.cache, step)

    def span(self, first: int, last: int, inputs: torch.Tensor | None) -> torch.Tensor:
        """Logits of steps ``first .. last - 1`` in one pass (``model.forward_steps``)."""
        return self.model.forward_steps(inputs, self.labels, self.cache, first, last)

    def positions(self, step: int, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of the positions ``index`` of ``step`` alone (``model.forward_positions``)."""
        return self.model.forward_positions(inputs, self.labels, self.cache, step, index)


# -------------------------------------------------------------------------- the loop


class Generation:
    """One batch being generated: the loop's state, and its phases as methods.

    `run` is the whole loop::

        for step in range(num_steps):
            logits = self.forward(step)              # runner: model + KV cache
            codes, emb = self.choose(step, logits)   # sampler, guidance, kept codes
            self.accept(step, codes, emb)            # unit: record, next inputs

    A generation strategy that changes which model runs which step, which positions
    are recomputed or how many steps one forward pass accepts drives these phases
    itself (see docs/model.md, "The step loop") instead of copying them.

    Args:
        model: an `varkit.model.transformer.ARModel` (its ``unit`` decides
            the steps), in eval mode (`generate_codes` sees to it).
        tokenizer: the tokenizer whose codes the model predicts.
        sampler: picks codes from each step's logits and sets the guidance.
        labels: class indices ``(b,)`` on the model's device; ``num_classes``
            generates unconditionally.
        generator: the source of every random draw; the same seed gives the same codes.
        dtype: autocast dtype of the transformer (e.g. ``torch.bfloat16`` on GPU);
            None runs it in its own dtype (bfloat16 weights then run in bfloat16).
        known: code maps ``[(b, h_k, w_k)]`` of images being edited (the tokenizer's
            encoding of them), or None.
        keep: ``(b, l)`` bool in the unit's sequence order: True where the code of
            ``known`` replaces the sampled one (``unit.keep_positions`` makes it from a
            mask). Given together with ``known``.
        runner: what runs the model (default `EagerSteps`).
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        sampler: Sampler,
        labels: torch.Tensor,
        *,
        generator: torch.Generator,
        dtype: torch.dtype | None = None,
        known: list[torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,
        runner: StepRunner | None = None,
    ):
        self.model, self.tokenizer, self.sampler, self.generator = model, tokenizer, sampler, generator
        self.unit = model.unit
        num_classes = model.config.num_classes
        check_labels(labels, num_classes)
        self.device = labels.device
        self.batch = b = labels.shape[0]
        self.num_steps = len(self.unit.step_lengths)
        #: First position of each step, and the sequence length at the end.
        self.step_starts = tuple(model.step_starts)
        self.guidance = [float(sampler.guidance_scale(s, self.num_steps)) for s in range(self.num_steps)]
        self.doubled = any(t != 0 for t in self.guidance)
        if self.doubled:
            labels = torch.cat([labels, torch.full_like(labels, num_classes)])  # (2b,)
        self.labels = labels
        if dtype is not None and dtype != torch.float32 and dtype not in LOW_PRECISION:
            raise VarkitError(
                f"dtype {dtype} is not an autocast dtype; use torch.bfloat16, torch.float16 or None"
            )
        self.dtype = None if dtype == torch.float32 else dtype
        self.known, self.keep = self._check_edit(known, keep, b)
        self.runner = runner if runner is not None else EagerSteps(model)
        # A sampler object that only has sample/soft_weights (not derived from Sampler)
        # gets the base class's guidance-then-sample.
        self._sample_guided = getattr(sampler, "sample_guided", None) or functools.partial(
            Sampler.sample_guided, sampler
        )
        self._codebook: torch.Tensor | None = None
        self.state: dict = {}
        self.inputs: torch.Tensor | None = None  # (b, l_s, c); step 0 starts from the class embedding
        #: Forward passes run so far (a strategy that accepts several steps per pass runs fewer).
        self.forward_passes = 0
        #: Steps accepted so far (`accept` takes them in order).
        self.accepted = 0
        #: What a strategy reports about its run (e.g. the drafter's forward passes).
        self.stats: dict[str, Any] = {}

    def _check_edit(self, known, keep, b):
        """``known`` as one ``(b, l)`` sequence in the unit's order, and ``keep`` ``(b, l)``."""
        if known is None and keep is None:
            return None, None
        if known is None or keep is None:
            raise VarkitError("editing needs both the image's codes (known) and where to keep them (keep)")
        expected = [(b, h, w) for h, w in self.tokenizer.schedule]
        got = [tuple(c.shape) for c in known]
        if got != expected:
            raise VarkitError(
                f"known codes have shapes {got} but this tokenizer and batch need {expected}; encode the "
                "images with the model's tokenizer"
            )
        seq_len = self.step_starts[-1]
        if tuple(keep.shape) != (b, seq_len) or keep.dtype != torch.bool:
            raise VarkitError(
                f"keep must be a ({b}, {seq_len}) bool tensor in the unit's sequence order, got "
                f"{tuple(keep.shape)} {keep.dtype}; make it with model.unit.keep_positions(mask)"
            )
        known_seq = self.unit.targets([c.to(self.device) for c in known])  # (b, l)
        return known_seq, keep.to(self.device)

    # -- precision -----------------------------------------------------------------
    def model_precision(self):
        """The loop's one autocast region (a no-op without an autocast dtype)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def full_precision(self):
        """Autocast off inside the region: the sampler and the tokenizer's arithmetic stay float32.

        Leaving autocast this way keeps its cast cache, which is dropped only when the
        outermost region ends.
        """
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    # -- the three phases ------------------------------------------------------------
    def start(self) -> None:
        """Prepare a fresh generation: the runner's cache, the unit's state, no inputs."""
        self.runner.start(self.labels, self.dtype)
        self.state = self.unit.start_generation(self.batch, self.tokenizer)
        self.inputs = None
        self.forward_passes = 0
        self.accepted = 0
        self.stats = {}

    def forward(self, step: int) -> torch.Tensor:
        """Logits of ``step`` ``(b or 2b, l_s, v)`` from the current inputs."""
        inputs = self.inputs
        if inputs is not None and self.doubled:
            inputs = torch.cat([inputs, inputs])  # both halves see the same codes
        self.forward_passes += 1
        return self.runner(step, inputs)

    def choose(self, step: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes ``(b, l_s)`` of ``step`` and the embeddings ``(b, l_s, c)`` to feed on.

        Guidance and sampling are the sampler's (``sample_guided``). Where ``keep`` is
        True the image's own code replaces the sampled one, and its embedding replaces
        a soft sampler's mixture, before the unit builds the next step from them.
        """
        logits = logits.float()
        cond, uncond = logits.chunk(2) if self.doubled else (logits, None)
        codes, weights = self._sample_guided(
            cond,
            uncond,
            t=self.guidance[step],
            step=step,
            num_steps=self.num_steps,
            generator=self.generator,
        )
        keep = known = None
        if self.keep is not None:
            begin, end = self.step_starts[step], self.step_starts[step + 1]
            keep, known = self.keep[:, begin:end], self.known[:, begin:end]  # (b, l_s)
            codes = torch.where(keep, known, codes)
        if weights is None:
            return codes, self.tokenizer.embed(codes)  # (b, l_s, c)
        # Smooth mode: a mixture of codebook rows instead of the sampled code.
        if self._codebook is None:
            self._codebook = self.tokenizer.codebook.float()
        emb = weights.float() @ self._codebook  # (b, l_s, v) @ (v, c)
        if keep is not None:
            emb = torch.where(keep[..., None], self.tokenizer.embed(known).float(), emb)
        return codes, emb

    def accept(self, step: int, codes: torch.Tensor, emb: torch.Tensor) -> None:
        """The unit records ``step``'s codes and builds the next step's inputs."""
        if step != self.accepted:
            raise VarkitError(f"step {step} accepted out of order: steps are accepted once each, in order")
        self.inputs = self.unit.generation_step(self.state, step, codes, emb, self.tokenizer)
        self.accepted += 1

    # -- what strategies use ---------------------------------------------------------
    def forward_steps(self, first: int, last: int, inputs: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(b or 2b, l_first + ... + l_{last-1}, v)`` of steps ``first .. last - 1``
        in one forward pass.

        ``inputs`` are the span's inputs after step 0, ``(b, n, c)`` (or codes ``(b, n)``):
        ``self.inputs`` for ``first`` followed by those of the later steps, which a
        strategy builds from drafted codes (``unit.generation_step`` on a scratch
        state) or from codes generated elsewhere. The KV cache must hold exactly the
        steps before ``first``; the span's are appended (`rewind` takes them back).
        """
        if inputs is not None and self.doubled:
            inputs = torch.cat([inputs, inputs])
        span = getattr(self.runner, "span", None)
        if span is None:
            raise VarkitError(
                f"the step runner {type(self.runner).__name__} runs one step at a time; generation "
                "strategies need eager steps (cuda_graphs=False)"
            )
        self.forward_passes += 1
        return span(first, last, inputs)

    def forward_positions(self, step: int, index: torch.Tensor) -> torch.Tensor:
        """Logits ``(b or 2b, n, v)`` of the positions ``index`` ``(n,)`` of ``step`` from the
        current inputs; the step's other positions are skipped (no keys; later steps mask them)."""
        runner = getattr(self.runner, "positions", None)
        if runner is None:
            raise VarkitError(
                f"the step runner {type(self.runner).__name__} runs whole steps; generation "
                "strategies need eager steps (cuda_graphs=False)"
            )
        inputs = torch.cat([self.inputs, self.inputs]) if self.doubled else self.inputs
        self.forward_passes += 1
        return runner(step, inputs, index)

    def split(self, first: int, last: int, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`forward_steps` logits ``(b', n, v)`` cut into each step's ``(b', l_s, v)``."""
        return logits.split(self.unit.step_lengths[first:last], dim=1)

    def rewind(self, step: int) -> None:
        """Forget the KV cache from ``step`` on (steps a strategy drafted and did not accept)."""
        if step < self.accepted:
            raise VarkitError(f"cannot rewind to step {step}: steps up to {self.accepted - 1} are accepted")
        self.runner.cache.truncate(self.step_starts[step])

    def companion(self, model, tokenizer: Tokenizer) -> Generation:
        """A generation of the same batch by another model, started: same labels, sampler,
        generator and dtype (e.g. collaborative decoding's drafter).

        Its random draws come from the same generator, so a companion that runs the
        steps this generation would have run draws exactly what this one would have.
        """
        other = Generation(
            model,
            tokenizer,
            self.sampler,
            self.labels[: self.batch],
            generator=self.generator,
            dtype=self.dtype,
            runner=EagerSteps(model),
        )
        other.start()
        return other

    def run_strategy(self, strategy: Strategy, **models: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`run`, with ``strategy`` driving the phases; returns `finish`'s ``(codes, f_hat)``.

        Raises:
            VarkitError: the strategy does not work with this unit, refuses the
                generation (`varkit.Strategy.check`), or left steps unaccepted.
        """
        unit = getattr(self.unit, "name", type(self.unit).__name__)
        if not strategy.supports(unit):
            works = "every unit" if strategy.units is None else "the units " + ", ".join(strategy.units)
            raise VarkitError(
                f"strategy {strategy.name!r} does not work with unit {unit!r}; it works with {works}. "
                "Generate without it or choose another strategy."
            )
        strategy.check(self, **models)
        self.start()
        with self.model_precision():
            strategy.run(self, **models)
        if self.accepted != self.num_steps:
            raise VarkitError(
                f"strategy {strategy.name!r} accepted {self.accepted} of {self.num_steps} steps; a "
                "strategy must accept every step"
            )
        return self.finish()

    def finish(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(codes, f_hat)``: the code maps ``[(b, h_k, w_k)]`` and the feature map to decode."""
        f_hat = self.unit.finish_generation(self.state, self.tokenizer)
        return self.unit.generated_codes(self.state), f_hat

    def run(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every step in order; returns `finish`'s ``(codes, f_hat)``."""
        self.start()
        with self.model_precision():
            for step in range(self.num_steps):
                logits = self.forward(step)
                with self.full_precision():
                    codes, emb = self.choose(step, logits)
                    self.accept(step, codes, emb)
        return self.finish()


# ----------------------------------------------------------------------- entry points


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _runner(model, cuda_graphs: bool, device: torch.device) -> StepRunner:
    return graphed_steps(model, device) if cuda_graphs else EagerSteps(model)


@attrs.frozen
class Companion:
    """Another model of a strategy (e.g. collaborative decoding's drafter) and its tokenizer."""

    model: Any
    tokenizer: Tokenizer


def companion_of(name: str, value: Any) -> Companion:
    """A strategy's model option as a `Companion`: a pipeline (anything with ``model`` and
    ``tokenizer``) or a ``(model, tokenizer)`` pair."""
    if isinstance(value, Companion):
        return value
    if isinstance(value, tuple | list) and len(value) == 2:
        return Companion(*value)
    if hasattr(value, "model") and hasattr(value, "tokenizer"):
        return Companion(value.model, value.tokenizer)
    if isinstance(value, str | bytes) or hasattr(value, "__fspath__"):
        raise VarkitError(
            f"strategy option {name}={value!r} is a path; load it first (varkit.load(path)) and pass the "
            "pipeline, or give it in a recipe, whose pipeline loads it"
        )
    raise VarkitError(
        f"strategy option {name} must be a loaded pipeline or a (model, tokenizer) pair, got {type(value).__name__}"
    )


def _generate(
    model, tokenizer, sampler, labels, *, generator, dtype, known, keep, cuda_graphs, strategy, options
):
    runner = _runner(model, cuda_graphs, labels.device)
    chosen, models = build_strategy(None, strategy, **options)
    if chosen is not None and cuda_graphs:
        raise VarkitError(
            f"strategy {chosen.name!r} runs eager steps; generate with cuda_graphs=False or without it"
        )
    models = {name: companion_of(name, value) for name, value in models.items() if value is not None}
    with _eval_mode(model), contextlib.ExitStack() as stack:
        for other in models.values():
            stack.enter_context(_eval_mode(other.model))
        gen = Generation(
            model,
            tokenizer,
            sampler,
            labels,
            generator=generator,
            dtype=dtype,
            known=known,
            keep=keep,
            runner=runner,
        )
        if chosen is None:
            return gen.run()
        return gen.run_strategy(chosen, **models)


def generate_codes(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
    known: list[torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    cuda_graphs: bool = False,
    strategy: str | Strategy | None = None,
    **strategy_options: Any,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Generate one code pyramid per label.

    Args:
        model: an `varkit.model.transformer.ARModel` (its ``unit`` decides
            the steps). It runs in eval mode here and is put back in its mode after.
        tokenizer: the tokenizer whose codes the model predicts.
        sampler: picks codes from each step's logits and sets the guidance.
        labels: class indices ``(b,)`` on the model's device; ``num_classes``
            generates unconditionally.
        generator: the source of every random draw; the same seed gives the same codes.
        dtype: autocast dtype of the transformer (e.g. ``torch.bfloat16`` on GPU);
            None runs it in its own dtype. The tokenizer's feature arithmetic always
            runs in float32, outside autocast.
        known: for editing, the code maps ``[(b, h_k, w_k)]`` of the images edited.
        keep: for editing, ``(b, l)`` bool in the unit's sequence order: where the
            codes of ``known`` replace the sampled ones (see
            `varkit.generation.editing.edit_codes`, which makes both).
        cuda_graphs: replay CUDA graphs of the model's steps (CUDA only; see
            `varkit.generation.graphs`), which says how their codes compare.
        strategy: a generation strategy (a registered name or a `varkit.Strategy`)
            that runs the steps its own way; None runs every step in order.
        strategy_options: the strategy's options (fields of its Config, and the
            models it names, e.g. ``draft=pipe`` for ``collaborative``).

    Returns:
        ``(codes, f_hat)``: the code maps ``[(b, h_k, w_k)]`` (int64) and the feature
        map ``(b, c, hK, wK)`` they decode from. Both are ordinary tensors (not
        inference tensors), so they can feed training code afterwards.
    """
    with torch.inference_mode():
        codes, f_hat = _generate(
            model,
            tokenizer,
            sampler,
            labels,
            generator=generator,
            dtype=dtype,
            known=known,
            keep=keep,
            cuda_graphs=cuda_graphs,
            strategy=strategy,
            options=strategy_options,
        )
    # Clones made outside inference mode are normal tensors that autograd may save.
    return [c.clone() for c in codes], f_hat.clone()


def decode_images(
    tokenizer: Tokenizer, f_hat: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode ``f_hat`` ``(b, c, hK, wK)`` into images ``(b, 3, H, W)`` in [0, 1] (float32).

    On CUDA with a low-precision ``dtype`` the decoder runs under autocast in that
    dtype on a channels_last feature map (the pipeline keeps the tokenizer's weights
    channels_last on CUDA); elsewhere it runs in float32.
    """
    if f_hat.device.type == "cuda" and dtype in LOW_PRECISION:
        with torch.autocast(device_type="cuda", dtype=dtype):
            images = tokenizer.features_to_image(f_hat.float().contiguous(memory_format=torch.channels_last))
    else:
        images = tokenizer.features_to_image(f_hat.float())  # (b, 3, H, W) in [-1, 1]
    return ((images.float() + 1) / 2).clamp(0, 1)


def generation_dtype(model, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a generation computes in: ``dtype``, else the model's weights' when low precision."""
    if dtype is not None:
        return dtype
    weights = model.head.weight.dtype
    return weights if weights in LOW_PRECISION else None


def generate_images(
    model,
    tokenizer: Tokenizer,
    sampler: Sampler,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
    known: list[torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    cuda_graphs: bool = False,
    strategy: str | Strategy | None = None,
    **strategy_options: Any,
) -> torch.Tensor:
    """Generate one image per label: `generate_codes`, then the tokenizer's decoder.

    Arguments as `generate_codes`. The decoder runs as `decode_images` says:
    in float32, or on CUDA in the generation's low-precision dtype, channels_last.

    Returns:
        Images ``(b, 3, H, W)`` in [0, 1] (float32).
    """
    with torch.inference_mode():
        _, f_hat = _generate(
            model,
            tokenizer,
            sampler,
            labels,
            generator=generator,
            dtype=dtype,
            known=known,
            keep=keep,
            cuda_graphs=cuda_graphs,
            strategy=strategy,
            options=strategy_options,
        )
        images = decode_images(tokenizer, f_hat, dtype=generation_dtype(model, dtype))
    return images.clone()
