"""CUDA graphs of the model's generation steps (``generate(..., cuda_graphs=True)``).

An eager step launches every kernel of every block from Python (about 11k launches
for a d16 VAR generation); at small batches the GPU waits on the launches. A CUDA
graph records a step's kernels once and replays them with one launch.

`GraphedSteps` is a step runner for `varkit.generation.loop.Generation`
that captures the model's forward pass of each step on first use and replays it
afterwards:

- a step whose length occurs once among the steps after the first (every scale of
  the ``scale`` unit, and step 0 of every unit) gets its own graph, recorded with its
  positions as Python numbers;
- steps of a length that repeats (the 255 one-code steps of ``token``, the cells of
  ``patch``) share one *static-shape* graph: ``model.forward_step(..., position=...)``
  takes the step's first position as a device tensor, writes the KV cache at those
  indices and masks the cache by position instead of slicing it, so the same kernels
  on the same shapes serve every position.

Only the transformer is graphed; guidance, sampling, editing and the unit's feature
arithmetic stay eager between replays (a few kernels per step, none of which reads
back to the host). Inputs and labels are copied into the graphs' static buffers. A
replay computes what the same step computes eagerly, so a per-step graph gives the
eager loop's codes; a static-shape step attends over the masked whole cache instead
of a slice of it, which agrees with the sliced step to float rounding (in bfloat16 a
near-tie between two codes can then go the other way).
The graphs, their static buffers and their KV cache
are kept per model and reused by later calls with the same batch, dtype and device,
and dropped when any of these or the model's weight tensors change. With an autocast
``dtype`` the graphs cast the weights inside each step (autocast's cast cache cannot
live across graph captures); converting the weights instead
(``pipe.to(dtype=torch.bfloat16)``) avoids the casts altogether.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable

import attrs
import torch

from varkit.errors import VarkitError
from varkit.model.kv_cache import KVCache

#: ``capture(fn, pool) -> (replay, output, pool)``: record ``fn`` (which returns the
#: step's logits) so that ``replay()`` recomputes ``output`` in place.
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor, object]]


def cuda_capture(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor, object]:
    """Record ``fn`` as a CUDA graph in memory pool ``pool`` (None: a new pool).

    ``fn`` runs once eagerly on a side stream first, so that lazy initialisation
    (cuBLAS workspaces, kernel selection) happens outside the capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out, graph.pool()


@attrs.define
class _Graph:
    """One captured step: its replay, static input, position and logits buffers."""

    replay: Callable[[], None]
    logits: torch.Tensor
    inputs: torch.Tensor | None
    start: torch.Tensor | None


class GraphedSteps:
    """A step runner that replays CUDA graphs of ``model.forward_step``.

    Args:
        model: the AR model (in eval mode while generating).
        capture: how a step is recorded (`cuda_capture`; tests pass an eager
            stand-in to check the static buffers and the static-shape steps on CPU).
    """

    def __init__(self, model, *, capture: Capture = cuda_capture):
        self.model = model
        self.capture = capture
        later = list(model.step_lengths[1:])
        #: Step lengths shared by several steps after the first: one static-shape graph each.
        self.shared_lengths = frozenset(n for n in later if later.count(n) > 1)
        self._key: tuple | None = None
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.labels: torch.Tensor | None = None
        self.cache: KVCache | None = None
        self.dtype: torch.dtype | None = None

    def graph_key(self, step: int) -> tuple:
        """Which graph runs ``step``: ``("static", length)`` shared, or ``("step", step)`` its own."""
        n = self.model.step_lengths[step]
        return ("static", n) if step > 0 and n in self.shared_lengths else ("step", step)

    def _weights(self) -> tuple[int, ...]:
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return tuple(t.data_ptr() for t in tensors)

    def start(self, labels: torch.Tensor, dtype: torch.dtype | None) -> None:
        key = (tuple(labels.shape), labels.dtype, labels.device, dtype, self._weights())
        if key != self._key:
            # Graphs read the weights, labels and cache at the addresses they were
            # recorded with: anything else needs new graphs.
            self.graphs, self.pool = {}, None
            self.labels = labels.clone()
            self.cache = self.model.new_cache(labels.shape[0], dtype=dtype, device=labels.device, static=True)
            self.dtype = dtype
            self._key = key
        self.labels.copy_(labels)
        self.cache.length = 0

    def _no_cast_cache(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # Casts cached by autocast during one capture would be read by later graphs
        # at addresses the allocator may hand out again: each graph casts for itself.
        return torch.autocast(device_type=self.labels.device.type, dtype=self.dtype, cache_enabled=False)

    def _record(self, step: int, inputs: torch.Tensor | None) -> _Graph:
        begin = self.model.step_starts[step]
        static = self.graph_key(step)[0] == "static"
        graph_inputs = None if inputs is None else inputs.clone()
        start = torch.tensor(begin, device=self.labels.device) if static else None

        def forward() -> torch.Tensor:
            self.cache.length = begin
            return self.model.forward_step(graph_inputs, self.labels, self.cache, step, position=start)

        try:
            with self._no_cast_cache():
                replay, logits, self.pool = self.capture(forward, self.pool)
        except Exception:
            self._key = None  # a half-recorded set is never reused
            raise
        return _Graph(replay=replay, logits=logits, inputs=graph_inputs, start=start)

    def __call__(self, step: int, inputs: torch.Tensor | None) -> torch.Tensor:
        begin, end = self.model.step_starts[step], self.model.step_starts[step + 1]
        key = self.graph_key(step)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._record(step, inputs)
        if inputs is not None:
            graph.inputs.copy_(inputs)
        if graph.start is not None:
            graph.start.fill_(begin)
        graph.replay()
        self.cache.length = end
        return graph.logits


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_steps(model, device: torch.device) -> GraphedSteps:
    """The graph runner of ``model`` (one per model, kept while the model lives).

    Raises:
        VarkitError: ``device`` is not a CUDA device.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        raise VarkitError(
            f"cuda_graphs=True replays CUDA graphs, but the model runs on {device}; move the pipeline to a "
            "CUDA device or leave cuda_graphs off"
        )
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = GraphedSteps(model)
    return runner
