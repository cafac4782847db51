"""``varkit sample``: a sample set of a run or checkpoint on disk, as FID evaluators read it.

Under ``torchrun`` every process draws its share of the chunks; a killed run started
again with the same arguments resumes. See ``varkit.sampling`` for the layout.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from varkit.config_types import Problem, field_types, structure
from varkit.defaults import SMOOTH_SAMPLER
from varkit.errors import EvaluationError, VarkitError
from varkit.loading import Loaded, checkpoint_dir, class_names_of, load_pretrained, recipe_of, resolve_classes
from varkit.pipeline import Pipeline
from varkit.plugins import registry
from varkit.recipe import parse_override
from varkit.sampling import DTYPES, SamplePlan, sample_to_dir
from varkit.train.distributed import DistEnv, env_from_torchrun, init_distributed

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, commands: dict) -> None:
    p = sub.add_parser(
        "sample",
        help="draw a sample set from a run or checkpoint into samples.npz (resumable, multi-GPU)",
        description="Draw images of the given classes into OUT: samples.npz (arr_0: uint8 NxHxWx3, labels: N, "
        "the layout of the ADM evaluator) and protocol.json (checkpoint digest, sampler and every option, "
        "seeds, counts, dtype, versions, hardware). Image n has its own seed derived from (--seed, n), so "
        "the images do not depend on the number of processes. Run under torchrun to share the work; run "
        "the same command again to resume a killed run. Example (VAR's FID protocol): varkit sample RUN "
        "--classes 0-999 --per-class 50 --cfg 1.5 --top-k 900 --top-p 0.96 --out samples/",
    )
    p.add_argument(
        "checkpoint",
        help="pretrained directory (`varkit import`, save_pretrained), run or checkpoint directory, "
        "or Hub repository id",
    )
    p.add_argument(
        "--out", required=True, help="output directory (created when missing; resumed when it exists)"
    )
    add_sampling_arguments(p)
    p.add_argument("--png", action="store_true", help="also write every image as images/CCCC_III.png")
    p.add_argument(
        "--grid",
        action="store_true",
        help="also write grid.png: a row per class, at most 10 classes × 8 images",
    )
    commands["sample"] = _sample


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The options that decide a sample set (shared by ``sample`` and ``eval --fid``)."""
    p.add_argument(
        "--classes",
        help="class indices, ranges or names (from the model's classes.json), e.g. 0-999, 0,5,10-19 or "
        "cat,dog (default: every class)",
    )
    p.add_argument("--num", type=int, help="images in all; must split evenly over the classes")
    p.add_argument("--per-class", type=int, help="images of each class")
    p.add_argument(
        "--seed", type=int, default=0, help="base seed; image n uses a seed derived from (seed, n)"
    )
    p.add_argument("--sampler", help="sampler name (default: the recipe's)")
    p.add_argument("--cfg", type=float, help="guidance scale (>= 0; 0 turns guidance off)")
    p.add_argument("--top-k", type=int, help="top-k (0: off)")
    p.add_argument("--top-p", type=float, help="top-p in [0, 1] (0 or 1: off)")
    p.add_argument("--more-smooth", action="store_true", help="VAR's smooth mode (the gumbel sampler)")
    p.add_argument(
        "--sampler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any option of the sampler's Config (plugin samplers too), read as YAML; repeatable",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per batch and per chunk on disk (default 32)"
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="autocast dtype of the transformer (default: bf16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")


