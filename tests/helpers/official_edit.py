"""The official VAR zero-shot edit, run as the release runs it (a separate process).

Builds the official ``VQVAE`` and ``VAR`` (from ``--reference``, the unchanged
FoundationVision/VAR code) with random weights, saves them in the release's file
format, encodes a smooth random image and runs the notebook's own
``autoregressive_infer_cfg_with_mask`` (its source is read from
``zero_shot_edit_notebook.py`` and executed as written) for an inpainting and an
outpainting box with greedy sampling (top-k 1). Writes ``vae.pth``, ``var.pth`` and
``official.pt`` (the image, the notebook's keep masks, the sampled and effective
tokens of every scale and the returned images) into ``--out``.

It runs in its own process because the official code patches ``torch.nn`` in places
and reads its modules from its own folder.

    python tests/helpers/official_edit.py --reference ../shared/reference/VAR-official --out /tmp/edit --depth 2
"""

from __future__ import annotations

import argparse
import ast
import sys
import types
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

#: VAR's 256 px schedule: the official VQ-VAE always downsamples 16×.
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
NUM_CLASSES = 10
#: The notebook's box, as inpainting (regenerate inside) and as outpainting.
BOX = {"y0": 0.1, "x0": 0.1, "y1": 0.8, "x1": 0.8}
CFG = 3.0
#: Inpainting under "no class" (the notebook's inpainting label), outpainting under a class.
CASES = {"inpaint": (True, NUM_CLASSES), "outpaint": (False, 3)}


def notebook_functions(reference: Path, namespace: dict) -> dict:
    """The notebook's edit helpers, executed from its own source into ``namespace``."""
    source = (reference / "zero_shot_edit_notebook.py").read_text()
    wanted = {"get_edit_mask", "autoregressive_infer_cfg_with_mask", "replace_embedding"}
    tree = ast.parse(source)
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {d.name for d in defs} == wanted, "the notebook no longer defines its edit helpers"
    exec(compile(ast.Module(body=defs, type_ignores=[]), "zero_shot_edit_notebook.py", "exec"), namespace)
    return namespace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, str(args.reference))
    if "huggingface_hub" not in sys.modules:  # imported by models/var.py for a mixin only
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=object)
    from models.helpers import gumbel_softmax_with_rng, sample_with_top_k_top_p_
    from models.var import VAR, AdaLNSelfAttn
    from models.vqvae import VQVAE

    torch.manual_seed(args.seed)
    vae = VQVAE(vocab_size=args.vocab, z_channels=32, ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=PATCH_NUMS)  # fmt: skip
    var = VAR(
        vae_local=vae, num_classes=NUM_CLASSES, depth=args.depth, embed_dim=64 * args.depth,
        num_heads=args.depth, drop_path_rate=0.0, attn_l2_norm=True, patch_nums=PATCH_NUMS,
        flash_if_available=False, fused_if_available=False,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, param in var.named_parameters():
            if name.endswith("scale_mul_1H11"):  # some above ln 100: the cap acts
                param.copy_(torch.rand(param.shape, generator=g) * 5.0)
            else:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), args.out / "vae.pth")
    torch.save(var.state_dict(), args.out / "var.pth")

    coarse = torch.rand(1, 3, 8, 8, generator=g)
    image = F.interpolate(coarse, size=(256, 256), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.inference_mode():
        tokens = vae.img_to_idxBl(image * 2 - 1, PATCH_NUMS)  # [(b, pn²)]

    sampled: list[torch.Tensor] = []

    def recording_sampler(*a, **k):
        idx = sample_with_top_k_top_p_(*a, **k)  # (b, l, 1)
        sampled.append(idx[:, :, 0].clone())
        return idx

    namespace = notebook_functions(
        args.reference,
        {
            "torch": torch, "F": F, "List": list, "Optional": typing.Optional, "Union": typing.Union,
            "AdaLNSelfAttn": AdaLNSelfAttn, "sample_with_top_k_top_p_": recording_sampler,
            "gumbel_softmax_with_rng": gumbel_softmax_with_rng,
        },
    )  # fmt: skip
    results = {"image": image, "tokens": [t.clone() for t in tokens], "cases": {}}
    for case, (inpainting, label) in CASES.items():
        keep = namespace["get_edit_mask"](PATCH_NUMS, **BOX, device="cpu", inpainting=inpainting)  # (16, 16)
        sampled.clear()
        with torch.inference_mode():
            edited = namespace["autoregressive_infer_cfg_with_mask"](
                var, B=1, label_B=torch.tensor([label]), g_seed=0, cfg=CFG, top_k=1, top_p=0.0,
                more_smooth=False, input_img_tokens=tokens, edit_mask=keep,
            )  # fmt: skip
        effective = []
        for pn, tok, idx in zip(PATCH_NUMS, tokens, sampled, strict=True):
            kept = (
                namespace["replace_embedding"](
                    keep, torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn), pn, pn
                )
                .flatten(1)
                .bool()
            )  # the notebook's own per-scale decision, (b, pn²)
            effective.append(torch.where(kept, tok, idx))
        results["cases"][case] = {
            "keep": keep.clone(),
            "label": label,
            "sampled": [s.clone() for s in sampled],
            "effective": effective,
            "images": edited.clone(),
        }
    results["cfg"] = CFG
    torch.save(results, args.out / "official.pt")


if __name__ == "__main__":
    main()
