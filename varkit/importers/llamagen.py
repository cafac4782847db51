"""LlamaGen's class-conditional release (arXiv 2406.06525) as varkit models.

The release publishes PyTorch files: ``vq_ds16_c2i.pt`` (the VQ tokenizer, 16384 codes
of 8 dims, read by the ``vq`` plugin's ``from_release``) and the class-conditional
GPTs ``c2i_B_256.pt``, ``c2i_B_384.pt``, ``c2i_L_256.pt``, ``c2i_L_384.pt``,
``c2i_XL_384.pt``, ``c2i_XXL_384.pt`` and ``c2i_3B_384.pt``. They are read with
``torch.load(weights_only=True)`` only (the training arguments stored beside the DDP
models' weights are an ``argparse.Namespace``, which is allowed through).

A LlamaGen GPT is varkit's transformer with the ``token`` unit and these options:
prefix conditioning by one class token (no AdaLN), RMSNorm, SwiGLU with a hidden width
of ``2/3·4d`` rounded up to 256, no biases, plain softmax attention, 2-D RoPE anchored
at each position's input code with zero tables at the class token, a code table as
input embedding, and LlamaGen's dropouts and initialisation. Its keys map as:

| LlamaGen | varkit |
| --- | --- |
| ``cls_embedding.embedding_table.weight`` | ``class_embed.weight`` |
| ``tok_embeddings.weight`` | ``word_embed.weight`` |
| ``layers.i.attention.wqkv.weight`` | ``blocks.i.attn.qkv.weight`` (q, k rows reordered, below) |
| ``layers.i.attention.wo.weight`` | ``blocks.i.attn.proj.weight`` |
| ``layers.i.feed_forward.w1 / w3 / w2`` | ``blocks.i.mlp.gate / up / down`` |
| ``layers.i.attention_norm.weight`` | ``blocks.i.norm1.weight`` |
| ``layers.i.ffn_norm.weight`` | ``blocks.i.norm2.weight`` |
| ``norm.weight`` | ``head_norm.weight`` |
| ``output.weight`` | ``head.weight`` |
| ``freqs_cis`` (older files) | checked against the rotary tables, dropped |

LlamaGen rotates the interleaved pairs ``(x[2i], x[2i+1])`` of each head; varkit
rotates ``(x[i], x[i + hd/2])``. Reordering each head's query and key rows of ``wqkv``
(even dimensions first, then odd) maps one onto the other: scores ``q·k`` are sums over
the same products, so the logits are LlamaGen's up to float rounding.

The architecture is read off the shapes, except the heads (a size's table:
B 12, L 16, XL 20, XXL 24, 3B 32; other sizes need ``heads=``) and the image size,
which no weight records (read from the file name, ``c2i_B_256.pt``, or given).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from varkit import recipe as recipe_mod
from varkit.build import build_model
from varkit.config_types import unstructure
from varkit.defaults import DEFAULT_PLUGINS
from varkit.errors import CheckpointError
from varkit.loading import Loaded, save_pretrained
from varkit.model.transformer import ModelConfig
from varkit.plugins import registry
from varkit.pretrained import ModelCard
from varkit.weights import check_state_dict, describe_release, key_differences, read_state_dict

log = logging.getLogger(__name__)

#: (depth, width) of LlamaGen's GPT sizes -> (name, heads).
SIZES = {
    (12, 768): ("B", 12),
    (24, 1024): ("L", 16),
    (36, 1280): ("XL", 20),
    (48, 1536): ("XXL", 24),
    (48, 2560): ("XXXL", 40),
    (24, 3200): ("3B", 32),
}
#: Parameters, FID-50k on ImageNet 256×256 (LlamaGen README) and the guidance of its
#: evaluation (GETTING_STARTED.md) of each released file.
RELEASES = {
    "c2i_B_256": ("111M", "5.46", 2.0),
    "c2i_B_384": ("111M", "6.09", 2.0),
    "c2i_L_256": ("343M", "3.80", 2.0),
    "c2i_L_384": ("343M", "3.07", 2.0),
    "c2i_XL_384": ("775M", "2.62", 1.75),
    "c2i_XXL_384": ("1.4B", "2.34", 1.75),
    "c2i_3B_384": ("3.1B", "2.18", 1.65),
}
#: Guidance of LlamaGen's FIDs by size (GETTING_STARTED.md).
CFG = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "XXXL": 1.75, "3B": 1.65}
#: LlamaGen's class-conditional training (autoregressive/train/train_c2i.py, the paper):
#: AdamW (0.9, 0.95), lr 1e-4 flat, weight decay 0.05, grad-norm clip 1, batch 256,
#: 300 epochs, bf16.
TRAIN = {
    "epochs": 300,
    "batch_size": 256,
    "lr": 1.0e-4,
    "betas": [0.9, 0.95],
    "weight_decay": 0.05,
    "grad_clip": 1.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "precision": "bf16",
}
#: The token unit as LlamaGen's GPT orders and places its tokens.
UNIT = {
    "name": "token",
    "position": "rope2d",
    "rope_base": 10000.0,
    "rope_anchor": "input",
    "inputs": "codes",
    "start_embedding": False,
}
SOURCE = "https://huggingface.co/FoundationVision/LlamaGen"
PAPER = (
    "Sun et al., Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation, arXiv 2406.06525"
)

_LAYER = re.compile(r"^layers\.(\d+)\.")
_SIZE_IN_NAME = re.compile(r"(?:^|_)(\d{3,4})(?:L)?(?:[_.]|$)")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") prefix every key of what they save.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _not_a_gpt(state: dict[str, torch.Tensor], missing: list[str], path: str = "the file") -> CheckpointError:
    what = describe_release(state)
    hint = f" It looks like {what}." if what else ""
    return CheckpointError(
        f"{path} is not a LlamaGen GPT state dict: it has no {', '.join(missing)} (found {len(state)} keys, "
        f"e.g. {', '.join(sorted(state)[:4]) or 'none'}).{hint}"
    )


def llamagen_model_config(state: dict[str, torch.Tensor], *, heads: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a LlamaGen class-conditional GPT, read off its shapes.

    Depth (``layers.i``), width and classes (``cls_embedding``), and the SwiGLU width
    come from the tensors; heads from the size's table or ``heads``; dropouts, norm
    epsilon and initialisation are LlamaGen's training values.

    Raises:
        CheckpointError: not a LlamaGen GPT, an unknown size without ``heads``, or a
            layout varkit does not hold (grouped-query attention, another MLP width).
    """
    state = _strip(state)
    needed = [
        "cls_embedding.embedding_table.weight",
        "tok_embeddings.weight",
        "layers.0.attention.wqkv.weight",
    ]
    missing = [k for k in needed if k not in state]
    if missing:
        raise _not_a_gpt(state, missing)
    indices = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    depth = max(indices) + 1
    gaps = sorted(set(range(depth)) - indices)
    if gaps:
        raise CheckpointError(
            f"LlamaGen GPT lacks every key of layers {gaps} (it has layers up to {depth - 1})"
        )
    rows, width = state["cls_embedding.embedding_table.weight"].shape
    _, table_heads = SIZES.get((depth, int(width)), (None, None))
    heads = heads or table_heads
    if heads is None:
        raise CheckpointError(
            f"a LlamaGen GPT of depth {depth} and width {width} is none of the released sizes "
            f"({', '.join(f'{n}: {d}x{w}' for (d, w), (n, _) in SIZES.items())}); give its number of heads "
            "(--heads / heads=)"
        )
    qkv = tuple(state["layers.0.attention.wqkv.weight"].shape)
    if qkv != (3 * width, width):
        raise CheckpointError(
            f"layers.0.attention.wqkv.weight is {qkv}, not ({3 * width}, {width}): grouped-query attention "
            "(n_kv_head) is not supported"
        )
    hidden = state.get("layers.0.feed_forward.w1.weight")
    try:
        config = ModelConfig(
            depth=depth,
            width=int(width),
            heads=int(heads),
            mlp_ratio=4.0,
            mlp_multiple_of=256,
            num_classes=int(rows) - 1,
            class_dropout=0.1,
            drop_path=0.0,
            dropout=0.1,
            token_dropout=0.1,
            attn_l2_norm=False,
            norm_eps=1e-5,
            head_init=0.0,
            conditioning="prefix",
            class_tokens=1,
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            init_std=0.02,
            scale_residual_init=False,
        )
    except ValueError as exc:
        raise CheckpointError(f"LlamaGen GPT has an unusable architecture: {exc}") from None
    if hidden is not None and hidden.shape[0] != config.mlp_hidden:
        raise CheckpointError(
            f"layers.0.feed_forward.w1.weight has {hidden.shape[0]} rows but LlamaGen's SwiGLU width for "
            f"width {width} is {config.mlp_hidden} (ffn_dim_multiplier is not supported)"
        )
    return config