# ---------------------------------------------------------------- argument checks


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Refuse bad sampling options before anything is loaded."""
    if args.top_p is not None and not 0.0 <= args.top_p <= 1.0:
        raise EvaluationError(f"--top-p is {args.top_p}; it must lie in [0, 1] (0 or 1 turns it off)")
    if args.top_k is not None and args.top_k < 0:
        raise EvaluationError(f"--top-k is {args.top_k}; it must be >= 0 (0 turns it off)")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise EvaluationError(
            f"--cfg is {args.cfg}; give a finite guidance scale >= 0 (0 turns guidance off; VAR's FIDs use 1.5)"
        )
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size is {args.batch_size}; it must be at least 1")
    for flag, value in (("--num", args.num), ("--per-class", args.per_class)):
        if value is not None and value < 1:
            raise EvaluationError(f"{flag} is {value}; it must be at least 1")
    if args.seed < 0:
        raise EvaluationError(f"--seed is {args.seed}; give a seed >= 0")
    if args.num is None and args.per_class is None:
        raise EvaluationError("say how many images to draw: --num N (in all) or --per-class N")
    check_device(args.device)


def check_device(name: str | None) -> None:
    """Refuse a device that this machine does not have."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvaluationError(f"--device {name!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError(
                f"--device {name} but CUDA is not available here (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvaluationError(
                f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type != "cpu":
        raise EvaluationError(f"--device {name}: sampling runs on cuda or cpu")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise EvaluationError(
            f"{flag} {out} is a file; give a directory for the samples (it is created if missing)"
        )


# ---------------------------------------------------------------- setting up


def process_env(device: str | None) -> DistEnv:
    """This process's place under torchrun (rank 0 of 1 without it) and its device."""
    if device is not None and torch.device(device).type == "cpu":
        return env_from_torchrun(device="cpu")
    env = env_from_torchrun()
    if device is not None and torch.device(device).index is not None and env.world_size == 1:
        return DistEnv(device=torch.device(device))
    return env


def default_dtype(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def sampler_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """``--sampler-option`` values, typed by the sampler's Config, with --cfg/--top-k/--top-p."""
    cls = registry().get("sampler", name)
    types = field_types(cls.Config)
    options: dict[str, Any] = {}
    problems: list[Problem] = []
    for text in args.sampler_option:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in types:
            raise EvaluationError(
                f"--sampler-option {text!r}: sampler {name!r} has no option {key!r}; its options are: "
                f"{', '.join(sorted(types)) or 'none'}"
            )
        if key in options:
            raise EvaluationError(f"--sampler-option {key} is given twice ({options[key]!r} and {value!r})")
        options[key] = structure(types[key], value, f"--sampler-option {key}", problems)
    if problems:
        raise EvaluationError("; ".join(f"{p.path}: {p.message}" for p in problems))
    for key, value in (("cfg", args.cfg), ("top_k", args.top_k), ("top_p", args.top_p)):
        if value is None:
            continue
        if key in options:
            raise EvaluationError(
                f"--{key.replace('_', '-')} and --sampler-option {key} are both given; give one"
            )
        options[key] = value
    return options


def make_sampler(pipe: Pipeline, args: argparse.Namespace):
    """The sampler the options describe (the recipe's when none is named)."""
    name = args.sampler or (SMOOTH_SAMPLER if args.more_smooth else None) or pipe.sampler.name
    options = sampler_options(args, name)
    try:
        return pipe.make_sampler(name, **options)
    except VarkitError:
        raise
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"sampler {name!r}: {exc}") from None


def load_for_sampling(args: argparse.Namespace, env: DistEnv) -> tuple[Pipeline, Loaded]:
    loaded = load_pretrained(args.checkpoint, ema=not args.no_ema)
    return Pipeline.from_loaded(loaded, device=env.device), loaded


def checkpoint_source(loaded: Loaded, ema: bool) -> dict[str, Any]:
    used_ema = ema and (loaded.source / "ema.safetensors").is_file()
    return {"path": str(loaded.source), "weights": "ema" if used_ema else "model"}


def plan_of(args: argparse.Namespace) -> SamplePlan:
    """The plan the arguments describe, checked against the checkpoint's recipe before
    its weights are read (as are the sampler options)."""
    step_dir = checkpoint_dir(args.checkpoint)
    recipe = recipe_of(step_dir)
    num_classes = recipe.model.num_classes
    classes = resolve_classes(args.classes, class_names_of(step_dir, num_classes), num_classes)
    plan = SamplePlan.make(
        classes, num=args.num, per_class=args.per_class, seed=args.seed, batch_size=args.batch_size
    )
    sampler_options(
        args, args.sampler or (SMOOTH_SAMPLER if args.more_smooth else None) or recipe.sampler.name
    )
    return plan


def draw(
    args: argparse.Namespace, out: Path, *, png: bool = False, grid: bool = False
) -> tuple[Path, DistEnv]:
    """Load the checkpoint, build the plan and sampler, and draw the set into ``out`` (every rank)."""
    plan = plan_of(args)
    env = process_env(args.device)
    created = init_distributed(env)
    try:
        pipe, loaded = load_for_sampling(args, env)
        sampler = make_sampler(pipe, args)
        target = sample_to_dir(
            pipe.model,
            pipe.tokenizer,
            sampler,
            out,
            plan,
            dtype=args.dtype or default_dtype(env.device),
            rank=env.rank,
            world_size=env.world_size,
            source=checkpoint_source(loaded, not args.no_ema),
            png=png,
            grid=grid,
        )
    finally:
        if created:
            dist.destroy_process_group()
    return target, env


def _sample(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    out = Path(args.out)
    check_out_dir(out)
    target, env = draw(args, out, png=args.png, grid=args.grid)
    if env.main:
        print(target)
    return 0
