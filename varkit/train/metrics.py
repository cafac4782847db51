"""Metrics of a run: ``metrics.jsonl`` (one JSON object a line), TensorBoard optional.

Every record has ``stage`` (``ar`` or ``tokenizer``) and ``step``; the rest depends on
the record (training window, samples, end of run). Non-finite numbers are written as
``null`` so that every line is standard JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from varkit.checkpoint import write_text_atomic

log = logging.getLogger(__name__)

#: Dense bf16/fp16 tensor-core peak FLOP/s by GPU name, for MFU (spec-sheet values).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The peak FLOP/s of ``device`` when it is a GPU varkit knows, else None.

    ``VARKIT_PEAK_FLOPS`` (a number) overrides the table on any device, for GPUs missing
    from it (or a CPU whose peak you know).
    """
    override = os.environ.get("VARKIT_PEAK_FLOPS")
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to ``path`` (and TensorBoard) on the main process; a no-op elsewhere.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on ranks other than 0.
        tensorboard_dir: write TensorBoard events there too (needs ``tensorboard``).
        resume_step: records of steps after this one are dropped first: they belong to
            a run that was interrupted before its next checkpoint and will be redone.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard_dir: str | os.PathLike | None = None,
        resume_step: int | None = None,
    ):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._truncate(resume_step)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning(
                    "train.tensorboard is set but tensorboard is not installed (pip install tensorboard)"
                )
            else:
                self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold ``step``)."""
        if not self.enabled:
            return
        record = {key: _plain(value) for key, value in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("stage", "")
            for key, value in record.items():
                if (
                    key not in ("step", "stage")
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
