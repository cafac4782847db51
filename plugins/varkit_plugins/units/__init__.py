"""Built-in prediction units: ``scale`` (VAR next-scale), ``token`` (raster) and ``patch``.

Each unit module registers its class through the ``varkit`` entry-point group:
``scale.py`` (one scale of a code pyramid per step), ``token.py`` and ``patch.py``
(settings of `varkit_plugins.units.cells.CellUnit`, raster order over k×k cells
of one code map). ``embeddings.py`` holds what they share: VAR's embedding
initialisation and 2-D rotary angles.
"""
