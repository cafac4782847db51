"""Class-following of generated images: the share that a classifier assigns to the
class each image was generated for.

Only data sources that come with a classifier can say this without a pretrained
network; the table of data sources says which (``DataSource.classifiers``: the
synthetic set has an analytic one, ``varkit.data.synthetic.classify``).
"""

from __future__ import annotations

import torch

from varkit.data.config import DataConfig, data_source


def class_following(images: torch.Tensor, labels: torch.Tensor, data: DataConfig) -> dict[str, float] | None:
    """``{"sample_<name>_accuracy"}`` for each classifier of ``data``'s source, of images
    ``(b, 3, H, W)`` in [0, 1] generated for ``labels`` ``(b,)``; None when the source
    has no classifier.

    For the synthetic set: ``sample_class_accuracy`` (colour and shape right, which
    also needs a tokenizer sharp enough to draw the shape) and
    ``sample_colour_accuracy`` (colour alone: whether the class conditioning took).
    """
    classifiers = data_source(data.source).classifiers
    if not classifiers:
        return None
    images, labels = images.float().cpu(), labels.cpu()
    return {
        f"sample_{name}_accuracy": (classify(images) == labels).float().mean().item()
        for name, classify in classifiers.items()
    }
