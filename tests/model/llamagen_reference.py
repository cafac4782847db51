"""Run the official LlamaGen code (unchanged, from ../shared/reference) and save what it computes.

A script, run in its own process by the LlamaGen tests so that the official modules
(its ``utils`` package, its process-wide torch settings) never meet varkit's. Two modes:

``python llamagen_reference.py parity OUT``
    Builds a small VQ (the official Encoder/Decoder at width 32) and a small GPT (the
    official Transformer: dim 64, 2 layers, 4 heads) with random weights, writes them in
    the release's file layout (``{"model": state_dict, "args": Namespace, ...}``) as
    ``OUT/vq.pt`` and ``OUT/gpt.pt``, and saves the official results to
    ``OUT/results.pt``: codes and decoded images of random images, teacher-forced
    logits, greedy generations (with and without guidance, with a guidance interval) and
    a seeded sampled generation.

``python llamagen_reference.py shapes OUT.json``
    Every key and shape of the released class-conditional GPTs (B, L, XL, XXL, 3B) and
    of VQ-16, built on the meta device (no memory), as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "LlamaGen-official"
sys.path.insert(0, str(REFERENCE))

from autoregressive.models.generate import generate  # noqa: E402
from autoregressive.models.gpt import GPT_models, ModelArgs, Transformer  # noqa: E402
from tokenizer.tokenizer_image import vq_model  # noqa: E402

#: The small models of the parity check.
VOCAB, CODE_DIM, Z, CH, CLASSES = 64, 8, 64, 32, 10
#: The GPT's image size (a 4×4 code grid) and the VQ check's (2×2 codes: the decoder is the slow part).
IMAGE, VQ_IMAGE = 64, 32
DIM, LAYERS, HEADS = 64, 2, 4


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Move every parameter off its init (a zero head or unit norms would hide the arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std * (1 + p.abs().mean()))


def small_vq() -> torch.nn.Module:
    with torch.device("meta"):
        vq = vq_model.VQModel(
            vq_model.ModelArgs(codebook_size=VOCAB, codebook_embed_dim=CODE_DIM, z_channels=Z)
        )
    mult = [1, 1, 2, 2, 4]
    vq.encoder = vq_model.Encoder(ch=CH, ch_mult=mult, z_channels=Z)
    vq.decoder = vq_model.Decoder(ch=CH, ch_mult=mult, z_channels=Z)
    vq.quantize = vq_model.VectorQuantizer(VOCAB, CODE_DIM, 0.25, 0.0, True, True)
    vq.quant_conv = torch.nn.Conv2d(Z, CODE_DIM, 1)
    vq.post_quant_conv = torch.nn.Conv2d(CODE_DIM, Z, 1)
    perturb(vq, 1)
    return vq.eval()


def small_gpt(grid: int) -> Transformer:
    gpt = Transformer(
        ModelArgs(
            dim=DIM,
            n_layer=LAYERS,
            n_head=HEADS,
            vocab_size=VOCAB,
            block_size=grid * grid,
            num_classes=CLASSES,
            cls_token_num=1,
            token_dropout_p=0.0,
            resid_dropout_p=0.0,
            ffn_dropout_p=0.0,
        )
    )
    perturb(gpt, 2, std=0.1)
    return gpt


def parity(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(note="training arguments stored beside the weights, as the release does")
    vq = small_vq()
    grid = IMAGE // 16
    gpt = small_gpt(grid)
    torch.save({"model": vq.state_dict(), "args": args}, out / "vq.pt")
    torch.save({"model": gpt.state_dict(), "optimizer": {}, "steps": 0, "args": args}, out / "gpt.pt")

    results = {}
    with torch.no_grad():
        images = torch.rand(3, 3, VQ_IMAGE, VQ_IMAGE, generator=torch.Generator().manual_seed(3)) * 2 - 1
        _, _, info = vq.encode(images)
        side = VQ_IMAGE // 16
        codes = info[2].view(3, side, side)
        shape = [3, CODE_DIM, side, side]
        results |= {"images": images, "codes": codes, "decoded": vq.decode_code(codes.flatten(), shape)}

        # Teacher forcing as in train_c2i.py: the class and tokens 0..L-2 in, logits of 0..L-1 out.
        # The official forward only runs teacher forcing in train mode; dropouts are 0 and the
        # label drop is switched off so that the outputs are deterministic.
        gen = torch.Generator().manual_seed(4)
        idx = torch.randint(0, VOCAB, (4, grid * grid), generator=gen)
        labels = torch.tensor([0, 3, 9, CLASSES])
        gpt.cls_embedding.dropout_prob = 0.0
        gpt.train()
        logits, _ = gpt(idx=idx[:, :-1], cond_idx=labels)
        results |= {"tf_idx": idx, "tf_labels": labels, "tf_logits": logits}
        gpt.eval()

        cond = torch.tensor([1, 5, 7])
        results["gen_labels"] = cond
        greedy = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, "sample_logits": False}
        results["greedy_cfg1"] = generate(gpt, cond, grid * grid, cfg_scale=1.0, **greedy)
        results["greedy_cfg4"] = generate(gpt, cond, grid * grid, cfg_scale=4.0, **greedy)
        results["greedy_cfg4_interval5"] = generate(
            gpt, cond, grid * grid, cfg_scale=4.0, cfg_interval=5, **greedy
        )
        torch.manual_seed(11)
        results["sampled"] = generate(
            gpt, cond, grid * grid, cfg_scale=2.0, top_k=16, top_p=0.9, temperature=1.3, sample_logits=True
        )
    torch.save(results, out / "results.pt")


def shapes(out: Path) -> None:
    # The official constructor reads its drop-path rates with .item(), which meta tensors
    # refuse: in this process alone, those few numbers are computed on the CPU.
    linspace = torch.linspace
    torch.linspace = lambda *args, **kwargs: linspace(*args, **{**kwargs, "device": "cpu"})
    found = {}
    with torch.device("meta"):
        for name in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"):
            model = GPT_models[name](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1)
            found[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
        vq = vq_model.VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
        found["VQ-16"] = {k: list(v.shape) for k, v in vq.state_dict().items()}
    lines = []
    for name, keys in found.items():
        rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        lines.append(f"  {json.dumps(name)}: {{\n{rows}\n  }}")
    out.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    {"parity": parity, "shapes": shapes}[mode](target)
