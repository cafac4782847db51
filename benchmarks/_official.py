"""The official VAR code, run in a subprocess beside varkit, on the same random weights.

The official builder (``models.build_vae_var``) replaces ``reset_parameters`` on torch.nn
classes process-wide, so the official side never shares a process with varkit: this
file is both the worker (``python benchmarks/_official.py --serve REFERENCE``) and the
client (:class:`OfficialWorker`) that starts it and talks to it, one JSON line per
request and reply. The worker builds the official VQ-VAE and transformer with the
release's initialisation, saves both state dicts in the official layout, and varkit
loads them through its importer (:func:`load_varkit`), so both sides hold the same
weights. Every timing is measured inside the process that runs the code (synchronised
on CUDA); the parent idles while the worker runs, so interleaved repetitions do not
compete for the machine.

The official code is looked for in ``../shared/reference/VAR-official`` from the
repository root (a development checkout's sibling); :func:`reference_dir` says why not
when it is absent, and callers skip the official side with that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "VAR-official"


def reference_dir(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """``(folder, "")`` of the official VAR code, or ``(None, why not)``."""
    folder = Path(path or os.environ.get("VARKIT_VAR_REFERENCE") or DEFAULT_REFERENCE)
    if not (folder / "models" / "var.py").is_file():
        return None, (
            f"the official VAR code is not at {folder} (a development checkout keeps it in "
            "../shared/reference/VAR-official; set VARKIT_VAR_REFERENCE or --reference to point elsewhere)"
        )
    return folder, ""


# ============================================================================ client


class OfficialError(RuntimeError):
    """The official worker failed; the message holds its traceback."""


class OfficialWorker:
    """A subprocess running the official code; :meth:`call` sends one request.

    Args:
        reference: the VAR-official folder.
        threads: torch threads of the worker on the CPU (0: torch's default).
    """

    def __init__(self, reference: Path, *, threads: int = 0):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve",
                str(reference),
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the official code's prints go to our stderr
            text=True,
            cwd=ROOT,
        )

    def call(self, cmd: str, **kwargs) -> dict:
        if self.proc.poll() is not None:
            raise OfficialError(f"the official worker exited with {self.proc.returncode}")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise OfficialError(f"the official worker exited with {self.proc.wait()} during {cmd!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise OfficialError(f"official {cmd!r} failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, OfficialError):
                self.call("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> OfficialWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_varkit(directory: Path, *, image_size: int, schedule: tuple[int, ...], attention: str, device):
    """varkit's tokenizer and transformer holding the official weights the worker saved.

    The transformer goes through :func:`varkit.importers.var.convert_official_var` (what
    ``varkit.from_official_var`` does), with the tokenizer's image size and schedule given
    (a state dict cannot tell them; the release's are 256 px and 1..16).
    """
    from varkit.build import build_model
    from varkit.importers.var import convert_official_var, official_model_config, official_recipe
    from varkit.plugins import registry
    from varkit.recipe import from_dict
    from varkit.weights import load_state

    vae_state = torch.load(directory / "vae.pth", map_location="cpu", weights_only=True)
    var_state = torch.load(directory / "var.pth", map_location="cpu", weights_only=True)
    msvq = registry().get("tokenizer", "msvq")
    tokenizer = msvq.from_release(vae_state, image_size=image_size, schedule=",".join(map(str, schedule)))
    recipe = official_recipe(tokenizer.config, official_model_config(var_state))
    recipe["attention"] = {"name": attention}
    recipe = from_dict(recipe)
    model = build_model(recipe, tokenizer)
    load_state(model, convert_official_var(var_state), what="the official weights")
    return tokenizer.to(device).eval().requires_grad_(False), model.to(device), recipe


def varkit_train_step(model, tokenizer, *, batch: int, dtype, device, seed: int = 0):
    """A closure running one varkit training step as its trainer does, on fixed random codes.

    Teacher-forcing inputs from the codes, forward under autocast, float32 per-position
    cross-entropy, backward, the hit count the trainer logs, grad clip 2, AdamW (fused on
    CUDA) with VAR's parameter groups; the tokenizer's encoder is not run (both sides
    start from codes).
    """
    from varkit.model.loss import ar_loss
    from varkit.recipe.train import TrainConfig
    from varkit.train.optim import build_adamw, param_groups

    cfg = TrainConfig()
    device = torch.device(device)
    optimizer = build_adamw(param_groups(model, cfg.weight_decay), cfg, device)
    g = torch.Generator().manual_seed(seed)
    codes = [
        torch.randint(0, tokenizer.vocab_size, (batch, h, w), generator=g).to(device)
        for h, w in tokenizer.schedule
    ]
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g).to(device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )

    def step():
        model.train()
        inputs = model.unit.teacher_forcing(codes, tokenizer)
        targets = model.unit.targets(codes)
        with autocast():
            logits = model(inputs, labels)
        per_pos = ar_loss(logits, targets)
        per_pos.mean().backward()
        (logits.detach().argmax(-1) == targets).sum()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ============================================================================ worker


def _hub_stand_in() -> None:
    """The official models import ``huggingface_hub.PyTorchModelHubMixin`` only to give
    ``VARHF`` hub upload/download; without the package a bare stand-in takes its place."""
    if importlib.util.find_spec("huggingface_hub") is None:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub


class _Official:
    """The worker's state: one official VQ-VAE and VAR, and what each request needs."""

    def __init__(self):
        self.vae = self.var = None
        self.device = torch.device("cpu")
        self.patch_nums: tuple[int, ...] = ()
        self._train = None

    # -- requests ------------------------------------------------------------------
    def build(self, *, depth, patch_nums, vocab, code_dim, ch, num_classes, alng, seed, device, out):
        from models import build_vae_var

        self.device = torch.device(device)
        self.patch_nums = tuple(patch_nums)
        torch.manual_seed(seed)
        vae, var = build_vae_var(
            device=self.device, patch_nums=self.patch_nums, V=vocab, Cvae=code_dim, ch=ch, share_quant_resi=4,
            num_classes=num_classes, depth=depth, shared_aln=False, attn_l2_norm=True,
            flash_if_available=True, fused_if_available=True,
            init_adaln=0.5, init_adaln_gamma=alng, init_head=0.02, init_std=-1,
        )  # fmt: skip
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        with torch.no_grad():
            # The builder leaves the VQ-VAE uninitialised (it loads released weights): give it
            # random weights of a sane scale. The transformer keeps the release's init, moved
            # off it a little so that the near-zero AdaLN gates do not hide the arithmetic.
            for name, p in vae.named_parameters():
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 0
                if fan_in:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
                else:
                    p.copy_(
                        torch.ones(p.shape)
                        if "norm" in name and name.endswith("weight")
                        else torch.zeros(p.shape)
                    )
            for p in var.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
        self.vae, self.var = vae.eval(), var
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, out / "vae.pth")
        torch.save({k: v.cpu() for k, v in var.state_dict().items()}, out / "var.pth")
        self._train = None
        return {"params": sum(p.numel() for p in var.parameters())}

    def logits(self, *, codes, out):
        """Teacher-forced logits of the code maps in ``codes`` (a torch file), without class dropout."""
        data = torch.load(codes, weights_only=True)
        idx = [c.to(self.device).flatten(1) for c in data["codes"]]
        labels = data["labels"].to(self.device)
        self.var.eval()
        drop, self.var.cond_drop_rate = self.var.cond_drop_rate, 0.0
        try:
            with torch.no_grad():
                x = self.vae.quantize.idxBl_to_var_input(idx)
                logits = self.var(labels, x)
        finally:
            self.var.cond_drop_rate = drop
        torch.save(logits.float().cpu(), out)
        return {}

    def train(self, *, batch, precision, reps, warmup, seed=0, clock="wall"):
        """Seconds of ``reps`` official training steps (after ``warmup``), as its trainer runs them."""
        if self._train is None or self._train[0] != (batch, precision):
            self._train = ((batch, precision), self._train_step(batch, precision, seed))
        step = self._train[1]
        for _ in range(warmup):
            step()
        return {"seconds": [timed(step, self.device, clock) for _ in range(reps)]}

    def _train_step(self, batch, precision, seed):
        from utils.amp_sc import AmpOptimizer

        var, quantize = self.var.train(), self.vae.quantize
        # train.py's parameter groups (utils.lr_control.filter_params, whose print needs the
        # trainer's patched builtins): no decay for vectors, biases and these names.
        nowd = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")  # fmt: skip
        names, paras, decay, no_decay = [], [], [], []
        for name, p in var.named_parameters():
            if p.requires_grad:
                names.append(name)
                paras.append(p)
                plain = p.ndim == 1 or name.endswith("bias") or any(k in name for k in nowd)
                (no_decay if plain else decay).append(p)
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # the release's afuse=True; fused AdamW needs CUDA here
        opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=fused)
        amp = {"fp32": 0, "fp16": 1, "bf16": 2}[precision]
        optimizer = AmpOptimizer(
            mixed_precision=amp,
            optimizer=opt,
            names=names,
            paras=paras,
            grad_clip=2.0,
            n_gradient_accumulation=1,
        )
        g = torch.Generator(device="cpu").manual_seed(seed)
        idx = [
            torch.randint(0, self.vae.vocab_size, (batch, pn * pn), generator=g).to(self.device)
            for pn in self.patch_nums
        ]
        labels = torch.randint(0, var.num_classes, (batch,), generator=g).to(self.device)
        vocab = self.vae.vocab_size
        seq = sum(pn * pn for pn in self.patch_nums)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        weight = torch.ones(1, seq, device=self.device) / seq

        def step():
            # trainer.VARTrainer.train_step from the codes on (the VQ-VAE encode is not timed on either side)
            gt = torch.cat(idx, dim=1)
            x = quantize.idxBl_to_var_input(idx)
            with optimizer.amp_ctx:
                logits = var(labels, x)
                loss = loss_fn(logits.view(-1, vocab), gt.view(-1)).view(batch, -1).mul(weight).sum(-1).mean()
            optimizer.backward_clip_step(loss=loss, stepping=True)
            logits.data.argmax(dim=-1)

        return step

    def generate(self, *, batch, reps, warmup, cfg, top_k, top_p, precision, seed=0, clock="wall"):
        """Seconds of ``autoregressive_infer_cfg`` (decode included) and of the decode alone."""
        var, vae = self.var.eval(), self.vae
        labels = torch.arange(batch, device=self.device) % var.num_classes
        ctx = _autocast(self.device, precision)
        last = self.patch_nums[-1]
        f_hat = torch.randn(batch, vae.Cvae, last, last, generator=torch.Generator().manual_seed(seed)).to(
            self.device
        )

        def whole():
            with ctx():
                var.autoregressive_infer_cfg(
                    B=batch, label_B=labels, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p
                )

        def decode():
            with torch.no_grad(), ctx():
                vae.fhat_to_img(f_hat)

        for _ in range(warmup):
            whole()
            decode()
        return {
            "seconds": [timed(whole, self.device, clock) for _ in range(reps)],
            "decode_seconds": [timed(decode, self.device, clock) for _ in range(reps)],
        }

    def memory(self, *, batch, precision):
        """Peak CUDA memory (GiB) of one official training step at ``batch``, above what the weights hold."""
        self._train = None
        if self.device.type != "cuda":
            return {"peak_gib": None}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._train = ((batch, precision), self._train_step(batch, precision, 0))
        self._train[1]()
        torch.cuda.synchronize()
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def timed(fn, device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes (synchronised on CUDA).

    ``clock="cpu"`` counts this process's CPU time instead of wall time: on a shared
    machine whose other jobs take the cores away, a single-threaded process's CPU time
    still measures the work it did.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return now() - t0


def serve(reference: Path, threads: int) -> None:
    """Answer requests from stdin until ``quit``; replies go to the original stdout, one line each."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the official code prints: keep its output off the reply channel
    sys.stdout = sys.stderr
    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(reference))
    _hub_stand_in()
    official = _Official()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            replies.write("{}\n")
            replies.flush()
            return
        try:
            reply = getattr(official, cmd)(**request)
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="the official VAR code as a worker (see the module docstring)"
    )
    parser.add_argument("--serve", required=True, help="the VAR-official folder")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    serve(Path(args.serve), args.threads)
