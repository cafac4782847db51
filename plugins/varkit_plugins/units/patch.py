"""``patch``: next-cell prediction (NPP / xAR cell granularity) over a single code map.

The final ``hK×wK`` code map is cut into ``k×k`` cells taken in raster order (codes in
raster order inside a cell). Each step predicts the ``k²`` codes of one cell in
parallel: step 0 from the class embedding plus ``pos_start`` ``(1, k², d)``, step
``s > 0`` from the embeddings of cell ``s - 1``'s codes, position for position. The
mask is block-causal over ``(k², k², ...)``: a cell sees itself and the cells before.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

from varkit.hookspecs import hookimpl
from varkit_plugins.units.cells import CellConfig, CellUnit


@attrs.frozen(kw_only=True)
class PatchConfig(CellConfig):
    """Options of the ``patch`` unit."""

    #: Cell side: each step predicts k×k codes. Must divide both sides of the code
    #: grid; 2 and 4 are the usual choices (k = 1 is the ``token`` unit).
    k: int = attrs.field(default=2, validator=[v.instance_of(int), v.ge(1)])


class NextPatch(CellUnit):
    """Next-cell prediction: one ``k×k`` cell of codes per step.

    Options (``unit:`` section of a recipe): ``k``, ``position`` (``learned`` or
    ``rope2d``), ``rope_base``, ``rope_anchor``, ``inputs`` and ``start_embedding``.
    """

    name = "patch"
    Config = PatchConfig

    @classmethod
    def cell_size(cls, config) -> int:
        return config.k


@hookimpl
def varkit_register_prediction_units(register):
    register(NextPatch)
