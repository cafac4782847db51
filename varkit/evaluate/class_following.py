"""Class-following of generated images: the share that a classifier assigns to the
class each image was generated for.

Only data sources that come with a classifier can say this without a pretrained
network; the synthetic set has an analytic one (:func:`varkit.data.synthetic.classify`).
"""

from __future__ import annotations

import torch

from varkit.data.config import DataConfig
from varkit.data.synthetic import classify


def class_following(images: torch.Tensor, labels: torch.Tensor, data: DataConfig) -> dict[str, float] | None:
    """``{"sample_class_accuracy", "sample_colour_accuracy"}`` of images ``(b, 3, H, W)``
    in [0, 1] generated for ``labels`` ``(b,)``, or None when ``data``'s source has no
    classifier.

    Colour alone says whether the class conditioning took; colour and shape together
    also need a tokenizer sharp enough to draw the shape.
    """
    if data.source != "synthetic":
        return None
    images, labels = images.float().cpu(), labels.cpu()
    return {
        "sample_class_accuracy": (classify(images) == labels).float().mean().item(),
        "sample_colour_accuracy": (classify(images, use_shape=False) == labels).float().mean().item(),
    }
