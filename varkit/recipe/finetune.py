"""The ``init:`` section of a recipe: start the AR stage from pretrained weights.

``init.weights`` names a pretrained model (a directory written by
``save_pretrained`` or ``varkit import``, a run or checkpoint directory, or a Hugging
Face Hub repository id). Training then starts from its transformer (and its tokenizer,
unless ``tokenizer.weights`` names another) with a fresh optimizer, lr schedule and
step count: a fine-tuning run, not a resume. A run that stops and is started again
resumes from its own checkpoints, never from ``init.weights`` again.
"""

from __future__ import annotations

import attrs


def _patterns(instance, attribute, value) -> None:
    bad = [p for p in value if not p or not p.strip()]
    if bad:
        raise ValueError(
            "freeze holds an empty pattern; give parameter names or globs such as blocks.0 or blocks.*"
        )


@attrs.frozen(kw_only=True)
class InitConfig:
    """Fine-tuning options: which weights to start from and what to keep fixed.

    Classes: the new model's class rows start from the pretrained model's by name when
    both know their class names (``classes.json``), else by index; a class it does not
    have starts from its "no class" row. ``class_map`` then sets rows explicitly.
    """

    #: Pretrained model to start from: a pretrained directory, a run or checkpoint
    #: directory, or a hub repository id; null trains from scratch.
    weights: str | None = None
    #: With a run or checkpoint directory: take its EMA weights when it has them.
    ema: bool = True
    #: New class -> pretrained class whose rows it starts from, each by name or index,
    #: e.g. ``{tabby: "tabby cat", 12: 281}``; applied after the rule above.
    class_map: dict[str | int, str | int] | None = None
    #: Transformer parameters kept at their pretrained values: dotted prefixes
    #: (``blocks.0``, ``unit``, ``word_embed``) or globs over parameter names
    #: (``blocks.[0-7].*``). The tokenizer is always frozen.
    freeze: tuple[str, ...] = attrs.field(default=(), validator=_patterns)

    def __attrs_post_init__(self) -> None:
        if self.weights is None and (self.class_map or self.freeze):
            raise ValueError(
                "class_map and freeze need init.weights: name the pretrained model to start from"
            )
