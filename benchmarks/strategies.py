"""Generation strategies against plain generation: same model, same seed, same sampler.

For each strategy (``collaborative``, ``prune_tokens``, ``jacobi``) and plain
generation of the same model, this measures the wall time of ``generate_codes``
(median of interleaved repetitions), the forward passes of each model, the steps
accepted per forward pass, the share of positions run through the transformer, and
whether the codes equal plain generation's.

Two settings:

* random weights at VAR's 256 px geometry (10 scales, 680 positions; a 16×16 grid of
  4096 codes for the raster unit), depth 4 (width 256) and, as collaborative
  decoding's refiner, depth 2 (width 128) on the same tokenizer. These give forward
  passes and relative times; a random model is no guide to quality, nor to how many
  drafted steps Jacobi decoding accepts (that depends on how predictable the trained
  model is).
* trained models (``--quickstart RUN``, the quickstart's next-scale run; optionally
  ``--refiner RUN``, a smaller model trained on the same tokenizer, and ``--token-run
  RUN``, a next-token run): the quality proxy is class-following, the share of
  generated images that the synthetic classifier (``varkit.data.synthetic.classify``)
  assigns to their class, over ``--images`` images of the ten classes, same seeds.

    .venv/bin/python benchmarks/strategies.py --out /tmp/strategies.json
    .venv/bin/python benchmarks/strategies.py --quickstart runs/quickstart --images 200
    .venv/bin/python benchmarks/strategies.py --quick       # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import sys

import _common as common
import torch
from official_style import QUICK_MSVQ

from varkit.build import build_model, build_sampler, build_strategy
from varkit.generation import generate_codes
from varkit.generation.loop import Generation, companion_of, decode_images
from varkit.recipe import from_dict

QUICK_VQ = {k: v for k, v in QUICK_MSVQ.items() if k != "schedule"} | {"name": "vq"}
PRUNE_RATIOS = (0.5, 0.25)
JACOBI_WINDOW = 16


#: Plain generation and jacobi with the adaptive and with a fixed window.
JACOBI_VARIANTS = {
    "plain": {},
    f"jacobi w≤{JACOBI_WINDOW} adaptive": {"strategy": "jacobi", "window": JACOBI_WINDOW},
    f"jacobi w={JACOBI_WINDOW} fixed": {"strategy": "jacobi", "window": JACOBI_WINDOW, "adaptive": False},
}


def switch_for(num_steps: int) -> int:
    """The drafter runs all but the last two steps (the large scales, most of the positions)."""
    return max(1, num_steps - 2)


def count(model, tokenizer, sampler, labels, *, seed: int, strategy=None, **options) -> dict:
    """One generation through `Generation`: its forward passes, stats and codes."""
    chosen, models = build_strategy(None, strategy, **options)
    models = {k: companion_of(k, v) for k, v in models.items()}
    gen = Generation(
        model, tokenizer, sampler, labels, generator=torch.Generator(labels.device).manual_seed(seed)
    )
    with torch.inference_mode():
        codes, f_hat = gen.run() if chosen is None else gen.run_strategy(chosen, **models)
    passes = gen.forward_passes + gen.stats.get("draft_passes", 0)
    return {
        "codes": codes,
        "f_hat": f_hat,
        "steps": gen.num_steps,
        "passes": passes,
        "passes_by_model": {"model": gen.forward_passes, **({"draft": gen.stats["draft_passes"]} if "draft_passes" in gen.stats else {})},
        "steps_per_pass": gen.num_steps / passes,
        "positions_run": gen.stats.get("positions_run", model.unit.seq_len),
        "positions": model.unit.seq_len,
    }  # fmt: skip


def compare(
    label: str, model, tokenizer, sampler, labels, variants: dict, *, reps: int, device, seed: int = 0
):
    """Rows for plain generation of ``model`` and each variant ``{name: options}``.

    An option ``model`` runs that variant with another model (collaborative decoding's
    refiner, compared with the drafter alone).
    """
    fns, counts = {}, {}
    for name, options in variants.items():
        options = dict(options)
        run_model = options.pop("model", model)

        def run(options=options, run_model=run_model):
            g = torch.Generator(device).manual_seed(seed)
            return generate_codes(run_model, tokenizer, sampler, labels, generator=g, **options)

        fns[name] = run
        counts[name] = count(run_model, tokenizer, sampler, labels, seed=seed, **options)
    timing = common.interleaved(fns, device, reps=reps)
    plain = counts["plain"]
    rows = []
    for name, c in counts.items():
        same = all(torch.equal(a, b) for a, b in zip(c["codes"], plain["codes"], strict=True))
        rows.append({
            "setting": label, "strategy": name, "batch": labels.shape[0], "steps": c["steps"],
            "passes": c["passes"], "passes_by_model": c["passes_by_model"], "steps_per_pass": c["steps_per_pass"],
            "positions_run_share": c["positions_run"] / c["positions"], "seconds": timing[name]["median_s"],
            "times_s": timing[name]["times_s"], "time_vs_plain": timing[name]["median_s"] / timing["plain"]["median_s"],
            "same_codes_as_plain": same,
        })  # fmt: skip
    return rows


def random_settings(args, device) -> list[dict]:
    quick = args.quick
    depth = 1 if quick else 4
    small_depth = max(1, depth // 2)
    scale_tok = QUICK_MSVQ if quick else common.MSVQ_256
    raster_tok = QUICK_VQ if quick else common.VQ_256
    batch = 2 if quick else args.batch
    rows = []

    recipe = common.recipe_dict(unit={"name": "scale"}, depth=depth, tokenizer=scale_tok, num_classes=10)
    tokenizer, large, sampler = common.build(recipe, device)
    small_recipe = common.recipe_dict(
        unit={"name": "scale"}, depth=small_depth, tokenizer=scale_tok, num_classes=10
    )
    torch.manual_seed(1)
    small = build_model(from_dict(small_recipe), tokenizer, device=device).eval()
    labels = torch.arange(batch, device=device) % 10
    k = switch_for(len(large.unit.step_lengths))
    variants = {
        "plain": {},
        f"prune_tokens {list(PRUNE_RATIOS)}": {"strategy": "prune_tokens", "ratios": PRUNE_RATIOS},
        f"collaborative, refiner d{small_depth}, k={k}": {
            "strategy": "collaborative",
            "draft": (large, tokenizer),
            "switch_step": k,
            "model": small,
        },
        f"plain d{small_depth} (the refiner alone)": {"model": small},
    }
    rows += compare(
        f"scale d{depth} random",
        large.eval(),
        tokenizer,
        sampler,
        labels,
        variants,
        reps=args.reps,
        device=device,
    )

    recipe = common.recipe_dict(unit={"name": "token"}, depth=depth, tokenizer=raster_tok, num_classes=10)
    tokenizer, model, sampler = common.build(recipe, device)
    greedy = build_sampler(None, "greedy", cfg=sampler.config.cfg)
    for smp, what in ((sampler, "topk_topp"), (greedy, "greedy")):
        variants = dict(JACOBI_VARIANTS)
        rows += compare(
            f"token d{depth} random, {what}",
            model.eval(),
            tokenizer,
            smp,
            labels,
            variants,
            reps=args.reps,
            device=device,
        )
    return rows  # fmt: skip


def class_following(base, tokenizer, sampler, *, images: int, batch: int, device, **options) -> dict:
    """Shares of ``images`` generated images (classes 0..9 in turn) that the synthetic
    classifier assigns to their class: by colour and shape, and by colour alone."""
    from varkit.data.synthetic import classify

    options = dict(options)
    model = options.pop("model", base)
    shape = colour = total = 0
    for start in range(0, images, batch):
        labels = torch.arange(start, min(images, start + batch), device=device) % 10
        g = torch.Generator(device).manual_seed(start)
        _, f_hat = generate_codes(model, tokenizer, sampler, labels, generator=g, **options)
        with torch.inference_mode():
            pictures = decode_images(tokenizer, f_hat)
        shape += int((classify(pictures) == labels.cpu()).sum())
        colour += int((classify(pictures, use_shape=False) == labels.cpu()).sum())
        total += labels.numel()
    return {"class_following": shape / total, "colour_following": colour / total}


def compare_trained(setting: str, model, tokenizer, sampler, variants: dict, args, device) -> list[dict]:
    """`compare` on a trained model, each row with its `class_following`."""
    labels = torch.arange(args.batch, device=device) % 10
    rows = compare(setting, model, tokenizer, sampler, labels, variants, reps=args.reps, device=device)
    for row, options in zip(rows, variants.values(), strict=True):
        row.update(
            class_following(
                model, tokenizer, sampler, images=args.images, batch=args.batch, device=device, **options
            )
        )
    return rows


def trained_settings(args, device) -> list[dict]:
    from varkit.pipeline import from_pretrained

    pipe = from_pretrained(args.quickstart, device=device)
    k = switch_for(len(pipe.model.unit.step_lengths))
    variants = {
        "plain": {},
        f"prune_tokens {list(PRUNE_RATIOS)}": {"strategy": "prune_tokens", "ratios": PRUNE_RATIOS},
    }
    if args.refiner:
        refiner = from_pretrained(args.refiner, device=device).model
        variants[f"collaborative, refiner {args.refiner}, k={k}"] = {
            "strategy": "collaborative",
            "draft": pipe,
            "switch_step": k,
            "model": refiner,
        }
        variants["plain refiner alone"] = {"model": refiner}
    return compare_trained(
        "quickstart (scale, trained)", pipe.model, pipe.tokenizer, pipe.sampler, variants, args, device
    )


def token_settings(args, device) -> list[dict]:
    """jacobi on a trained next-token run, with its recipe's sampler and greedy."""
    from varkit.pipeline import from_pretrained

    rows = []
    tok_pipe = from_pretrained(args.token_run, device=device)
    greedy = build_sampler(None, "greedy", cfg=tok_pipe.sampler.config.cfg)
    for smp, what in ((tok_pipe.sampler, tok_pipe.sampler.name), (greedy, "greedy")):
        variants = dict(JACOBI_VARIANTS)
        rows += compare_trained(
            f"token run (trained), {what}", tok_pipe.model, tok_pipe.tokenizer, smp, variants, args, device
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="images per generation")
    parser.add_argument("--quickstart", help="a trained quickstart run (next-scale) for the quality proxy")
    parser.add_argument(
        "--refiner", help="a smaller next-scale run on the quickstart's tokenizer (collaborative)"
    )
    parser.add_argument("--token-run", help="a trained next-token run on the same data (jacobi)")
    parser.add_argument("--images", type=int, default=200, help="images per class-following measurement")
    parser.add_argument("--skip-random", action="store_true", help="only the trained models")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    info = common.machine(device)
    rows = [] if args.skip_random else random_settings(args, device)
    if args.quickstart:
        rows += trained_settings(args, device)
    if args.token_run:
        rows += token_settings(args, device)
    info["load_1min_end"] = round(common.load_average(), 2)
    headers = ["setting", "strategy", "batch", "forward passes", "steps / pass", "positions run", "ms / batch",
               "time / plain", "codes = plain", "class-following (colour)"]  # fmt: skip
    table = [
        (r["setting"], r["strategy"], r["batch"], "+".join(str(v) for v in r["passes_by_model"].values()),
         r["steps_per_pass"], f"{100 * r['positions_run_share']:.0f} %", r["seconds"] * 1e3,
         f"{r['time_vs_plain']:.2f}×", "yes" if r["same_codes_as_plain"] else "no",
         f"{100 * r['class_following']:.1f} % ({100 * r['colour_following']:.1f} %)" if "class_following" in r else "")
        for r in rows
    ]  # fmt: skip
    print(f"machine: {info}\n")
    print(common.markdown_table(headers, table))
    payload = {"benchmark": "strategies", "machine": info, "reps": args.reps, "results": rows}
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
