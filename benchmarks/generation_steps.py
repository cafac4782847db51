"""What the generation loop's options cost: the sampler's draw, static-shape steps, CUDA graphs.

Side by side in one process, repetitions interleaved, medians reported:

* **sampler**: one generation's sampling (every step of VAR's 680-position schedule,
  guidance on, top-k 900, top-p 0.96, 4096 codes) with ``topk_topp`` (guidance and
  temperature in one pass, exponential race) against the rule it replaced (guidance
  as three tensor ops, the same top-k/top-p filter, ``torch.multinomial``, which
  reads back to the host on CUDA).
* **steps**: whole generations (``scale``: 10 steps; ``token``: 256 steps) with the
  eager loop against the graph runner. On CUDA the runner replays CUDA graphs (the
  first call, which records them, is the warm-up); on CPU it replays its static-shape
  steps eagerly, which measures what masking by position costs where there is no
  launch overhead to save. With ``--device cuda`` also bfloat16 by autocast against
  bfloat16 weights (``pipe.to(dtype=torch.bfloat16)``).

    .venv/bin/python benchmarks/generation_steps.py --max-load 2.5 --out /tmp/generation_steps.json
    .venv/bin/python benchmarks/generation_steps.py --device cuda --depth 16 --batches 1,8,64
    .venv/bin/python benchmarks/generation_steps.py --quick       # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import copy
import sys

import _common as common
import torch
from official_style import QUICK_MSVQ

from varkit.generation import Generation
from varkit.generation.graphs import GraphedSteps, cuda_capture
from varkit_plugins.samplers import TopKTopP

QUICK_VQ = {k: v for k, v in QUICK_MSVQ.items() if k != "schedule"} | {"name": "vq"}


class MultinomialTopKTopP(TopKTopP):
    """The rule ``topk_topp`` replaced: guidance in three ops, the same filter, ``torch.multinomial``."""

    name = "multinomial_topk_topp"

    def sample_guided(self, cond, uncond, *, t, step, num_steps, generator):
        logits = cond if t == 0 else (1 + t) * cond - t * uncond
        b, l, _ = logits.shape
        values, index = self.candidates(logits, None, 0.0)
        pick = torch.multinomial(values.softmax(dim=-1), 1, generator=generator)  # (b·l, 1)
        codes = pick if index is None else index.gather(-1, pick)
        return codes.reshape(b, l), None


def eager_capture(fn, pool):
    """The graph runner's capture without CUDA: replays run ``fn`` again (static shapes, no graph)."""
    out = fn()

    def replay():
        out.copy_(fn())

    return replay, out, pool


def sampler_section(args, device: torch.device) -> list[dict]:
    schedule = QUICK_MSVQ["schedule"] if args.quick else common.MSVQ_256["schedule"]
    vocab = QUICK_MSVQ["vocab_size"] if args.quick else common.MSVQ_256["vocab_size"]
    lengths = [int(n) ** 2 for n in str(schedule).split(",")]
    config = TopKTopP.Config(cfg=1.5, top_k=min(900, vocab), top_p=0.96)
    samplers = {"multinomial (before)": MultinomialTopKTopP(config), "race (topk_topp)": TopKTopP(config)}
    rows = []
    for batch in args.batch_list:
        g = torch.Generator().manual_seed(0)
        logits = [(torch.randn(2 * batch, n, vocab, generator=g) * 3).to(device) for n in lengths]

        def run(sampler, logits=logits):
            gen = torch.Generator(device).manual_seed(0)
            for step, both in enumerate(logits):
                cond, uncond = both.chunk(2)
                t = sampler.guidance_scale(step, len(lengths))
                sampler.sample_guided(cond, uncond, t=t, step=step, num_steps=len(lengths), generator=gen)

        fns = {name: (lambda s=s: run(s)) for name, s in samplers.items()}
        timing = common.interleaved(fns, device, reps=args.reps if batch < 32 else args.big_reps)
        base = timing["multinomial (before)"]["median_s"]
        for name in fns:
            ms = timing[name]["median_s"] * 1e3
            rows.append({"section": "sampler", "what": name, "batch": batch, "ms": ms,
                         "speedup": base * 1e3 / ms, "times_s": timing[name]["times_s"]})  # fmt: skip
    return rows


def steps_section(args, device: torch.device) -> list[dict]:
    rows = []
    units = {"scale": {"name": "scale"}, "token": {"name": "token"}}
    for label, unit in units.items():
        if args.quick:
            tok = QUICK_MSVQ if label == "scale" else QUICK_VQ
            recipe = common.recipe_dict(unit=unit, depth=1, tokenizer=tok, num_classes=10)
        else:
            recipe = common.recipe_dict(unit=unit, depth=args.depth)
        tokenizer, model, sampler = common.build(recipe, device)
        model.eval()
        variants = {"eager": (model, None, None)}
        capture = cuda_capture if device.type == "cuda" else eager_capture
        graphed = "cuda graphs" if device.type == "cuda" else "static-shape steps"
        variants[graphed] = (model, GraphedSteps(model, capture=capture), None)
        if device.type == "cuda":
            variants["bf16 autocast"] = (model, None, torch.bfloat16)
            bf16 = copy.deepcopy(model).to(dtype=torch.bfloat16)
            variants["bf16 weights"] = (bf16, None, None)
            variants["bf16 weights + graphs"] = (bf16, GraphedSteps(bf16, capture=capture), None)
        for batch in args.batch_list:
            labels = torch.arange(batch, device=device) % model.config.num_classes

            def run(model, runner, dtype, labels=labels, tokenizer=tokenizer, sampler=sampler):
                with torch.inference_mode():
                    Generation(model, tokenizer, sampler, labels, generator=torch.Generator(device).manual_seed(0),
                               dtype=dtype, runner=runner).run()  # fmt: skip

            fns = {name: (lambda v=v: run(*v)) for name, v in variants.items()}
            timing = common.interleaved(fns, device, reps=args.reps if batch < 32 else args.big_reps)
            base = timing["eager"]["median_s"]
            for name in fns:
                ms = timing[name]["median_s"] * 1e3
                rows.append({"section": f"generation, {label} ({len(model.unit.step_lengths)} steps)", "what": name,
                             "batch": batch, "ms": ms, "speedup": base * 1e3 / ms,
                             "times_s": timing[name]["times_s"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--depth", type=int, default=4, help="transformer depth (width 64·depth)")
    parser.add_argument("--batches", default="1,8", help="batch sizes")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    args.batch_list = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    info = common.machine(device)
    sys.stderr.write("sampler\n")
    results = sampler_section(args, device)
    sys.stderr.write("generation steps\n")
    results += steps_section(args, device)
    info["load_1min_end"] = round(common.load_average(), 2)
    headers = ["section", "variant", "batch", "ms", "speed-up vs the first variant"]
    rows = [(r["section"], r["what"], r["batch"], r["ms"], f"{r['speedup']:.2f}×") for r in results]
    print(f"machine: {info}\n")
    print(common.markdown_table(headers, rows))
    payload = {"benchmark": "generation_steps", "machine": info, "depth": 1 if args.quick else args.depth,
               "reps": args.reps, "big_reps": args.big_reps, "results": results}  # fmt: skip
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
