"""varkit's scale-unit editing gives the official notebook's tokens, on the same checkpoint.

``helpers/official_edit.py`` runs in its own process: it builds the official VQ-VAE and
VAR (random weights, saved in the release's file format), encodes an image and runs
the notebook's ``autoregressive_infer_cfg_with_mask`` as written, greedy (top-k 1) with
guidance, for an inpainting and an outpainting box. varkit loads the same two files
with ``from_official_var`` and edits the same image with the notebook's own masks.

The suite runs a depth-2 model (the arithmetic does not depend on the depth); the
release's d16 shape is one variable away (a few minutes on a CPU)::

    VARKIT_OFFICIAL_EDIT_DEPTH=16 .venv/bin/python -m pytest tests/test_editing_official.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import varkit
from varkit.generation import edit_codes
from varkit.generation.loop import decode_images
from varkit_plugins.samplers import TopKTopP

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "VAR-official"
HELPER = Path(__file__).parent / "helpers" / "official_edit.py"
DEPTH = int(os.environ.get("VARKIT_OFFICIAL_EDIT_DEPTH", "2"))

pytestmark = pytest.mark.skipif(
    not (REFERENCE / "zero_shot_edit_notebook.py").is_file(),
    reason=f"the official VAR code is not at {REFERENCE} (a clone has no ../shared/reference)",
)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    out = tmp_path_factory.mktemp("official-edit")
    proc = subprocess.run(
        [
            sys.executable,
            str(HELPER),
            "--reference",
            str(REFERENCE),
            "--out",
            str(out),
            "--depth",
            str(DEPTH),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr
    pipe = varkit.from_official_var(out / "vae.pth", out / "var.pth")
    assert pipe.model.config.depth == DEPTH
    return pipe, torch.load(out / "official.pt", weights_only=True)


@pytest.mark.parametrize("case", ["inpaint", "outpaint"])
def test_greedy_edit_gives_the_notebooks_tokens(official, case):
    pipe, ref = official
    image = ref["image"]
    with torch.no_grad():
        known = pipe.tokenizer.encode(image * 2 - 1)
    assert all(torch.equal(k.flatten(1), t) for k, t in zip(known, ref["tokens"], strict=True))

    expected = ref["cases"][case]
    labels = torch.tensor([expected["label"]])
    sampler = TopKTopP(TopKTopP.Config(cfg=ref["cfg"], guidance="linear", top_k=1, top_p=0.0))
    edited = edit_codes(
        pipe.model,
        pipe.tokenizer,
        sampler,
        image,
        1.0 - expected["keep"],  # the notebook's keep mask on the 16×16 grid; varkit's mask regenerates
        labels,
        generator=torch.Generator().manual_seed(0),
    )
    for scale, (ours, theirs) in enumerate(zip(edited.codes, expected["effective"], strict=True)):
        assert torch.equal(ours.flatten(1), theirs), f"scale {scale} differs"
    # Both kept and regenerated positions occur, at several scales.
    assert edited.keep.any() and not edited.keep.all()
    with torch.no_grad():
        images = decode_images(pipe.tokenizer, edited.f_hat)
    torch.testing.assert_close(images, expected["images"], rtol=0, atol=1e-4)
