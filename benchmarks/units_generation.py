"""Generation speed of the prediction units at equal model size and equal final grid.

One transformer shape (depth ``--depth``, width 64·depth) and one sampler (VAR's:
cfg 1.5 ramped over the steps, top-k 900, top-p 0.96; guidance doubles the batch)
drive four units that all end at the same 16×16 code grid of 4096 codes:

* ``scale``: next-scale over msvq scales 1..16 (10 steps, 680 positions);
* ``token``: raster next-token over a vq tokenizer (256 steps of 1 position);
* ``patch`` k=2 and k=4: next-cell over the same vq grid (64 steps of 4, 16 steps of 16).

Every unit generates through ``varkit.generation.generate_codes`` with the
preallocated KV cache. Latency is batch 1, throughput batch 64; the units run
interleaved in one process and the median of the repetitions is reported, with each
unit's time relative to ``scale``.

    .venv/bin/python benchmarks/units_generation.py --max-load 2.5 --out /tmp/units_generation.json
    .venv/bin/python benchmarks/units_generation.py --quick       # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import sys

import _common as common
import torch
from official_style import QUICK_MSVQ

from varkit.generation import generate_codes

#: The single-scale tokenizer of --quick: 32 px, 4× down, an 8×8 grid like QUICK_MSVQ's last scale.
QUICK_VQ = {k: v for k, v in QUICK_MSVQ.items() if k != "schedule"} | {"name": "vq"}

UNITS = {
    "scale": {"name": "scale"},
    "token": {"name": "token"},
    "patch k=2": {"name": "patch", "k": 2},
    "patch k=4": {"name": "patch", "k": 4},
}


def build_units(depth: int, *, quick: bool, device: torch.device) -> dict:
    built = {}
    for label, unit in UNITS.items():
        if quick:
            tok = QUICK_MSVQ if unit["name"] == "scale" else QUICK_VQ
            recipe = common.recipe_dict(unit=unit, depth=depth, tokenizer=tok, num_classes=10)
        else:
            recipe = common.recipe_dict(unit=unit, depth=depth)
        built[label] = common.build(recipe, device)
    return built


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--depth", type=int, default=4, help="transformer depth (width 64·depth)")
    parser.add_argument("--batches", default="1,64", help="batch sizes: latency at 1, throughput at 64")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="on cuda only")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    depth = 1 if args.quick else args.depth
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    built = build_units(depth, quick=args.quick, device=device)
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    info = common.machine(device)

    results = []
    for batch in batches:
        fns = {}
        for label, (tokenizer, model, sampler) in built.items():
            labels = torch.arange(batch, device=device) % model.config.num_classes

            def run(tokenizer=tokenizer, model=model, sampler=sampler, labels=labels):
                g = torch.Generator(device).manual_seed(0)
                return generate_codes(model, tokenizer, sampler, labels, generator=g, dtype=dtype)

            fns[label] = run
        reps = args.reps if batch < 32 else args.big_reps
        sys.stderr.write(f"batch {batch}: {reps} interleaved repetitions of {len(fns)} units\n")
        timing = common.interleaved(fns, device, reps=reps)
        base = timing["scale"]["median_s"]
        for label, (tokenizer, model, _) in built.items():
            seconds = timing[label]["median_s"]
            unit = model.unit
            results.append({
                "unit": label, "batch": batch, "steps": len(unit.step_lengths), "seq_len": unit.seq_len,
                "grid": list(tokenizer.schedule[-1]), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "seconds": seconds, "times_s": timing[label]["times_s"], "images_per_s": batch / seconds,
                "tokens_per_s": batch * unit.seq_len / seconds, "time_vs_scale": seconds / base,
            })  # fmt: skip
    info["load_1min_end"] = round(common.load_average(), 2)
    info["model"] = {"depth": depth, "width": next(iter(built.values()))[1].config.width}
    headers = ["unit", "batch", "steps", "positions", "params M", "ms / batch", "images/s", "tokens/s",
               "time / scale's"]  # fmt: skip
    rows = [
        (r["unit"], r["batch"], r["steps"], r["seq_len"], r["params_m"], r["seconds"] * 1e3, r["images_per_s"],
         r["tokens_per_s"], f"{r['time_vs_scale']:.2f}×")
        for r in results
    ]  # fmt: skip
    print(f"machine: {info}\n")
    print(common.markdown_table(headers, rows))
    payload = {"benchmark": "units_generation", "machine": info, "reps": args.reps, "big_reps": args.big_reps,
               "sampler": common.SAMPLER, "results": results}  # fmt: skip
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
