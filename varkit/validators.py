"""attrs validators shared by every recipe section (``None`` passes: an unset option).

A failing value raises ``ValueError`` naming the field; recipe validation reports it
with the key path.
"""

from __future__ import annotations


def positive(_instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} is {value}; it must be > 0")


def non_negative(_instance, attribute, value) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} is {value}; it must be >= 0")


def fraction(_instance, attribute, value) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} is {value}; it must lie in [0, 1]")


def probability(_instance, attribute, value) -> None:
    """A drop rate: in [0, 1), since dropping everything leaves nothing to train."""
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} is {value}; it must lie in [0, 1)")
