"""Built-in generation strategies: ``collaborative``, ``jacobi`` and ``prune_tokens``.

Each drives the phases of the one generation loop (`varkit.Strategy`): the sampler,
guidance, editing and the unit's bookkeeping stay the loop's.

- ``collaborative`` (next-scale; CoDe, Chen et al. 2024): one model (the *drafter*,
  typically the large one) generates the coarse steps before ``switch_step``; the model
  being called (the *refiner*, typically small) fills its KV cache from the drafter's
  codes in one teacher-forced pass and generates the rest.
- ``jacobi`` (next-token and next-patch; speculative Jacobi decoding, Teng et al. 2024):
  each forward pass verifies a window of drafted steps in parallel and accepts the
  longest prefix of them that the base sampler confirms; see `Jacobi` for what is exact.
- ``prune_tokens`` (next-scale; FastVAR's cached token pruning, Guo et al. 2025): at
  the chosen steps only the positions whose input changed most from the previous scale
  are run through the transformer; the others take the previous scale's logits,
  upsampled.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from einops import rearrange

from varkit.base import Strategy
from varkit.errors import VarkitError
from varkit.hookspecs import hookimpl

# ------------------------------------------------------------------- collaborative


@attrs.frozen(kw_only=True)
class CollaborativeConfig:
    """Options of ``collaborative``."""

    #: The drafter: in a recipe, the path of its pretrained directory or run; in Python
    #: pass ``draft=pipe`` (a loaded pipeline) instead.
    draft: str | None = None
    #: The first step the refiner runs; the drafter runs steps ``0 .. switch_step - 1``.
    #: Must lie in ``[1, steps - 1]``.
    switch_step: int | None = None


def _same_tokenizer(a, b) -> str | None:
    """Why tokenizers ``a`` and ``b`` do not code alike, or None when they do."""
    if a is b:
        return None
    for what in ("schedule", "vocab_size", "code_dim"):
        if getattr(a, what) != getattr(b, what):
            return f"its tokenizer's {what} is {getattr(b, what)}, the refiner's {getattr(a, what)}"
    ca, cb = a.codebook.detach(), b.codebook.detach()
    if ca.shape != cb.shape or not torch.equal(ca.float().cpu(), cb.float().cpu()):
        return "its tokenizer has another codebook (the same shapes, other weights)"
    return None


class Collaborative(Strategy):
    """Collaborative decoding: the drafter generates the coarse steps, the refiner the rest.

    The drafter's codes of steps ``0 .. K-1`` (``K = switch_step``) go through the
    refiner's unit (the two share the tokenizer, so the refiner builds the same inputs
    from them) and one teacher-forced forward pass of the refiner over those steps fills
    its KV cache; the refiner then generates steps ``K ..`` as usual. Both draw from
    the one generator, so with drafter = refiner the codes are those of plain
    generation (up to the rounding of the one-pass prefill against step by step).

    Checks, before any step: a drafter is given, its tokenizer codes as the refiner's
    (schedule, vocabulary, code width and codebook), it has as many classes and the
    same steps, and ``1 <= switch_step <= steps - 1``.
    """

    name = "collaborative"
    Config = CollaborativeConfig
    units = ("scale",)
    models = ("draft",)

    def check(self, gen, draft=None) -> None:
        if draft is None:
            raise VarkitError(
                "strategy 'collaborative' needs a drafter: generate(..., strategy='collaborative', "
                "draft=other_pipe, switch_step=K), or `strategy: {name: collaborative, draft: RUN_DIR, "
                "switch_step: K}` in a recipe"
            )
        k = self.config.switch_step
        if k is None or not 1 <= k <= gen.num_steps - 1:
            raise VarkitError(
                f"strategy 'collaborative': switch_step is {k} but must lie in [1, {gen.num_steps - 1}] "
                f"for this model's {gen.num_steps} steps (the drafter runs the steps before it, the "
                "refiner the rest)"
            )
        why = _same_tokenizer(gen.tokenizer, draft.tokenizer)
        if why is not None:
            raise VarkitError(
                f"strategy 'collaborative': the drafter does not share the refiner's tokenizer: {why}. "
                "Both models must be trained on the codes of one tokenizer"
            )
        ours, theirs = gen.model.config.num_classes, draft.model.config.num_classes
        if ours != theirs:
            raise VarkitError(
                f"strategy 'collaborative': the drafter has {theirs} classes, the refiner {ours}; "
                "both must be trained on the same classes"
            )
        if tuple(draft.model.unit.step_lengths) != tuple(gen.unit.step_lengths):
            raise VarkitError(
                f"strategy 'collaborative': the drafter's steps {tuple(draft.model.unit.step_lengths)} "
                f"differ from the refiner's {tuple(gen.unit.step_lengths)}; use two next-scale models "
                "over the same scales"
            )

    def run(self, gen, draft=None) -> None:
        k = self.config.switch_step
        drafter = gen.companion(draft.model, draft.tokenizer)
        prefill = []  # the refiner's inputs of steps 1 .. K-1
        for step in range(k):
            logits = drafter.forward(step)
            with gen.full_precision():
                codes, emb = drafter.choose(step, logits)
                drafter.accept(step, codes, emb)
                gen.accept(step, codes, emb)
            if step < k - 1:
                prefill.append(gen.inputs)
        gen.stats["draft_passes"] = drafter.forward_passes
        gen.forward_steps(0, k, torch.cat(prefill, dim=1) if prefill else None)  # fills the cache
        for step in range(k, gen.num_steps):
            logits = gen.forward(step)
            with gen.full_precision():
                codes, emb = gen.choose(step, logits)
                gen.accept(step, codes, emb)


# --------------------------------------------------------------------------- jacobi


@attrs.frozen(kw_only=True)
class JacobiConfig:
    """Options of ``jacobi``."""

    #: The most steps run per forward pass: the step whose input is known and up to
    #: ``window - 1`` drafted ones after it.
    window: int = attrs.field(default=16, validator=v.ge(2))
    #: Size each pass by the last: a pass that accepted no drafted step halves the
    #: next (down to 2), one that did grows it to at least twice what it accepted (up
    #: to ``window``). Drafts that keep failing (a high-entropy sampler) then cost
    #: about twice plain generation's work instead of ``window`` times; False always
    #: runs ``window`` steps.
    adaptive: bool = True


class Jacobi(Strategy):
    """Speculative Jacobi decoding over raster steps (tokens or patches).

    Each forward pass runs the first step not yet accepted, whose input is known, and
    the ``window - 1`` steps after it on *drafted* codes (the previous pass's output
    for them, initially copies of the last accepted step), with causal attention among
    them. The base sampler then draws every step of the window from these logits, and
    the loop accepts the first step's draw and each next one whose drafted input was
    exactly what the accepted draw before it builds (the same codes and embeddings for
    every image of the batch). The rejected steps' cache entries are taken back and
    their draws become the next drafts. Every pass accepts at least one step. With
    ``adaptive`` (the default) a pass that accepted no drafted step halves the next one
    (down to 2 steps), so drafts that keep failing waste little.

    What is exact: every accepted code is a fresh draw of the base sampler from the
    model's logits given exactly the codes accepted before it, so the codes follow the
    distribution of plain generation with that sampler, whatever the sampler (top-k,
    top-p, temperature, guidance, editing). With greedy sampling they are the codes of
    plain greedy generation. What differs: the logits of a step come from a pass over
    several steps instead of one, which rounds differently (float32: about 1e-6;
    a greedy tie within that may break the other way, more likely in bfloat16); and a
    stochastic sampler consumes the generator in another order, so the same seed gives
    other (equally distributed) images than plain generation. This acceptance rule
    ("the draw equals the draft") accepts a drafted code with probability
    ``p(draft)``; the probabilistic rule of speculative sampling
    (``min(1, p/q)`` with a residual resample), which accepts more under
    high-entropy samplers, needs the sampler's probabilities, which the sampler
    contract does not expose. A soft sampler (VAR's smooth mode) feeds mixtures that
    rarely repeat exactly, so it accepts about one step per pass.
    """

    name = "jacobi"
    Config = JacobiConfig
    units = ("token", "patch")

    def run(self, gen) -> None:
        logits = gen.forward(0)
        with gen.full_precision():
            last = gen.choose(0, logits)
            gen.accept(0, *last)
        drafts: list[tuple[torch.Tensor, torch.Tensor]] = []
        done, passes, size = 1, 0, self.config.window
        while done < gen.num_steps:
            span = min(size, gen.num_steps - done)
            drafts = (drafts + [drafts[-1] if drafts else last] * span)[: span - 1]
            with gen.full_precision():
                inputs = [gen.inputs, *self._draft_inputs(gen, done, drafts)]
            logits = gen.forward_steps(done, done + span, torch.cat(inputs, dim=1))
            with gen.full_precision():
                drawn = [gen.choose(done + i, x) for i, x in enumerate(gen.split(done, done + span, logits))]
                accepted = 1
                while accepted < span and _same(drawn[accepted - 1], drafts[accepted - 1]):
                    accepted += 1
                gen.rewind(done + accepted)
                for i in range(accepted):
                    gen.accept(done + i, *drawn[i])
            last, drafts = drawn[accepted - 1], drawn[accepted:]
            done += accepted
            if self.config.adaptive:  # the window never depends on a draw it then judges
                size = (
                    max(2, size // 2) if accepted == 1 else min(self.config.window, max(size, 2 * accepted))
                )
            passes += 1
        gen.stats["jacobi_passes"] = passes

    @staticmethod
    def _draft_inputs(gen, first: int, drafts) -> list[torch.Tensor]:
        """The inputs of steps ``first + 1 ..`` built from the drafted codes of ``first ..``.

        The unit builds them from a scratch copy of its state, which the drafts leave
        untouched: the raster units keep lists of codes.
        """
        scratch = {k: list(x) if isinstance(x, list) else x for k, x in gen.state.items()}
        return [
            gen.unit.generation_step(scratch, first + i, codes, emb, gen.tokenizer)
            for i, (codes, emb) in enumerate(drafts)
        ]


def _same(drawn: tuple[torch.Tensor, torch.Tensor], draft: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(drawn[0], draft[0]) and torch.equal(drawn[1], draft[1])


# -------------------------------------------------------------------- prune_tokens


def _check_ratios(instance, attribute, value):
    if any(not 0.0 < r <= 1.0 for r in value):
        raise ValueError(f"ratios must lie in (0, 1] (1 runs a step whole), got {list(value)}")


@attrs.frozen(kw_only=True)
class PruneTokensConfig:
    """Options of ``prune_tokens``."""

    #: The share of positions run at each of the last ``len(ratios)`` steps, in order:
    #: ``[0.5, 0.25]`` runs half the positions of the second-to-last step and a quarter
    #: of the last. 1.0 runs a step whole; the first two steps always run whole.
    ratios: tuple[float, ...] = attrs.field(default=(0.5, 0.25), validator=_check_ratios)


class PruneTokens(Strategy):
    """Cached token pruning at the large scales (FastVAR's pivotal tokens and cached restoration).

    At a pruned step ``k`` each position gets the score ``||x_k - up(x_{k-1})||_2``:
    the distance of its input feature ``x_k`` (the running feature map at scale ``k``,
    what the unit feeds) to the previous step's input upsampled bilinearly to scale
    ``k``. Positions where the map changed little since the coarser scale carry little
    new detail. The ``ceil(ratio · l_k)`` positions of highest score (summed over the
    batch: one set per batch) run through the transformer; the others are skipped (no
    keys and values; later steps do not attend to them) and take the previous step's
    logits upsampled bilinearly to scale ``k``. The sampler then draws every position
    as usual.

    With every ratio 1.0 each step runs whole: plain generation, exactly.
    """

    name = "prune_tokens"
    Config = PruneTokensConfig
    units = ("scale",)

    def check(self, gen) -> None:
        pruned = len(self.config.ratios)
        if pruned > gen.num_steps - 2:
            raise VarkitError(
                f"strategy 'prune_tokens': {pruned} ratios but this model has {gen.num_steps} steps; "
                f"prune at most the last {gen.num_steps - 2} (the first two steps always run whole)"
            )

    def run(self, gen) -> None:
        ratios = [1.0] * (gen.num_steps - len(self.config.ratios)) + list(self.config.ratios)
        schedule = gen.tokenizer.schedule
        previous: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's inputs, logits
        computed = 0
        for step in range(gen.num_steps):
            inputs = gen.inputs
            if ratios[step] >= 1.0:
                logits = gen.forward(step)
                computed += logits.shape[1]
            else:
                with gen.full_precision():
                    index = self._pivotal(
                        inputs, previous[0], schedule[step - 1], schedule[step], ratios[step]
                    )
                kept = gen.forward_positions(step, index)
                with gen.full_precision():
                    logits = _resize(previous[1], schedule[step - 1], schedule[step])
                    logits[:, index] = kept.float()
                computed += index.numel()
            with gen.full_precision():
                codes, emb = gen.choose(step, logits)
                gen.accept(step, codes, emb)
            previous = (inputs, logits)
        gen.stats["positions_run"] = computed
        gen.stats["positions"] = sum(gen.unit.step_lengths)

    @staticmethod
    def _pivotal(inputs, before, coarse, fine, ratio) -> torch.Tensor:
        """The positions ``(n,)`` of step ``fine`` to run, increasing: the highest scores."""
        upsampled = _resize(before.float(), coarse, fine)  # (b, l_k, c)
        score = (inputs.float() - upsampled).norm(dim=-1).sum(0)  # (l_k,)
        n = max(1, math.ceil(ratio * score.numel()))
        return score.topk(n).indices.sort().values


def _resize(x: torch.Tensor, coarse: tuple[int, int], fine: tuple[int, int]) -> torch.Tensor:
    """``(b, h·w, ch)`` on the ``coarse`` grid -> ``(b, H·W, ch)`` on the ``fine`` grid (bilinear)."""
    grid = rearrange(x, "b (h w) ch -> b ch h w", h=coarse[0], w=coarse[1])
    grid = F.interpolate(grid, size=tuple(fine), mode="bilinear", align_corners=False)
    return rearrange(grid, "b ch h w -> b (h w) ch")


@hookimpl
def varkit_register_strategies(register):
    register(Collaborative)
    register(Jacobi)
    register(PruneTokens)
