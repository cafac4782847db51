"""varkit's VAR against an "official-style" baseline on the same weights, side by side.

The baseline re-creates three known costs of the research code, each as a drop-in
replacement of one varkit part, so that every other line of the model is shared:

(a) ``DenseBiasAttention``: training attention gets the block-causal mask as a dense
    float additive bias ``(b, nh, l, l)`` (0 where visible, -inf elsewhere), built once
    per batch shape and passed to SDPA; varkit passes the structural ``BlockCausal``
    as one boolean ``(l, l)`` matrix that broadcasts over batch and heads.
(b) ``ConcatKVCache``: keys and values grown by ``torch.cat`` at every step and block;
    varkit writes them in place into one preallocated ``KVCache``.
(c) ``FullSortTopKTopP``: guidance as its own pass, top-k by a threshold on the whole
    vocabulary, then top-p by sorting the whole vocabulary, then ``torch.multinomial``;
    varkit's ``topk_topp`` fuses guidance and temperature into one pass, takes ``topk``
    (which returns its k values sorted), applies top-p to those k values only and draws
    by an exponential race (no host synchronisation).

Each comparison runs both sides in one process, repetitions interleaved, and reports
medians and their ratio; peak memory of each side comes from a fresh subprocess.

    .venv/bin/python benchmarks/official_style.py --max-load 2.5 --out /tmp/official_style.json
    .venv/bin/python benchmarks/official_style.py --quick        # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

import _common as common
import torch
import torch.nn.functional as F

import varkit
from varkit.generation import generate_codes
from varkit.masks import BlockCausal
from varkit_plugins.samplers import TopKTopP

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------- the baseline


class DenseBiasAttention(varkit.AttentionBackend):
    """SDPA with the block-causal mask as a dense float ``(b, nh, l, l)`` additive bias.

    The bias is materialised once per (mask, batch, heads, dtype, device) and reused by
    every block, which is the cheapest way to hold a per-batch dense mask; its memory
    and the bandwidth of reading it in every block are what is being measured.
    """

    name = "dense_bias"

    def __init__(self, config=None):
        super().__init__(config)
        self._bias_key = None
        self._bias = None

    def _dense_bias(self, mask: BlockCausal, q: torch.Tensor) -> torch.Tensor:
        b, nh, l, _ = q.shape
        key = (mask, b, nh, q.dtype, q.device)
        if self._bias_key != key:
            self._bias = None  # free the old one before allocating the new one
            bias = torch.zeros(l, l, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask.dense(q.device), float("-inf")
            )
            self._bias = bias.expand(b, nh, l, l).contiguous()  # (b, nh, l, l)
            self._bias_key = key
        return self._bias

    def attend(self, q, k, v, *, mask: BlockCausal | None, scale: float) -> torch.Tensor:
        if mask is None:  # cached generation steps: no mask on either side
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._dense_bias(mask, q), scale=scale)


class ConcatKVCache:
    """The interface of :class:`varkit.model.kv_cache.KVCache`, grown by ``torch.cat``.

    Every step and block concatenates its new keys and values onto the old ones, so
    each step copies the whole cache so far (quadratic copying over a generation) and
    allocates anew.
    """

    def __init__(self, *, depth: int, batch: int, max_len: int, dtype: torch.dtype):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.length = 0
        self.modulation = None
        self.positions = None
        self.rotary = None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        k = k.to(self.dtype)
        v = v.to(self.dtype)
        self.keys[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)  # (b, nh, length + n, hd)
        self.values[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.length = 0
        self.modulation = self.positions = self.rotary = None


@contextlib.contextmanager
def concat_cache(model):
    """Within the block, ``model.new_cache`` returns a :class:`ConcatKVCache`.

    The override is an attribute of this one model instance, removed on exit; the
    generation loop itself runs unchanged.
    """

    def new_cache(batch, *, dtype=None, device=None):
        return ConcatKVCache(
            depth=model.config.depth,
            batch=batch,
            max_len=model.step_starts[-1],
            dtype=dtype or model.head.weight.dtype,
        )

    model.new_cache = new_cache
    try:
        yield model
    finally:
        del model.new_cache


def full_sort_probs(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling probabilities ``(n, v)`` after top-k then top-p, over the whole vocabulary.

    Same rule as varkit's ``filter_top_k_top_p`` (keep the k most likely, then the
    smallest most-likely-first prefix of them whose renormalised mass reaches p), but
    computed the research-code way: a threshold at the k-th value, then a sort of all
    ``v`` logits.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (n, v): the whole vocabulary
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


class FullSortTopKTopP(TopKTopP):
    """``topk_topp`` the research code's way: guidance as its own pass, then the
    whole-vocabulary top-k mask and sort of :func:`full_sort_probs`, then
    ``torch.multinomial``."""

    name = "full_sort_topk_topp"

    def sample(self, logits, *, step, num_steps, generator):
        b, l, _ = logits.shape
        flat = logits.reshape(b * l, -1).float() / self.config.temperature
        probs = full_sort_probs(flat, top_k=self.config.top_k, top_p=self.config.top_p)
        return torch.multinomial(probs, 1, generator=generator).reshape(b, l)

    def sample_guided(self, cond, uncond, *, t, step, num_steps, generator):
        logits = cond if t == 0 else (1 + t) * cond - t * uncond
        return self.sample(logits, step=step, num_steps=num_steps, generator=generator), None


# ---------------------------------------------------------------------- measurement


def configs(quick: bool, device: torch.device) -> list[tuple[int, int]]:
    if quick:
        return [(1, 2)]
    if device.type == "cuda":
        return [(16, 8), (16, 64)]
    return [(4, 8), (4, 64), (6, 8), (6, 64)]


def _recipe(quick: bool, depth: int) -> dict:
    if quick:
        return common.recipe_dict(unit={"name": "scale"}, depth=depth, tokenizer=QUICK_MSVQ, num_classes=10)
    return common.recipe_dict(unit={"name": "scale"}, depth=depth)


#: A tiny msvq for --quick: 32 px, 4× down, scales 1,2,4,8 (85 positions).
QUICK_MSVQ = {
    "name": "msvq",
    "image_size": 32,
    "ch": 16,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "norm_groups": 8,
    "vocab_size": 256,
    "code_dim": 8,
    "schedule": "1,2,4,8",
}


class Harness:
    """One model, its inputs, and the paired callables of every comparison."""

    def __init__(
        self, depth: int, batch: int, *, quick: bool, device: torch.device, dtype: torch.dtype | None
    ):
        self.device, self.dtype, self.batch = device, dtype, batch
        self.tokenizer, self.model, self.sampler = common.build(_recipe(quick, depth), device)
        self.baseline_sampler = FullSortTopKTopP(self.sampler.config)
        self.dense = DenseBiasAttention()
        self.sdpa = self.model.attention
        g = torch.Generator().manual_seed(1)
        vocab, classes = self.tokenizer.vocab_size, self.model.config.num_classes
        codes = [
            torch.randint(0, vocab, (batch, h, w), generator=g).to(device) for h, w in self.tokenizer.schedule
        ]
        self.labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        with torch.no_grad():
            self.inputs = self.model.unit.teacher_forcing(codes, self.tokenizer)  # (b, l - l_0, c)
        self.targets = self.model.unit.targets(codes)  # (b, l)

    @functools.cached_property
    def step_logits(self) -> list[torch.Tensor]:
        """Logits of one generation's steps, ``(b, l_s, v)`` each, for the sampler alone."""
        g = torch.Generator().manual_seed(2)
        vocab = self.tokenizer.vocab_size
        return [
            (torch.randn(self.batch, n, vocab, generator=g) * 3).to(self.device)
            for n in self.model.unit.step_lengths
        ]

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # -- (a) training ----------------------------------------------------------------
    def train_step(self, attention) -> None:
        model = self.model.train()
        model.attention = attention
        with self._autocast():
            logits = model(self.inputs, self.labels)  # (b, l, v)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    # -- (b), (d) generation ------------------------------------------------------------
    def generate(self, *, official_cache: bool, sampler, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator(self.device).manual_seed(seed)
        ctx = concat_cache(self.model) if official_cache else contextlib.nullcontext()
        with ctx:
            codes, _ = generate_codes(
                self.model, self.tokenizer, sampler, self.labels, generator=g, dtype=self.dtype
            )
        return codes

    # -- (c) the sampler alone ---------------------------------------------------------
    def sample_all_steps(self, sampler) -> None:
        g = torch.Generator(self.device).manual_seed(0)
        steps = len(self.step_logits)
        for step, logits in enumerate(self.step_logits):
            sampler.sample(logits, step=step, num_steps=steps, generator=g)

    def pairs(self) -> dict[str, dict]:
        """The comparisons: name -> {"varkit": fn, "official-style": fn}."""
        return {
            "train fwd+bwd (a: mask)": {
                "varkit": lambda: self.train_step(self.sdpa),
                "official-style": lambda: self.train_step(self.dense),
            },
            "generation (b: KV cache)": {
                "varkit": lambda: self.generate(official_cache=False, sampler=self.sampler),
                "official-style": lambda: self.generate(official_cache=True, sampler=self.sampler),
            },
            "sampling, all steps (c: top-p)": {
                "varkit": lambda: self.sample_all_steps(self.sampler),
                "official-style": lambda: self.sample_all_steps(self.baseline_sampler),
            },
            "generation end to end (b+c)": {
                "varkit": lambda: self.generate(official_cache=False, sampler=self.sampler),
                "official-style": lambda: self.generate(official_cache=True, sampler=self.baseline_sampler),
            },
        }

    def check(self) -> dict:
        """The baseline computes what varkit computes: same logits, same codes."""
        model = self.model.eval()
        with torch.no_grad(), self._autocast():
            model.attention = self.sdpa
            ref = model(self.inputs, self.labels)
            model.attention = self.dense
            alt = model(self.inputs, self.labels)
        model.attention = self.sdpa
        same_codes = all(
            torch.equal(a, b)
            for a, b in zip(
                self.generate(official_cache=False, sampler=self.sampler),
                self.generate(official_cache=True, sampler=self.sampler),
                strict=True,
            )
        )
        flat = self.step_logits[-1].flatten(0, 1).float()
        cfg = self.sampler.config
        from varkit_plugins.samplers import filter_top_k_top_p

        values, index = filter_top_k_top_p(flat, top_k=cfg.top_k, top_p=cfg.top_p)
        probs = torch.zeros_like(flat)
        if index is None:
            probs = values.softmax(-1)
        else:
            probs.scatter_(-1, index, values.softmax(-1))
        base = full_sort_probs(flat, top_k=cfg.top_k, top_p=cfg.top_p)
        return {
            "max_abs_logit_diff_dense_mask": float((ref - alt).abs().max()),
            "same_codes_concat_cache": same_codes,
            "max_abs_prob_diff_full_sort": float((probs - base).abs().max()),
        }


def _dtype(args, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None


def child_time(args) -> dict:
    device = torch.device(args.device)
    depth, batch = (int(x) for x in args.one.split(":"))
    h = Harness(depth, batch, quick=args.quick, device=device, dtype=_dtype(args, device))
    check = h.check()
    rows = []
    reps = args.reps if batch < 32 else args.big_reps
    for name, fns in h.pairs().items():
        # The end-to-end pair runs the code paths the cache and sampler pairs warmed up.
        res = common.interleaved(fns, device, reps=reps, warmup=0 if "end to end" in name else 1)
        v, o = res["varkit"]["median_s"], res["official-style"]["median_s"]
        rows.append({"comparison": name, "varkit_s": v, "official_s": o, "ratio": o / v, "times": res})
    return {"depth": depth, "width": h.model.config.width, "batch": batch, "seq_len": h.model.unit.seq_len,
            "check": check, "rows": rows}  # fmt: skip


def child_memory(args) -> dict:
    """Peak memory of one side of one comparison, in this fresh process."""
    device = torch.device(args.device)
    depth, batch, which, side = args.memory.split(":")
    h = Harness(int(depth), int(batch), quick=args.quick, device=device, dtype=_dtype(args, device))
    fn = {"train": "train fwd+bwd (a: mask)", "generate": "generation end to end (b+c)"}[which]
    probe = common.PeakMemory(device)
    probe.start()
    h.pairs()[fn][side]()
    return {"peak_mib": probe.peak_mib()}


def _run(args, passed: list[str], flag: str, value: str) -> dict:
    """One measurement in a fresh subprocess (or here, with --in-process, for the smoke test)."""
    if not args.in_process:
        return common.run_child(HERE, [*passed, flag, value])
    sub = argparse.Namespace(**vars(args))
    sub.one, sub.memory = (value, None) if flag == "--one" else (None, value)
    return child_time(sub) if sub.one else child_memory(sub)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_arguments(parser)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="on cuda only")
    parser.add_argument("--configs", help="depth:batch,... (default on CPU: d4 at batch 8 and 64; cuda: d16)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of one fresh subprocess each (peak memory then not isolated)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    if args.one:
        print(json.dumps(child_time(args)))
        return None
    if args.memory:
        print(json.dumps(child_memory(args)))
        return None

    device = torch.device(args.device)
    if args.max_load > 0:
        common.wait_for_quiet(args.max_load)
    info = common.machine(device)
    passed = ["--device", args.device, "--threads", str(args.threads), "--reps", str(args.reps),
              "--big-reps", str(args.big_reps),
              "--precision", args.precision] + (["--quick"] if args.quick else [])  # fmt: skip
    todo = (
        [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
        if args.configs
        else configs(args.quick, device)
    )
    results = []
    for depth, batch in todo:
        sys.stderr.write(f"d{depth} b{batch}: timing\n")
        res = _run(args, passed, "--one", f"{depth}:{batch}")
        res["memory_mib"] = {}
        for which in ("train", "generate"):
            for side in ("varkit", "official-style"):
                mem = _run(args, passed, "--memory", f"{depth}:{batch}:{which}:{side}")
                res["memory_mib"][f"{which}/{side}"] = mem["peak_mib"]
        results.append(res)
    info["load_1min_end"] = round(common.load_average(), 2)
    headers = ["model", "batch", "comparison", "varkit ms", "official-style ms", "official / varkit"]
    rows = [
        (f"d{r['depth']} (w{r['width']}, {r['seq_len']} pos)", r["batch"], row["comparison"],
         row["varkit_s"] * 1e3, row["official_s"] * 1e3, f"{row['ratio']:.2f}×")
        for r in results for row in r["rows"]
    ]  # fmt: skip
    mem_headers = [
        "model",
        "batch",
        "train varkit MiB",
        "train official MiB",
        "gen varkit MiB",
        "gen official MiB",
    ]
    mem_rows = [
        (f"d{r['depth']}", r["batch"], *(r["memory_mib"][k] for k in
         ("train/varkit", "train/official-style", "generate/varkit", "generate/official-style")))
        for r in results
    ]  # fmt: skip
    print(f"machine: {info}\n")
    print(common.markdown_table(headers, rows))
    print()
    print(common.markdown_table(mem_headers, mem_rows))
    for r in results:
        print(f"\nchecks d{r['depth']} b{r['batch']}: {r['check']}")
    payload = {"benchmark": "official_style", "machine": info, "reps": args.reps, "big_reps": args.big_reps,
               "memory_isolated": not args.in_process, "results": results}  # fmt: skip
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
