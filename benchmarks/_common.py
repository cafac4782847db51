"""Pieces shared by the model and generation benchmarks.

Machine description, waiting for a quiet machine, interleaved timing with medians,
peak-memory probes, fresh-subprocess runs, markdown tables, and the recipes of the
benchmarked models (built through :func:`varkit.recipe.from_dict` and
:mod:`varkit.build`, exactly as a run builds them).

The scripts beside this module put ``benchmarks/`` first on ``sys.path`` (Python does
that for the script's own folder), so ``import _common`` works from the repository
root: ``.venv/bin/python benchmarks/model_speed.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: VAR's tokenizer geometry (256 px, 16× down, 4096 codes of 32 dims, scales 1..16 =
#: 680 positions) on a narrow conv backbone: the benchmarks time the transformer and
#: the per-step feature arithmetic (codebook, phi convs, resizes), never the encoder
#: or decoder, so the 109M-parameter backbone would only cost build time and memory.
MSVQ_256 = {
    "name": "msvq",
    "image_size": 256,
    "ch": 16,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 1,
    "norm_groups": 8,
    "vocab_size": 4096,
    "code_dim": 32,
    "schedule": "1,2,3,4,5,6,8,10,13,16",
}
#: The single-scale tokenizer of the raster and next-patch units at the same final
#: grid (16×16), vocabulary and code width.
VQ_256 = {k: v for k, v in MSVQ_256.items() if k != "schedule"} | {"name": "vq"}

#: VAR's sampling settings of the reported FIDs.
SAMPLER = {"name": "topk_topp", "cfg": 1.5, "top_k": 900, "top_p": 0.96}


def recipe_dict(*, unit: dict, depth: int, tokenizer: dict | None = None, num_classes: int = 1000) -> dict:
    """A recipe (plain data) for a VAR-shaped model of ``depth`` blocks (width 64·depth)."""
    if tokenizer is None:
        tokenizer = MSVQ_256 if unit["name"] == "scale" else VQ_256
    return {
        "out_dir": "/tmp/varkit-bench",
        "tokenizer": dict(tokenizer),
        "unit": dict(unit),
        "attention": {"name": "sdpa"},
        "sampler": dict(SAMPLER),
        "model": {"depth": depth, "width": 0, "num_classes": num_classes},
        "data": {"resolution": tokenizer["image_size"], "num_classes": num_classes},
    }


def build(recipe: dict, device: torch.device, *, seed: int = 0):
    """``(tokenizer, model, sampler)`` of a recipe dict, seeded, eval-frozen tokenizer."""
    from varkit.build import build_model, build_sampler, build_tokenizer
    from varkit.recipe import from_dict

    torch.manual_seed(seed)
    validated = from_dict(recipe)
    tokenizer = build_tokenizer(validated, device=device).eval().requires_grad_(False)
    model = build_model(validated, tokenizer, device=device)
    return tokenizer, model, build_sampler(validated)


# ------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    return os.getloadavg()[0]


def machine(device: torch.device) -> dict:
    """What the numbers were measured on: CPU, threads used, torch, GPU, date, load."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "date": datetime.date.today().isoformat(),
        "load_1min": round(load_average(), 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def wait_for_quiet(max_load: float, *, poll_s: float = 30.0, timeout_s: float = 1200.0) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (or the timeout); return it."""
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        sys.stderr.write(f"load {load:.2f} >= {max_load}: waiting {poll_s:.0f} s\n")
        time.sleep(poll_s)
        load = load_average()
    if load >= max_load:
        sys.stderr.write(f"load still {load:.2f} after {timeout_s:.0f} s: measuring anyway\n")
    return load


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (the device synchronised around it)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, reps: int, warmup: int = 1
) -> dict:
    """Median seconds of each function, repetitions interleaved (a, b, a, b, ...).

    Interleaving spreads a noisy neighbour's load evenly over the contenders, so
    their ratio is fairer than that of two back-to-back blocks of runs.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: {"median_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}


# ------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of what runs after :meth:`start`, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at start.
    On CPU: the growth of the process's peak resident set (``ru_maxrss``) — meaningful
    only in a fresh process that has not yet peaked higher, which is why every
    configuration runs in its own subprocess. tracemalloc cannot see torch's
    allocations.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = self._now()

    def peak_mib(self) -> float:
        synchronize(self.device)
        return max(0.0, self._now() - self.base)


# ---------------------------------------------------------------------- processes


def run_child(script: Path, args: Sequence[str]) -> dict:
    """Run ``script`` in a fresh Python with ``args``; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    sys.stderr.write(f"wrote {target}\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if value == 0:
                return "0"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:.1f}"
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def common_arguments(parser) -> None:
    """The options every benchmark script takes."""
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    parser.add_argument("--big-reps", type=int, default=2, help="timed repetitions at batch >= 32 (median)")
    parser.add_argument(
        "--max-load",
        type=float,
        default=0.0,
        help="before measuring, wait (up to 20 min) until the 1-minute load average is below this; 0: no wait",
    )
