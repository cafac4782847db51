"""``token``: raster next-token prediction over a single code map (LlamaGen style).

One code per step in raster order over the final ``hK×wK`` map; the class embedding
plus ``pos_start`` is a one-position prefix that predicts the first code, so the
sequence has ``l = hK·wK`` positions, step lengths ``(1, 1, ..., 1)`` and a plain
causal mask. Position ``s > 0`` is fed the embedding of code ``s - 1``.

Needs a single-scale tokenizer: a multi-scale one's last map holds only the residual
left by the coarser scales, so predicting it alone would not describe an image.

LlamaGen's GPT is this unit with ``position: rope2d``, ``rope_anchor: input``,
``inputs: codes`` and ``start_embedding: false`` (see ``varkit import llamagen``).
"""

from __future__ import annotations

from varkit.hookspecs import hookimpl
from varkit_plugins.units.cells import CellConfig, CellUnit


class NextToken(CellUnit):
    """Raster next-token prediction: the patch unit with 1×1 cells.

    Options (``unit:`` section of a recipe): ``position`` (``learned`` or ``rope2d``),
    ``rope_base``, ``rope_anchor``, ``inputs`` and ``start_embedding``.
    """

    name = "token"
    Config = CellConfig

    @classmethod
    def cell_size(cls, config) -> int:
        return 1


@hookimpl
def varkit_register_prediction_units(register):
    register(NextToken)
