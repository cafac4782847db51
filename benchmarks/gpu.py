"""varkit against the official VAR code on one GPU: training, generation, units, memory.

One command, one process (plus the official code's worker process), at most about 8
minutes on one H100/H200::

    .venv/bin/python benchmarks/gpu.py --out gpu.json

Sections, in this order; the JSON is rewritten after each one, so a run cut short keeps
what finished:

1. ``environment``: torch, the GPU and its peak bf16 rate, and which attention kernel
   each backend runs for VAR's scales, the raster units and cached steps.
2. ``train``: a d16 training step (teacher-forcing inputs from codes, forward, float32
   cross-entropy, backward, grad clip 2, AdamW) at the recipe's per-GPU batch (768 / 8)
   in bf16: the official trainer's step, and varkit's with ``sdpa``, ``flex`` and
   ``auto`` compiled (``model.compile()``, as ``train.compile`` does). Images/s and MFU
   at the official count of 0.93 TFLOP per image (dense attention, AdaLN once per
   image). Both sides hold the same weights (the official model's, converted by
   varkit's importer) and their logits are compared before anything is timed.
3. ``generation``: guided generation (cfg 1.5, top-k 900, top-p 0.96) at batch 1, 8,
   64 and 256, decode included: the official ``autoregressive_infer_cfg`` and varkit's
   ``generate_images``, eager, plus a graphed varkit entry when ``generate_codes``
   offers ``cuda_graphs``. The transformer and the decode are reported separately.
4. ``scale_vs_token``: next-scale against raster next-token at the same model size and
   final grid (16×16), codes only, at batch 1 and 64.
5. ``memory``: peak memory of a d20 and a d24 training step at the recipe's per-GPU batch.

``--dry-run`` runs every section at tiny sizes on the CPU (under 2 minutes; a test runs
it). Without the official code (``../shared/reference/VAR-official``, or
``--reference``) the official entries are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common as common
import _official as official
import torch

#: Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0}  # fmt: skip
#: The official count of one training image of d16 (TFLOP): dense attention, AdaLN once.
OFFICIAL_D16_TFLOP = 0.93


FULL = {
    "device": "cuda",
    "precision": "bf16",
    "depth": 16,
    "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "image_size": 256,
    "vocab": 4096,
    "code_dim": 32,
    "vae_ch": 160,
    "num_classes": 1000,
    "train_batch": 96,  # the recipes' 768 over 8 GPUs
    "train_warmup": 3,
    "train_reps": 10,
    "gen_batches": (1, 8, 64, 256),
    "gen_warmup": 1,
    "gen_reps": 3,
    "units_batches": (1, 64),
    "memory_depths": (20, 24),
    "memory_batch": 96,
    "top_k": 900,
    "compile_backend": "inductor",
    "logit_tolerance": 1e-4,
}
#: Every section at tiny sizes on the CPU.
DRY = FULL | {
    "device": "cpu",
    "precision": "fp32",
    "depth": 2,
    "patch_nums": (1, 2, 3, 4),
    "image_size": 64,
    "vocab": 64,
    "code_dim": 8,
    "vae_ch": 32,
    "num_classes": 10,
    "train_batch": 2,
    "train_warmup": 1,
    "train_reps": 1,
    "gen_batches": (1, 2),
    "gen_reps": 1,
    "units_batches": (1, 2),
    "memory_depths": (2, 3),
    "memory_batch": 2,
    "top_k": 32,
    # The compiled entry is traced and differentiated as on the GPU, without generating
    # kernels (inductor's C++ build would take minutes on a small CPU).
    "compile_backend": "aot_eager",
}

SECTIONS = ("environment", "train", "generation", "scale_vs_token", "memory")


class Run:
    """Shared state of one benchmark run: config, results file, the official worker."""

    def __init__(self, args):
        self.args = args
        self.cfg = dict(DRY if args.dry_run else FULL)
        if args.device:
            self.cfg["device"] = args.device
        self.device = torch.device(self.cfg["device"])
        self.dtype = {"bf16": torch.bfloat16, "fp32": None}[self.cfg["precision"]]
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.tmp = Path(tempfile.mkdtemp(prefix="varkit-gpu-bench-"))
        self.reference, self.no_reference = official.reference_dir(args.reference)
        self.worker: official.OfficialWorker | None = None
        self.loaded = None  # (tokenizer, model, recipe) holding the official weights
        self.payload = {
            "benchmark": "gpu",
            "dry_run": args.dry_run,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.cfg.items()},
            "machine": common.machine(self.device),
            "sections": {},
        }

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        """Write the JSON atomically: a run killed mid-write keeps the previous file."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=2) + "\n")
        os.replace(tmp, self.out)

    def section(self, name: str, fn) -> None:
        started = time.monotonic()
        sys.stderr.write(f"[{self.elapsed():6.1f} s] {name}\n")
        if self.elapsed() > self.args.budget_s:
            result = {
                "status": "skipped",
                "reason": f"the time budget of {self.args.budget_s:.0f} s was spent",
            }
        else:
            try:
                result = {"status": "ok", **fn()}
            except Exception as exc:
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()}  # fmt: skip
                sys.stderr.write(result["traceback"])
        result["seconds"] = round(time.monotonic() - started, 2)
        self.payload["sections"][name] = result
        self.save()

    # -- the two sides --------------------------------------------------------------------
    def official(self) -> official.OfficialWorker | None:
        """The official worker with the benchmark's model built (None without the code)."""
        if self.reference is None:
            return None
        if self.worker is None:
            self.worker = official.OfficialWorker(self.reference, threads=self.args.threads)
            c = self.cfg
            self.worker.call(
                "build", depth=c["depth"], patch_nums=list(c["patch_nums"]), vocab=c["vocab"],
                code_dim=c["code_dim"], ch=c["vae_ch"], num_classes=c["num_classes"], alng=1e-3, seed=0,
                device=str(self.device), out=str(self.tmp / "official"),
            )  # fmt: skip
        return self.worker

    def varkit(self):
        """varkit's tokenizer and model: the official weights when the code is here, else fresh."""
        if self.loaded is None:
            c = self.cfg
            if self.official() is not None:
                self.loaded = official.load_varkit(
                    self.tmp / "official", image_size=c["image_size"], schedule=c["patch_nums"],
                    attention="sdpa", device=self.device,
                )  # fmt: skip
            else:
                recipe = scale_recipe(c, c["depth"])
                tokenizer, model, _ = common.build(recipe, self.device)
                self.loaded = (tokenizer, model, None)
        return self.loaded

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def scale_recipe(c: dict, depth: int, unit: str = "scale") -> dict:
    """A recipe dict of the benchmark's tokenizer geometry (narrow backbone) for ``unit``."""
    schedule = ",".join(map(str, c["patch_nums"]))
    tokenizer = common.MSVQ_256 | {"image_size": c["image_size"], "vocab_size": c["vocab"],
                                   "code_dim": c["code_dim"], "schedule": schedule}  # fmt: skip
    if unit != "scale":
        tokenizer = {k: v for k, v in tokenizer.items() if k != "schedule"} | {"name": "vq"}
    recipe = common.recipe_dict(
        unit={"name": unit}, depth=depth, tokenizer=tokenizer, num_classes=c["num_classes"]
    )
    recipe["attention"] = {"name": "auto"}
    return recipe


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_tflops(run: Run) -> float | None:
    if run.args.peak_tflops:
        return run.args.peak_tflops
    if run.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def official_flops_per_image(model) -> float:
    """Training FLOPs of one image as the official code counts them: dense attention.

    ``model.flops_per_image`` counts attention over the visible pairs only; the
    official count (0.93 TFLOP at d16) charges every ``l × l`` pair.
    """
    cfg = model.config
    seq = model.step_starts[-1]
    visible = sum(n * end for n, end in zip(model.step_lengths, model.step_starts[1:], strict=True))
    hidden_pairs = seq * seq - visible
    return model.flops_per_image(training=True) + 3 * cfg.depth * 4 * hidden_pairs * cfg.width


