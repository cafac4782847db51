"""Tiny checkpoints, image sets and an Inception of random weights for the evaluation tests."""

from __future__ import annotations

import copy
import os
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

from varkit import recipe as recipe_mod
from varkit.build import build_model, build_tokenizer
from varkit.checkpoint import save_checkpoint

#: A recipe of a few thousand parameters on 16-px images (msvq, scale unit, 4 classes).
TINY_RECIPE: dict[str, Any] = {
    "seed": 0,
    "tokenizer": {
        "name": "msvq",
        "image_size": 16,
        "ch": 16,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "norm_groups": 8,
        "level_attention": False,
        "mid_attention": False,
        "vocab_size": 64,
        "code_dim": 8,
        "schedule": "1,2,4",
    },
    "unit": {"name": "scale"},
    "sampler": {"name": "topk_topp", "cfg": 1.5, "top_k": 16, "top_p": 0.9},
    "model": {"depth": 1, "width": 32, "heads": 2, "num_classes": 4},
    "data": {
        "source": "synthetic",
        "resolution": 16,
        "num_classes": 4,
        "workers": 0,
        "shuffle_buffer": 8,
        "synthetic": {"num_classes": 4, "images_per_class": 8, "val_images_per_class": 2},
    },
    "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "precision": "fp32", "log_every": 1},
}


def tiny_recipe_dict(out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(TINY_RECIPE)
    data["out_dir"] = str(out_dir)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def tiny_checkpoint(root: Path, *, seed: int = 0, **sections: dict[str, Any]) -> Path:
    """A run directory with one checkpoint of random weights (no training)."""
    data = tiny_recipe_dict(root, **sections)
    recipe = recipe_mod.from_dict(data)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    save_checkpoint(
        root / "checkpoints",
        1,
        weights={"model": model.state_dict(), "tokenizer": tokenizer.state_dict()},
        trainer_state={"step": 1},
        recipe=recipe.to_dict(),
    )
    return root


# ------------------------------------------------------------------------ torch-fidelity


def install_torchvision_stand_in() -> bool:
    """Put a minimal ``torchvision`` into ``sys.modules`` when the real one cannot be imported.

    A test-environment shim, not part of varkit: torch-fidelity's package ``__init__``
    imports torchvision for its other feature extractors (CLIP, DINOv2, VGG and the
    dataset wrappers), and PyPI's torchvision wheels do not load beside the CPU build
    of torch the tests run on. The Inception network that varkit uses needs torch
    alone; the stand-in only lets the package import so that its real Inception code
    runs. Returns True when the stand-in was installed.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        return False
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    root = types.ModuleType("torchvision")
    for sub in ("datasets", "models", "transforms", "transforms.functional"):
        sys.modules[f"torchvision.{sub}"] = types.ModuleType(f"torchvision.{sub}")
    root.datasets = sys.modules["torchvision.datasets"]
    root.models = sys.modules["torchvision.models"]
    root.transforms = sys.modules["torchvision.transforms"]
    root.transforms.functional = sys.modules["torchvision.transforms.functional"]
    for dataset in ("CIFAR10", "CIFAR100", "STL10"):  # base classes of torch-fidelity's dataset wrappers
        setattr(root.datasets, dataset, type(dataset, (), {}))
    sys.modules["torchvision"] = root
    return True


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception architecture with random weights, saved as its weights file.

    Convolutions get He-normal weights (so activations neither vanish nor explode
    through the 94 layers) and BatchNorm keeps unit statistics: features differ between
    images, which the FID tests need, though they mean nothing.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.01)
            torch.nn.init.zeros_(module.bias)
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------------ image sets


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` smooth random uint8 images ``(n, size, size, 3)`` (blobs, not noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BICUBIC)) for c in coarse]
    )


def write_npz(path: Path, images: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, arr_0=images, **extra)
    return path


def write_folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:04d}.png")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a varkit subprocess: one thread (the same arithmetic in every
    process), this checkout importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env