def _head_order(head_dim: int) -> torch.Tensor:
    """Rows of one head in varkit's rotary layout: LlamaGen's even dimensions, then its odd ones."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def convert_llamagen_gpt(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A LlamaGen GPT state dict renamed (and its q/k rows reordered) to `ARModel`'s keys.

    Every key must be present with the shape the architecture implies, and every key
    is consumed. ``freqs_cis``, which older files hold, is checked against ``rotary``
    (the model's cos/sin tables, ``(l, hd/2)`` each) when given, and dropped.

    Raises:
        CheckpointError: naming the missing, unexpected and mismatched keys.
    """
    state = _strip(state)
    d, depth, hidden, hd = config.width, config.depth, config.mlp_hidden, config.head_dim
    vocab = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else -1
    table: dict[str, tuple[str, tuple[int, ...]]] = {
        "cls_embedding.embedding_table.weight": ("class_embed.weight", (config.num_classes + 1, d)),
        "tok_embeddings.weight": ("word_embed.weight", (vocab, d)),
        "norm.weight": ("head_norm.weight", (d,)),
        "output.weight": ("head.weight", (vocab, d)),
    }
    for i in range(depth):
        o, v = f"layers.{i}.", f"blocks.{i}."
        table |= {
            o + "attention.wqkv.weight": (v + "attn.qkv.weight", (3 * d, d)),
            o + "attention.wo.weight": (v + "attn.proj.weight", (d, d)),
            o + "feed_forward.w1.weight": (v + "mlp.gate.weight", (hidden, d)),
            o + "feed_forward.w3.weight": (v + "mlp.up.weight", (hidden, d)),
            o + "feed_forward.w2.weight": (v + "mlp.down.weight", (d, hidden)),
            o + "attention_norm.weight": (v + "norm1.weight", (d,)),
            o + "ffn_norm.weight": (v + "norm2.weight", (d,)),
        }
    extra = {"freqs_cis"}
    missing = sorted(k for k in table if k not in state)
    unexpected = sorted(k for k in state if k not in table and k not in extra)
    mismatched = [
        f"{k}: {tuple(state[k].shape)}, expected {shape}"
        for k, (_, shape) in table.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    differences = key_differences(missing, unexpected, mismatched)
    if differences:
        raise CheckpointError(
            f"LlamaGen GPT (read as depth {depth}, width {d}) does not have the release's layout "
            f"({differences}); is the file complete and a c2i_*.pt?"
        )
    if "freqs_cis" in state and rotary is not None:
        _check_freqs(state["freqs_cis"], rotary)
    order = _head_order(hd)
    rows = (torch.arange(config.heads)[:, None] * hd + order[None]).flatten()  # (d,)
    out = {}
    for key, (name, _) in table.items():
        tensor = state[key]
        if key.endswith("attention.wqkv.weight"):
            q, k, v = tensor.split(d, dim=0)
            tensor = torch.cat((q[rows], k[rows], v), dim=0)
        out[name] = tensor
    return out


def _check_freqs(freqs: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> None:
    cos, sin = rotary
    length = cos.shape[0]
    if freqs.ndim != 3 or freqs.shape[0] < length or tuple(freqs.shape[1:]) != (cos.shape[1], 2):
        raise CheckpointError(
            f"freqs_cis is {tuple(freqs.shape)}; a LlamaGen GPT of {length} positions with heads of "
            f"{2 * cos.shape[1]} channels has ({length + 1}, {cos.shape[1]}, 2). Give the image size the "
            "model was trained at (--image-size)"
        )
    if freqs.is_meta:
        return
    ours = torch.stack((cos, sin), dim=-1)
    if not torch.allclose(freqs[:length].float(), ours, atol=1e-4):
        raise CheckpointError(
            "freqs_cis differs from LlamaGen's 2-D rotary table of this image size; give the image size "
            "the model was trained at (--image-size)"
        )


def image_size_of(path: str | os.PathLike) -> int | None:
    """The image size in a release file's name (``c2i_L_384.pt`` -> 384), or None."""
    for match in _SIZE_IN_NAME.finditer(Path(path).stem):
        size = int(match.group(1))
        if size % 16 == 0 and 64 <= size <= 2048:
            return size
    return None


def llamagen_recipe(
    tokenizer_config: Any, model_config: ModelConfig | None, *, size: str | None, out_dir: str
) -> dict[str, Any]:
    """The resolved recipe of a LlamaGen release model (for loading, sampling and fine-tuning)."""
    image_size = tokenizer_config.image_size
    classes = model_config.num_classes if model_config is not None else 1000
    return {
        "out_dir": out_dir,
        "seed": 0,
        "tokenizer": {"name": "vq", "weights": None, **unstructure(tokenizer_config)},
        "unit": dict(UNIT),
        "attention": {"name": DEFAULT_PLUGINS["attention"]},
        "sampler": {"name": "llamagen", "cfg": CFG.get(size or "B", 2.0), "top_k": 0, "top_p": 1.0},
        "model": unstructure(model_config) if model_config is not None else {"num_classes": classes},
        "data": {"resolution": image_size, "num_classes": classes, "crop_ratio": 1.1, "hflip": True},
        "train": dict(TRAIN),
        "tokenizer_train": {"steps": 0},
    }


def read_release(
    vq_ckpt: str | os.PathLike,
    gpt_ckpt: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    heads: int | None = None,
) -> Loaded:
    """The tokenizer, transformer and recipe of LlamaGen's release files.

    Args:
        vq_ckpt: ``vq_ds16_c2i.pt`` (or ``vq_ds8_c2i.pt``).
        gpt_ckpt: ``c2i_{B,L,XL,XXL,3B}_{256,384}.pt``; None reads the tokenizer alone
            (``Loaded.model`` is then None).
        image_size: the images the GPT was trained on; None reads it from the GPT's file
            name (256 for the tokenizer alone).
        heads: attention heads, for a GPT of a size outside the release's.

    Raises:
        CheckpointError: a missing, truncated, wrong or mismatched file, naming it and
            the keys.
    """
    vq_state = read_state_dict(vq_ckpt, "LlamaGen VQ checkpoint")
    what = describe_release(vq_state)
    if what is not None and "LlamaGen's VQ" not in what:
        raise CheckpointError(f"--vq {vq_ckpt} is not LlamaGen's VQ tokenizer: it looks like {what}")
    gpt_state = None
    if gpt_ckpt is not None:
        gpt_state = _strip(read_state_dict(gpt_ckpt, "LlamaGen GPT checkpoint"))
        what = describe_release(gpt_state)
        if what is not None and "LlamaGen GPT" not in what:
            raise CheckpointError(f"--gpt {gpt_ckpt} is not a LlamaGen GPT: it looks like {what}")
        if image_size is None:
            image_size = image_size_of(gpt_ckpt)
            if image_size is None and "freqs_cis" in gpt_state:
                image_size = 16 * round((gpt_state["freqs_cis"].shape[0] - 1) ** 0.5)
        if image_size is None:
            raise CheckpointError(
                f"the image size of {gpt_ckpt} is not in its name (c2i_B_256.pt) and no weight records it; "
                "give it (--image-size 256 or 384)"
            )
    tokenizer = registry().get("tokenizer", "vq").from_release(vq_state, image_size=image_size or 256)
    name = Path(gpt_ckpt).stem if gpt_ckpt is not None else Path(vq_ckpt).stem
    if gpt_state is None:
        recipe = recipe_mod.from_dict(
            llamagen_recipe(tokenizer.config, None, size=None, out_dir=f"runs/{name}"), source=str(vq_ckpt)
        )
        return Loaded(tokenizer=tokenizer, model=None, recipe=recipe, source=Path(vq_ckpt))
    model_config = llamagen_model_config(gpt_state, heads=heads)
    size = SIZES.get((model_config.depth, model_config.width), (None,))[0]
    recipe = recipe_mod.from_dict(
        llamagen_recipe(tokenizer.config, model_config, size=size, out_dir=f"runs/{name}"),
        source=str(gpt_ckpt),
    )
    model = build_model(recipe, tokenizer, empty=True)  # the weights come from the file
    rotary = model.unit.rotary_tables(model_config.head_dim)
    converted = convert_llamagen_gpt(gpt_state, model_config, rotary=rotary)
    if converted["word_embed.weight"].shape[0] != tokenizer.vocab_size:
        raise CheckpointError(
            f"the GPT {gpt_ckpt} predicts {converted['word_embed.weight'].shape[0]} codes but the VQ "
            f"{vq_ckpt} has {tokenizer.vocab_size}; give the VQ it was trained with"
        )
    check_state_dict(model, converted, what=f"LlamaGen GPT {gpt_ckpt}")
    model.load_state_dict(converted, strict=True, assign=True)
    model.attention = model.attention  # the mask's buffers were prepared on the meta device: again, here
    log.info(
        "LlamaGen GPT-%s (%d px) with %.1fM parameters",
        size or f"{model_config.depth}x{model_config.width}",
        image_size,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return Loaded(tokenizer=tokenizer, model=model.eval(), recipe=recipe, source=Path(gpt_ckpt))


def release_card(vq_ckpt: str | os.PathLike, gpt_ckpt: str | os.PathLike | None, loaded: Loaded) -> ModelCard:
    """The model card of a converted LlamaGen release."""
    files = Path(vq_ckpt).name + (f" + {Path(gpt_ckpt).name}" if gpt_ckpt else "")
    conversion = (
        f"`varkit import llamagen` from {files}: read with torch.load(weights_only=True); VQ keys renamed "
        "(conv_blocks to down/up, separate q/k/v convs stacked), GPT keys renamed and each head's query and "
        "key rows reordered from interleaved to half-split rotary pairs; every key consumed."
    )
    if gpt_ckpt is None:
        size = loaded.recipe.tokenizer.config.image_size
        known = Path(vq_ckpt).name in ("vq_ds16_c2i.pt", "vq_ds8_c2i.pt")
        return ModelCard(
            title=f"LlamaGen VQ tokenizer ({Path(vq_ckpt).stem})",
            summary=f"LlamaGen's VQ tokenizer as varkit's `vq` plugin, set for {size} px images.",
            license="mit",
            source=f"{SOURCE}/resolve/main/{Path(vq_ckpt).name}" if known else str(vq_ckpt),
            conversion=conversion,
            paper=PAPER,
            tags=("llamagen",),
        )
    stem = Path(gpt_ckpt).stem
    config = loaded.model.config
    size = SIZES.get((config.depth, config.width), (None,))[0]
    name = f"LlamaGen-{size}" if size else f"LlamaGen GPT (depth {config.depth}, width {config.width})"
    image = loaded.recipe.tokenizer.config.image_size
    grid = image // loaded.tokenizer.downsample
    metrics = {}
    if stem in RELEASES:
        params, fid, cfg = RELEASES[stem]
        metrics[f"FID-50k, ImageNet 256×256 (cfg {cfg}, top-k 0, top-p 1)"] = f"{fid} (LlamaGen README)"
        metrics["parameters (LlamaGen README)"] = params
    released = stem in RELEASES
    return ModelCard(
        title=f"{name} ({image}×{image}, class-conditional)",
        summary=(
            f"LlamaGen's class-conditional GPT{'-' + size if size else ''}: raster next-token prediction over a "
            f"{grid}×{grid} VQ code map, conditioned by a class token; {config.num_classes} classes"
            + (" (ImageNet)." if config.num_classes == 1000 else ".")
        ),
        license="mit",
        source=f"{SOURCE}/resolve/main/{Path(gpt_ckpt).name}" if released else str(gpt_ckpt),
        conversion=conversion,
        metrics=metrics,
        paper=PAPER,
        tags=("llamagen", "imagenet") if config.num_classes == 1000 else ("llamagen",),
    )


def import_release(
    vq_ckpt: str | os.PathLike,
    gpt_ckpt: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    heads: int | None = None,
) -> Path:
    """Write LlamaGen's release files as a pretrained directory (``varkit import llamagen``)."""
    loaded = read_release(vq_ckpt, gpt_ckpt, image_size=image_size, heads=heads)
    return save_pretrained(loaded, out, card=release_card(vq_ckpt, gpt_ckpt, loaded))