# ============================================================================ sections


def environment(run: Run) -> dict:
    from varkit.masks import BlockCausal
    from varkit.plugins import registry

    c = run.cfg
    layouts = {
        "scale": BlockCausal([n * n for n in c["patch_nums"]]),
        "token": BlockCausal([1] * c["patch_nums"][-1] ** 2),
        "patch k=2": BlockCausal([4] * (c["patch_nums"][-1] ** 2 // 4)),
        "cached step": None,
    }
    dtype = run.dtype or torch.float32
    kernels = {}
    for entry in registry():
        if entry.kind == "attention" and entry.available()[0]:
            backend = entry.cls()
            kernels[entry.name] = {
                name: backend.kernel(mask, device=run.device, dtype=dtype, head_dim=64)
                for name, mask in layouts.items()
            }
    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(run.device),
        "gpu": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
        "peak_bf16_tflops": peak_tflops(run),
        "official_code": str(run.reference) if run.reference else None,
        "official_skipped": run.no_reference or None,
        "attention_kernels": kernels,
    }
    for name, rows in kernels.items():
        sys.stderr.write(f"  {name}: scale -> {rows['scale']}\n")
    return out


def _logit_check(run: Run, worker, tokenizer, model) -> dict:
    """Official and varkit logits on the same codes, float32, eval mode (no class dropout)."""
    g = torch.Generator().manual_seed(5)
    b = 4
    codes = [torch.randint(0, run.cfg["vocab"], (b, n, n), generator=g) for n in run.cfg["patch_nums"]]
    labels = torch.randint(0, run.cfg["num_classes"], (b,), generator=g)
    path = run.tmp / "codes.pt"
    torch.save({"codes": codes, "labels": labels}, path)
    worker.call("logits", codes=str(path), out=str(run.tmp / "logits.pt"))
    theirs = torch.load(run.tmp / "logits.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        codes_dev = [x.to(run.device) for x in codes]
        ours = model(model.unit.teacher_forcing(codes_dev, tokenizer), labels.to(run.device)).float().cpu()
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    check = {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / max(scale, 1e-12),
             "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}  # fmt: skip
    if check["relative"] > run.cfg["logit_tolerance"]:
        raise RuntimeError(
            f"varkit and the official code disagree on the same weights: {check}; nothing timed"
        )
    return check


def train(run: Run) -> dict:
    from varkit_plugins.attention import AutoAttention, FlexAttention, SDPAttention

    c = run.cfg
    worker = run.official()
    tokenizer, model, _ = run.varkit()
    batch = c["train_batch"]
    out: dict = {"batch": batch, "precision": c["precision"], "entries": {}}
    if worker is not None:
        out["logits"] = _logit_check(run, worker, tokenizer, model)
    flops = official_flops_per_image(model)
    out["official_tflop_per_image"] = flops / 1e12
    peak = peak_tflops(run)

    def record(name, times, compile_s=None, peak_gib=None):
        step = _median(times)
        entry = {"step_s": step, "times_s": times, "images_per_s": batch / step,
                 "tflops": batch * flops / step / 1e12}  # fmt: skip
        entry["mfu"] = entry["tflops"] / peak if peak else None
        if compile_s is not None:
            entry["first_step_s"] = compile_s
        if peak_gib is not None:
            entry["peak_gib"] = peak_gib
        out["entries"][name] = entry
        sys.stderr.write(f"  {name}: {step * 1e3:.1f} ms/step, {batch / step:.1f} img/s\n")
        run.save()

    if worker is None:
        out["entries"]["official"] = {"status": "skipped", "reason": run.no_reference}
    else:
        reply = worker.call("train", batch=batch, precision=c["precision"], reps=c["train_reps"],
                            warmup=c["train_warmup"])  # fmt: skip
        record("official", reply["seconds"])
    step = official.varkit_train_step(model, tokenizer, batch=batch, dtype=run.dtype, device=run.device)
    variants = [("varkit sdpa", SDPAttention(), False), ("varkit flex", FlexAttention(), False),
                ("varkit auto compiled", AutoAttention(), True)]  # fmt: skip
    for name, backend, compiled in variants:
        if run.elapsed() > run.args.budget_s:
            out["entries"][name] = {"status": "skipped", "reason": "time budget"}
            continue
        if name == "varkit flex" and not FlexAttention.available()[0]:
            out["entries"][name] = {"status": "skipped", "reason": FlexAttention.available()[1]}
            continue
        model.attention = backend
        if compiled:
            model.compile(backend=c["compile_backend"])
        first = common.timed(step, run.device)  # compiles, when it does
        for _ in range(c["train_warmup"] - 1):
            step()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        times = [common.timed(step, run.device) for _ in range(c["train_reps"])]
        peak_gib = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        record(name, times, compile_s=first if compiled else None, peak_gib=peak_gib)
        out["entries"][name]["kernel"] = model.attention_kernels(run.device, run.dtype or torch.float32)[
            "training"
        ]
    model._compiled_call_impl = None  # later sections run the model eagerly (undoes model.compile())
    model.attention = AutoAttention()
    ref = out["entries"].get("official", {}).get("step_s")
    for entry in out["entries"].values():
        if ref and "step_s" in entry:
            entry["speedup_vs_official"] = ref / entry["step_s"]
    return out


def _generation_api():
    from varkit.generation import generate_codes, generate_images

    graphed = "cuda_graphs" in inspect.signature(generate_codes).parameters
    return generate_codes, generate_images, graphed


def generation(run: Run) -> dict:
    from varkit.build import build_sampler
    from varkit.defaults import OFFICIAL_VAR_SAMPLER

    c = run.cfg
    worker = run.official()
    tokenizer, model, _ = run.varkit()
    model.eval()
    generate_codes, generate_images, graphed = _generation_api()
    options = {k: v for k, v in OFFICIAL_VAR_SAMPLER.items() if k != "name"} | {"top_k": c["top_k"]}
    sampler = build_sampler(None, OFFICIAL_VAR_SAMPLER["name"], **options)
    variants = {"varkit eager": {}}
    if graphed and run.device.type == "cuda":
        variants["varkit graphed"] = {"cuda_graphs": True}
    out: dict = {"sampler": options, "batches": {}}
    if not graphed:
        out["graphed"] = "not offered by this varkit: generate_codes has no cuda_graphs option"
    elif run.device.type != "cuda":
        out["graphed"] = "CUDA graphs need a CUDA device"
    for batch in c["gen_batches"]:
        if run.elapsed() > run.args.budget_s:
            out["batches"][str(batch)] = {"status": "skipped", "reason": "time budget"}
            continue
        row: dict = {}
        if worker is None:
            row["official"] = {"status": "skipped", "reason": run.no_reference}
        else:
            reply = worker.call("generate", batch=batch, reps=c["gen_reps"], warmup=c["gen_warmup"],
                                cfg=options["cfg"], top_k=c["top_k"], top_p=options["top_p"],
                                precision=c["precision"])  # fmt: skip
            total, dec = _median(reply["seconds"]), _median(reply["decode_seconds"])
            row["official"] = {"total_s": total, "decode_s": dec, "transformer_s": total - dec,
                               "images_per_s": batch / total}  # fmt: skip
        labels = (torch.arange(batch) % c["num_classes"]).to(run.device)
        for name, extra in variants.items():

            def codes(extra=extra, labels=labels):
                g = torch.Generator(run.device).manual_seed(0)
                generate_codes(model, tokenizer, sampler, labels, generator=g, dtype=run.dtype, **extra)

            def images(extra=extra, labels=labels):
                g = torch.Generator(run.device).manual_seed(0)
                generate_images(model, tokenizer, sampler, labels, generator=g, dtype=run.dtype, **extra)

            res = common.interleaved({"codes": codes, "images": images}, run.device, reps=c["gen_reps"],
                                     warmup=c["gen_warmup"])  # fmt: skip
            total, transformer = res["images"]["median_s"], res["codes"]["median_s"]
            row[name] = {"total_s": total, "transformer_s": transformer, "decode_s": total - transformer,
                         "images_per_s": batch / total}  # fmt: skip
            if "total_s" in row.get("official", {}):
                row[name]["speedup_vs_official"] = row["official"]["total_s"] / total
                row[name]["transformer_speedup_vs_official"] = row["official"]["transformer_s"] / transformer
        out["batches"][str(batch)] = row
        sys.stderr.write(
            f"  batch {batch}: "
            + ", ".join(f"{k} {v.get('total_s', 0) * 1e3:.0f} ms" for k, v in row.items())
            + "\n"
        )
        run.save()
    return out


def scale_vs_token(run: Run) -> dict:
    from varkit.build import build_sampler
    from varkit.defaults import OFFICIAL_VAR_SAMPLER

    c = run.cfg
    generate_codes, _, graphed = _generation_api()
    options = {k: v for k, v in OFFICIAL_VAR_SAMPLER.items() if k != "name"} | {"top_k": c["top_k"]}
    sampler = build_sampler(None, OFFICIAL_VAR_SAMPLER["name"], **options)
    models = {}
    for unit in ("scale", "token"):
        tokenizer, model, _ = common.build(scale_recipe(c, c["depth"], unit), run.device)
        models[unit] = (tokenizer, model.eval())
    variants = {"eager": {}}
    if graphed and run.device.type == "cuda":
        variants["graphed"] = {"cuda_graphs": True}
    out: dict = {"depth": c["depth"], "grid": c["patch_nums"][-1],
                 "params_m": {u: sum(p.numel() for p in m.parameters()) / 1e6 for u, (_, m) in models.items()},
                 "steps": {u: len(m.unit.step_lengths) for u, (_, m) in models.items()}, "rows": []}  # fmt: skip
    if not graphed:
        out["graphed"] = "not offered by this varkit: generate_codes has no cuda_graphs option"
    for batch in c["units_batches"]:
        for variant, extra in variants.items():
            if run.elapsed() > run.args.budget_s:
                out["rows"].append(
                    {"batch": batch, "variant": variant, "status": "skipped", "reason": "time budget"}
                )
                continue
            labels = (torch.arange(batch) % c["num_classes"]).to(run.device)
            fns = {}
            for unit, (tokenizer, model) in models.items():

                def fn(tokenizer=tokenizer, model=model, extra=extra, labels=labels):
                    g = torch.Generator(run.device).manual_seed(0)
                    generate_codes(model, tokenizer, sampler, labels, generator=g, dtype=run.dtype, **extra)

                fns[unit] = fn
            res = common.interleaved(fns, run.device, reps=c["gen_reps"], warmup=c["gen_warmup"])
            scale_s, token_s = res["scale"]["median_s"], res["token"]["median_s"]
            out["rows"].append({"batch": batch, "variant": variant, "scale_s": scale_s, "token_s": token_s,
                                "token_over_scale": token_s / scale_s})  # fmt: skip
            sys.stderr.write(f"  batch {batch} {variant}: token / scale = {token_s / scale_s:.2f}\n")
            run.save()
    return out


def memory(run: Run) -> dict:
    c = run.cfg
    out: dict = {"batch": c["memory_batch"], "precision": c["precision"], "depths": {}}
    total = (
        torch.cuda.get_device_properties(run.device).total_memory / 2**30
        if run.device.type == "cuda"
        else None
    )
    out["device_gib"] = total
    run.loaded = None  # free the d16 model
    for depth in c["memory_depths"]:
        if run.elapsed() > run.args.budget_s:
            out["depths"][f"d{depth}"] = {"status": "skipped", "reason": "time budget"}
            continue
        row: dict = {}
        probe = common.PeakMemory(run.device)
        try:
            probe.start()
            tokenizer, model, _ = common.build(scale_recipe(c, depth), run.device)
            row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            step = official.varkit_train_step(model, tokenizer, batch=c["memory_batch"], dtype=run.dtype,
                                               device=run.device)  # fmt: skip
            step()
            step()  # the optimizer state exists from the first step on
            row["peak_gib"] = probe.peak_mib() / 1024
            row["fits"] = None if total is None else row["peak_gib"] < total
        except torch.cuda.OutOfMemoryError as exc:
            row["peak_gib"], row["fits"], row["error"] = None, False, str(exc).splitlines()[0]
        finally:
            model = tokenizer = step = None
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        out["depths"][f"d{depth}"] = row
        sys.stderr.write(f"  d{depth}: {row}\n")
        run.save()
    if run.device.type == "cpu":
        out["note"] = "on the CPU, the growth of the process's peak resident memory (not isolated per depth)"
    return out


# ============================================================================= summary


def summary(payload: dict) -> str:
    """The results as markdown tables."""
    lines = []
    sec = payload["sections"]
    env = sec.get("environment", {})
    lines.append(
        f"machine: {payload['machine']}; gpu: {env.get('gpu')}; peak {env.get('peak_bf16_tflops')} TFLOP/s"
    )
    tr = sec.get("train", {})
    if tr.get("entries"):
        rows = [(name, e.get("step_s", 0) * 1e3, e.get("images_per_s", 0), e.get("mfu") or "-",
                 e.get("speedup_vs_official", "-")) for name, e in tr["entries"].items() if "step_s" in e]  # fmt: skip
        lines += ["", f"training step, batch {tr['batch']}, {tr['precision']}; logits check: {tr.get('logits')}",
                  common.markdown_table(["side", "ms / step", "images/s", "MFU", "vs official"], rows)]  # fmt: skip
    gen = sec.get("generation", {})
    if gen.get("batches"):
        rows = []
        for batch, row in gen["batches"].items():
            for name, e in row.items():
                if "total_s" in e:
                    rows.append((batch, name, e["total_s"] * 1e3, e["transformer_s"] * 1e3, e["decode_s"] * 1e3,
                                 e.get("speedup_vs_official", "-")))  # fmt: skip
        lines += ["", "generation (cfg 1.5, top-k, top-p 0.96), decode included",
                  common.markdown_table(["batch", "side", "total ms", "transformer ms", "decode ms", "vs official"],
                                        rows)]  # fmt: skip
    units = sec.get("scale_vs_token", {})
    if units.get("rows"):
        rows = [(r["batch"], r["variant"], r["scale_s"] * 1e3, r["token_s"] * 1e3, r["token_over_scale"])
                for r in units["rows"] if "scale_s" in r]  # fmt: skip
        lines += [
            "",
            "scale vs token, codes only",
            common.markdown_table(["batch", "variant", "scale ms", "token ms", "token / scale"], rows),
        ]
    mem = sec.get("memory", {})
    if mem.get("depths"):
        rows = [
            (d, r.get("params_m", "-"), r.get("peak_gib") or "-", r.get("fits", "-"))
            for d, r in mem["depths"].items()
        ]
        lines += ["", f"training step memory, batch {mem['batch']}",
                  common.markdown_table(["model", "params M", "peak GiB", "fits"], rows)]  # fmt: skip
    status = ", ".join(f"{name} {s['status']} ({s['seconds']} s)" for name, s in sec.items())
    lines += ["", f"sections: {status}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="gpu_benchmark.json", help="JSON results (rewritten after each section)"
    )
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--device", help="override the device (default cuda; cpu with --dry-run)")
    parser.add_argument(
        "--reference", help="the VAR-official folder (default ../shared/reference/VAR-official)"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset, in the fixed order"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="skip what would start after this many seconds"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by name)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)"
    )
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    wanted = [s for s in SECTIONS if s in args.sections.split(",")]
    run = Run(args)
    if run.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --dry-run (CPU, tiny sizes) or --device cpu")
    fns = {"environment": environment, "train": train, "generation": generation,
           "scale_vs_token": scale_vs_token, "memory": memory}  # fmt: skip
    try:
        for name in wanted:
            run.section(name, lambda name=name: fns[name](run))
    finally:
        run.close()
    run.payload["seconds"] = round(run.elapsed(), 1)
    run.save()
    print(summary(run.payload))
    return run.payload


if __name__ == "__main__":
    main()
