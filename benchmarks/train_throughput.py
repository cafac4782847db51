"""Training throughput of the AR step on this machine: images/s, tokens/s, peak memory.

One optimizer step = teacher-forcing inputs from random codes, forward, float32
cross-entropy, backward, AdamW (the training loop's own pieces). The tokenizer's
encoding is left out: it is frozen and the same for every model. Each configuration
runs in a fresh subprocess so that its peak resident memory is its own.

    .venv/bin/python benchmarks/train_throughput.py                 # the default table
    .venv/bin/python benchmarks/train_throughput.py --recipe recipes/quickstart.yaml

Models: the recipe's own (``recipes/quickstart.yaml``; without it a small 32-px msvq
stand-in written below), and depth 4 and 6 (width 64·depth) over the same tokenizer and
unit. Results: docs/benchmarks.md, "Training throughput".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUICKSTART_SHAPE = {
    "out_dir": "/tmp/varkit-bench",
    "tokenizer": {"name": "msvq", "image_size": 32, "ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1,
                  "norm_groups": 8, "vocab_size": 512, "code_dim": 16, "schedule": "1,2,4"},
    "unit": {"name": "scale"},
    "model": {"depth": 2, "num_classes": 10},
    "data": {"resolution": 32, "num_classes": 10, "synthetic": {"num_classes": 10}},
    "train": {"steps": 1},
}  # fmt: skip


def _recipe(recipe_path: str | None, depth: int | None):
    from varkit import recipe as recipe_mod

    if recipe_path and Path(recipe_path).is_file():
        overrides = [f"model.depth={depth}", "model.width=0"] if depth else []
        return recipe_mod.load(recipe_path, overrides)
    data = json.loads(json.dumps(QUICKSTART_SHAPE))
    if depth:
        data["model"] = {**data["model"], "depth": depth, "width": 0}
    return recipe_mod.from_dict(data)


def measure(recipe_path: str | None, depth: int | None, batch: int, precision: str, steps: int) -> dict:
    """Time ``steps`` optimizer steps after two warm-up steps; one configuration."""
    import torch

    from varkit.build import build_model, build_tokenizer
    from varkit.model.loss import ar_loss
    from varkit.recipe.train import TrainConfig
    from varkit.train.optim import build_adamw, param_groups
    from varkit.train.stage import Precision

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    recipe = _recipe(recipe_path, depth)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(recipe, device=device).eval().requires_grad_(False)
    model = build_model(recipe, tokenizer, device=device).train()
    unit = model.unit
    cfg = TrainConfig(steps=1, lr=1e-4, precision=precision)
    optimizer = build_adamw(param_groups(model, cfg.weight_decay), cfg, device)
    amp = Precision(precision, device)
    scaler = amp.scaler()
    g = torch.Generator().manual_seed(0)
    codes = [
        torch.randint(0, tokenizer.vocab_size, (batch, h, w), generator=g).to(device)
        for h, w in tokenizer.schedule
    ]
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g).to(device)

    def step():
        inputs = unit.teacher_forcing(codes, tokenizer)
        targets = unit.targets(codes)
        with amp.autocast():
            logits = model(inputs, labels)
        loss = ar_loss(logits, targets, 0.0).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "model": f"depth {model.config.depth} width {model.config.width}",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seq_len": unit.seq_len,
        "batch": batch,
        "precision": precision,
        "images_per_s": batch / seconds,
        "tokens_per_s": batch * unit.seq_len / seconds,
        "step_ms": seconds * 1e3,
        "peak_mib": peak,
        "device": device.type,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--depths", default="0,4,6", help="0 is the recipe's own depth")
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        depth, batch, precision = args.one.split(":")
        result = measure(args.recipe, int(depth) or None, int(batch), precision, args.steps)
        print(json.dumps(result))
        return
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for precision in args.precisions.split(","):
                out = subprocess.run(
                    [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps),
                     "--one", f"{depth}:{batch}:{precision}"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                sys.stderr.write(f"{r['model']} b{batch} {precision}: {r['images_per_s']:.1f} img/s\n")
    print("| model | params | positions | batch | precision | images/s | tokens/s | step ms | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['params_m']:.2f}M | {r['seq_len']} | {r['batch']} | {r['precision']} | "
            f"{r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['step_ms']:.0f} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
