"""The Inception network of FID, IS and precision/recall: torch-fidelity's ``inception-v3-compat``.

This is the TensorFlow Inception graph of 2015-12-05 that the TTUR FID code and ADM's
evaluator run, converted to PyTorch by torch-fidelity, including TensorFlow 1.x's
bilinear resize to 299×299 (other resizes move FID by whole points). It needs the
optional extra ``pip install 'varkit[eval]'``.

varkit never downloads the weights: they come from torch-fidelity's own cache
(``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default, where
torch-fidelity puts them on first use) or from a file given explicitly. A missing
file is an error that names it, where it comes from and where to put it.

Features per image:

- ``pool``: the 2048 pool features (``pool_3``): FID and precision/recall.
- ``logits``: the 1008 class logits without bias (ADM's ``softmax/logits/MatMul``): IS.
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (torch-fidelity's
  ``Mixed_6d.branch1x1``) at 17×17, in height-width-channel order, 2023 numbers:
  ADM's sFID.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varkit.errors import CheckpointError, EvaluationError
from varkit.weights import read_state_dict

log = logging.getLogger(__name__)

#: The network's name in torch-fidelity's registry.
NETWORK = "inception-v3-compat"
#: The file torch-fidelity downloads (its ``URL_INCEPTION_V3``), named here so that the
#: error can say what to fetch even when torch-fidelity is missing.
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
#: ADM's sFID layer keeps this many channels of ``mixed_6/conv``.
SPATIAL_CHANNELS = 7


def _extractor_module():
    """torch-fidelity's Inception module, or an error that says what to install."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "torch_fidelity":
            raise EvaluationError(
                "FID, IS and precision/recall need torch-fidelity's Inception network, which is not "
                "installed; install the evaluation extra: pip install 'varkit[eval]'"
            ) from None
        raise EvaluationError(_import_failure(exc)) from None
    except Exception as exc:  # a broken dependency may fail with anything, e.g. RuntimeError
        raise EvaluationError(_import_failure(exc)) from None
    return module


def _import_failure(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    torchvision = getattr(exc, "name", None) == "torchvision" or any(
        "torchvision" in Path(f.filename).parts for f in frames
    )
    if torchvision:
        return (
            "torch-fidelity is installed but cannot be imported because torchvision fails to import "
            f"({type(exc).__name__}: {exc}); torch-fidelity's package imports torchvision for its other "
            "networks. Install the torchvision build that matches this torch "
            f"({torch.__version__}), e.g. from the same index as torch, then run again"
        )
    return f"torch-fidelity cannot be imported ({type(exc).__name__}: {exc}); reinstall it: pip install 'varkit[eval]'"


def weights_name(url: str = WEIGHTS_URL) -> str:
    return url.rsplit("/", 1)[-1]


def default_weights_path(url: str = WEIGHTS_URL) -> Path:
    """Where torch-fidelity keeps the weights: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights_name(url)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(path: str | os.PathLike | None = None, *, url: str = WEIGHTS_URL) -> Path:
    """The weights file to load: ``path``, else torch-fidelity's cached copy of ``url``.

    Raises:
        EvaluationError: the file is not there, with what it is, where it comes from and
            where it goes.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EvaluationError(
                f"--inception-weights {path} does not exist; give the file {weights_name(url)} (from {url})"
            )
        return path
    cached = default_weights_path(url)
    if not cached.is_file():
        raise EvaluationError(
            f"the Inception weights are not in torch-fidelity's cache: {cached} does not exist. varkit does "
            f"not download them; fetch {weights_name(url)} (the TensorFlow FID Inception converted by "
            f"torch-fidelity) from {url} and put it at {cached} (the folder follows $TORCH_HOME), or pass "
            "--inception-weights FILE"
        )
    return cached


class Inception:
    """torch-fidelity's FID Inception on one device, from uint8 pixels to float features.

    Args:
        weights: the weights file; None takes torch-fidelity's cached copy.
        device: where the network runs.
        batch_size: images per forward pass.

    Raises:
        EvaluationError: torch-fidelity cannot be imported, or the weights are missing
            or do not fit the network.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ):
        module = _extractor_module()
        self.url = getattr(module, "URL_INCEPTION_V3", WEIGHTS_URL)
        path = resolve_weights(weights, url=self.url)
        # torch-fidelity reads the file with weights_only=False; reading it safely first
        # refuses a file that would run code while unpickling.
        try:
            state = read_state_dict(path, "Inception weights")
        except CheckpointError as exc:
            raise EvaluationError(str(exc)) from None
        del state
        try:
            net = module.FeatureExtractorInceptionV3(
                NETWORK, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as exc:  # load_state_dict: missing or unexpected keys
            raise EvaluationError(
                f"{path} does not fit torch-fidelity's {NETWORK} network ({str(exc).splitlines()[0]}); give "
                f"the file {weights_name(self.url)} from {self.url}"
            ) from None
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = path
        self.sha256 = _sha256(path)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, _module, _inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @property
    def published(self) -> bool:
        """Whether the file's digest starts with the prefix in the published file's name
        (torch.hub names cached files by the first hex digits of their sha256)."""
        match = re.search(r"-([a-f0-9]{6,})\.", weights_name(self.url))
        return bool(match) and self.sha256.startswith(match.group(1))

    def describe(self) -> dict[str, Any]:
        """What scored the images, for ``metrics.json``."""
        try:
            version = importlib.metadata.version("torch-fidelity")
        except importlib.metadata.PackageNotFoundError:  # importable from a source tree
            version = None
        return {
            "network": f"torch-fidelity {NETWORK}",
            "torch_fidelity": version,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "published_weights": self.published,
        }

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray, *, spatial: bool = False) -> dict[str, np.ndarray]:
        """Features of uint8 images ``(n, H, W, 3)``: ``pool`` ``(n, 2048)``, ``logits``
        ``(n, 1008)`` and, with ``spatial``, ``spatial`` ``(n, 2023)`` (float32)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise EvaluationError(f"expected uint8 images (n, H, W, 3), got {pixels.dtype} {pixels.shape}")
        out: dict[str, list[np.ndarray]] = {"pool": [], "logits": [], "spatial": []}
        for start in range(0, len(pixels), self.batch_size):
            x = torch.from_numpy(np.array(pixels[start : start + self.batch_size]))  # a writable copy
            x = x.to(self.device).permute(0, 3, 1, 2)  # (b, 3, H, W) uint8
            with _no_tf32(self.device):
                pool, logits = self.net(x)
            out["pool"].append(pool.float().cpu().numpy())
            out["logits"].append(logits.float().cpu().numpy())
            if spatial:
                # (b, 192, 17, 17) -> channels last, ADM's first 7 channels, flattened h, w, c
                maps = self._spatial.permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS]
                out["spatial"].append(maps.reshape(maps.shape[0], -1).float().cpu().numpy())
            self._spatial = None
        return {k: np.concatenate(v) for k, v in out.items() if v}


def _no_tf32(device: torch.device):
    """cuDNN convolutions in full float32 (PyTorch allows TF32 by default, which moves
    the features of an Ampere-or-later GPU away from the reference ones)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )
