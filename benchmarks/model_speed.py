"""Speed and peak memory of VAR models: teacher-forced training and guided generation.

Models: VAR's next-scale layout over a 256-px msvq tokenizer (scales 1..16, 680
positions, 4096 codes), width 64·depth, heads of 64. Per configuration:

* train: forward, float32 cross-entropy and backward of one batch of random codes
  (the teacher-forcing inputs are computed once outside the timing: they come from the
  frozen tokenizer, not the model; the optimizer step is in train_throughput.py);
* generate: ``varkit.generation.generate_codes`` with VAR's sampler (cfg 1.5 ramped
  over the steps, so the batch is doubled; top-k 900, top-p 0.96) and its
  preallocated KV cache.

Every configuration runs in a fresh subprocess: its peak memory is the growth of the
peak resident set over the first (warm-up) call on CPU, ``max_memory_allocated`` over
it on CUDA. The timed calls follow, and the median is reported. On CUDA the model runs
under bf16 autocast and MFU is model FLOPs (``model.flops_per_image``; generation
counts the doubled guidance batch) per second over ``--peak-tflops``.

    .venv/bin/python benchmarks/model_speed.py --max-load 2.5 --out /tmp/model_speed.json
    .venv/bin/python benchmarks/model_speed.py --device cuda --peak-tflops 989 --out model_speed_gpu.json
    .venv/bin/python benchmarks/model_speed.py --quick       # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _common as common
import torch
from official_style import Harness

HERE = Path(__file__).resolve()


def default_configs(quick: bool, device: torch.device) -> list[tuple[str, int, int]]:
    """``(mode, depth, batch)`` to measure."""
    if quick:
        depths, batches = (1,), (2,)
    elif device.type == "cuda":
        depths, batches = (16,), (8, 64)
    else:
        depths, batches = (4, 6), (8, 64)
    return [(mode, d, b) for d in depths for b in batches for mode in ("train", "generate")]


def measure(args) -> dict:
    """One configuration, in this (fresh) process."""
    device = torch.device(args.device)
    mode, depth, batch = args.one.split(":")
    depth, batch = int(depth), int(batch)
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    h = Harness(depth, batch, quick=args.quick, device=device, dtype=dtype)
    model = h.model
    if mode == "train":
        fn = lambda: h.train_step(h.sdpa)  # noqa: E731
        flops = model.flops_per_image(training=True) * batch
    else:
        fn = lambda: h.generate(official_cache=False, sampler=h.sampler)  # noqa: E731
        rows = 2 * batch if h.sampler.config.cfg > 0 else batch  # guidance doubles the batch
        flops = model.flops_per_image(training=False) * rows
    probe = common.PeakMemory(device)
    probe.start()
    fn()  # warm-up, and the peak-memory measurement
    peak = probe.peak_mib()
    reps = args.reps if batch < 32 else args.big_reps
    times = [common.timed(fn, device) for _ in range(reps)]
    seconds = statistics.median(times)
    seq_len = model.unit.seq_len
    result = {
        "mode": mode,
        "depth": depth,
        "width": model.config.width,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seq_len": seq_len,
        "batch": batch,
        "precision": "bf16" if dtype is not None else "fp32",
        "seconds": seconds,
        "times_s": times,
        "images_per_s": batch / seconds,
        "tokens_per_s": batch * seq_len / seconds,
        "peak_mib": peak,
        "tflops": flops / seconds / 1e12,
    }
    if args.peak_tflops:
        result["mfu"] = result["tflops"] / args.peak_tflops
    return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="on cuda only")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak (e.g. H100 SXM bf16 dense: 989)"
    )
    parser.add_argument("--configs", help="mode:depth:batch,... e.g. train:4:8,generate:6:64")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh subprocess each (peak memory then not isolated)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args)))
        return None

    device = torch.device(args.device)
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    info = common.machine(device)
    todo = (
        [(m, int(d), int(b)) for m, d, b in (c.split(":") for c in args.configs.split(","))]
        if args.configs
        else default_configs(args.quick, device)
    )
    passed = ["--device", args.device, "--threads", str(args.threads), "--reps", str(args.reps),
              "--big-reps", str(args.big_reps), "--precision", args.precision,
              "--peak-tflops", str(args.peak_tflops)] + (["--quick"] if args.quick else [])  # fmt: skip
    results = []
    for mode, depth, batch in todo:
        one = f"{mode}:{depth}:{batch}"
        if args.in_process:
            sub = argparse.Namespace(**vars(args))
            sub.one = one
            res = measure(sub)
        else:
            res = common.run_child(HERE, [*passed, "--one", one])
        sys.stderr.write(f"{one}: {res['images_per_s']:.2f} img/s\n")
        results.append(res)
    info["load_1min_end"] = round(common.load_average(), 2)
    headers = ["mode", "model", "params M", "batch", "precision", "images/s", "tokens/s", "ms / batch",
               "peak MiB", "TFLOP/s"] + (["MFU"] if args.peak_tflops else [])  # fmt: skip
    rows = [
        [r["mode"], f"d{r['depth']} (w{r['width']})", r["params_m"], r["batch"], r["precision"],
         r["images_per_s"], r["tokens_per_s"], r["seconds"] * 1e3, r["peak_mib"], r["tflops"]]
        + ([f"{100 * r['mfu']:.1f} %"] if args.peak_tflops else [])
        for r in results
    ]  # fmt: skip
    print(f"machine: {info}\n")
    print(common.markdown_table(headers, rows))
    payload = {"benchmark": "model_speed", "machine": info, "reps": args.reps, "big_reps": args.big_reps,
               "memory_isolated": not args.in_process, "results": results}  # fmt: skip
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
