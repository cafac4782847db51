"""varkit against the official VAR code on the CPU, side by side on one d6 checkpoint.

The official code runs in its own process (``_official.OfficialWorker``: its builder
patches torch.nn process-wide); it builds the official VQ-VAE and VAR-d6 with the
release's initialisation and saves them, and varkit loads the same weights through its
importer. The logits of both are compared first; then, repetitions interleaved (official,
varkit, official, ...), each side times in its own process:

- ``train``: one training step from codes (teacher-forcing inputs, forward, float32
  cross-entropy, backward, grad clip, AdamW) as each trainer runs it;
- ``generate``: guided generation (cfg 1.5, top-k 900, top-p 0.96) at each batch, the
  official ``autoregressive_infer_cfg`` against varkit's ``generate_images``, decode
  included; the decode alone is timed on both sides too.

The VQ-VAE keeps the release's layout at width 32 instead of 160 (``--vae-ch``): its
decoder is the same code on both sides and would otherwise dominate generation on a CPU.

    .venv/bin/python benchmarks/official_var.py --out /tmp/official_var.json

It uses only varkit's public building blocks, so it also measures an older checkout:
run it from outside the repository with that checkout first on ``PYTHONPATH``
(``PYTHONPATH=OLD:OLD/plugins python /path/to/benchmarks/official_var.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import _common as common
import _official as official
import torch

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--gen-batches", default="1,8", help="generation batches")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per side (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument("--vae-ch", type=int, default=32, help="VQ-VAE width (the release's is 160)")
    parser.add_argument(
        "--reference", help="the VAR-official folder (default ../shared/reference/VAR-official)"
    )
    parser.add_argument(
        "--max-load", type=float, default=0.0, help="wait until the load average is below this"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or each process's CPU time (with --threads 1: robust on a machine shared with other jobs)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    reference, why = official.reference_dir(args.reference)
    if reference is None:
        sys.exit(f"official_var: {why}")
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    device = torch.device("cpu")
    info = common.machine(device)
    import varkit

    info["varkit"] = str(Path(varkit.__file__).parent)
    tmp = Path(tempfile.mkdtemp(prefix="varkit-official-"))
    rows, check = [], {}
    clock = args.clock
    with official.OfficialWorker(reference, threads=args.threads) as worker:
        worker.call("build", depth=args.depth, patch_nums=list(VAR_256), vocab=4096, code_dim=32, ch=args.vae_ch,
                    num_classes=1000, alng=1e-3, seed=0, device="cpu", out=str(tmp))  # fmt: skip
        tokenizer, model, _ = official.load_varkit(
            tmp, image_size=256, schedule=VAR_256, attention="sdpa", device=device
        )
        check = logit_check(worker, tokenizer, model, tmp)
        sys.stderr.write(f"logits: {check}\n")

        step = official.varkit_train_step(model, tokenizer, batch=args.batch, dtype=None, device=device)
        sides = {
            "official": lambda: worker.call(
                "train", batch=args.batch, precision="fp32", reps=1, warmup=0, clock=clock
            )["seconds"][0],
            "varkit": lambda: official.timed(step, device, clock),
        }
        rows.append(interleave(f"train step, batch {args.batch}", sides, args.reps))

        from varkit.build import build_sampler
        from varkit.generation import generate_codes, generate_images

        sampler = build_sampler(None, "topk_topp", cfg=1.5, top_k=900, top_p=0.96)
        model.eval()
        for batch in (int(b) for b in args.gen_batches.split(",")):
            labels = torch.arange(batch) % 1000
            last = VAR_256[-1]
            f_hat = torch.randn(batch, 32, last, last, generator=torch.Generator().manual_seed(0))

            def varkit_images(labels=labels):
                g = torch.Generator().manual_seed(0)
                return official.timed(
                    lambda: generate_images(model, tokenizer, sampler, labels, generator=g), device, clock
                )

            def varkit_codes(labels=labels):
                g = torch.Generator().manual_seed(0)
                return official.timed(
                    lambda: generate_codes(model, tokenizer, sampler, labels, generator=g), device, clock
                )

            def varkit_decode(f_hat=f_hat):
                with torch.inference_mode():
                    return official.timed(lambda: tokenizer.features_to_image(f_hat), device, clock)

            def official_gen(batch=batch):
                reply = worker.call("generate", batch=batch, reps=1, warmup=0, cfg=1.5, top_k=900, top_p=0.96,
                                    precision="fp32", clock=clock)  # fmt: skip
                return reply["seconds"][0], reply["decode_seconds"][0]

            cache: dict = {}

            def official_total(official_gen=official_gen, cache=cache):
                cache["last"] = official_gen()
                return cache["last"][0]

            rows.append(interleave(f"generation, batch {batch}", {"official": official_total, "varkit": varkit_images},
                                   args.reps))  # fmt: skip
            rows.append(interleave(f"decode alone, batch {batch}",
                                   {"official": lambda cache=cache: cache["last"][1], "varkit": varkit_decode},
                                   1))  # fmt: skip
            rows.append(interleave(f"codes (no decode), batch {batch}", {"varkit": varkit_codes}, args.reps))
    info["load_1min_end"] = round(common.load_average(), 2)
    table = [(r["measurement"], _ms(r.get("official_s")), _ms(r.get("varkit_s")),
              f"{r['official_s'] / r['varkit_s']:.2f}×" if r.get("official_s") else "-") for r in rows]  # fmt: skip
    print(f"machine: {info}\nlogits: {check}\n")
    print(common.markdown_table(["measurement", "official ms", "varkit ms", "official / varkit"], table))
    payload = {"benchmark": "official_var", "machine": info, "clock": clock, "depth": args.depth, "reps": args.reps,
               "vae_ch": args.vae_ch, "logits": check, "rows": rows}  # fmt: skip
    common.write_json(args.out, payload)
    return payload


def _ms(seconds: float | None):
    return "-" if seconds is None else seconds * 1e3


def interleave(name: str, sides: dict, reps: int, warmup: int = 1) -> dict:
    """Each side's callable returns the seconds it measured; repetitions alternate sides."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(reps):
        for side, fn in sides.items():
            times[side].append(fn())
    row = {"measurement": name, "times_s": times}
    for side, ts in times.items():
        row[f"{side}_s"] = statistics.median(ts)
    sys.stderr.write(f"{name}: " + ", ".join(f"{s} {row[f'{s}_s'] * 1e3:.0f} ms" for s in sides) + "\n")
    return row


def logit_check(worker, tokenizer, model, tmp: Path) -> dict:
    """Teacher-forced logits of both sides on the same codes (float32, no class dropout)."""
    g = torch.Generator().manual_seed(5)
    codes = [torch.randint(0, 4096, (2, n, n), generator=g) for n in VAR_256]
    labels = torch.tensor([3, 1000])
    torch.save({"codes": codes, "labels": labels}, tmp / "codes.pt")
    worker.call("logits", codes=str(tmp / "codes.pt"), out=str(tmp / "logits.pt"))
    theirs = torch.load(tmp / "logits.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        ours = model(model.unit.teacher_forcing(codes, tokenizer), labels)
    diff = (ours - theirs).abs().max().item()
    return {"max_abs_diff": diff, "relative": diff / theirs.abs().max().item(),
            "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}  # fmt: skip


if __name__ == "__main__":
    main()
