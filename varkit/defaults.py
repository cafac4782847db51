"""Built-in defaults, in one table: the plugin names varkit falls back on.

Nothing else in the engine spells a built-in plugin's name; recipes, loaders and the
Python API read these.
"""

from __future__ import annotations

#: The plugin a recipe gets when it leaves the section out.
DEFAULT_PLUGINS: dict[str, str] = {"attention": "auto", "sampler": "topk_topp"}

#: The sampler of VAR's "more smooth" mode (``generate(..., more_smooth=True)``).
SMOOTH_SAMPLER = "gumbel"

#: The sampler and options behind the official VAR release's reported FIDs.
OFFICIAL_VAR_SAMPLER: dict[str, object] = {"name": "topk_topp", "cfg": 1.5, "top_k": 900, "top_p": 0.96}
