"""The plugin contract of varkit: one hook per plugin kind.

A plugin package exposes a module through the ``varkit`` entry-point group::

    # pyproject.toml of the plugin package
    [project.entry-points.varkit]
    minp = "varkit_minp"

and in that module implements one or more of the hooks below with the
`varkit.hookimpl` marker. Each hook is handed a ``register`` callback; call it
once per class you provide::

    import varkit

    class MinP(varkit.Sampler):
        name = "min_p"
        ...

    @varkit.hookimpl
    def varkit_register_samplers(register):
        register(MinP)

Hooks are always called with keyword arguments, so an implementation may accept
fewer arguments than its spec, and arguments added to a spec later never break a
plugin. Registering must be cheap: no weights, no optional heavy imports (check those
in the class's ``available()`` instead).

The host validates each registration at once: the class must derive from the kind's
base class (`varkit.Tokenizer`, `varkit.PredictionUnit`,
`varkit.AttentionBackend`, `varkit.Sampler`, `varkit.Strategy`), have a ``name`` matching
``[a-z][a-z0-9_]*`` and an attrs ``Config`` class, and not reuse a name that another
plugin registered.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

#: The pluggy project name and the entry-point group of varkit plugins.
PROJECT = "varkit"

hookspec = pluggy.HookspecMarker(PROJECT)
#: The marker plugin authors put on their hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def varkit_register_tokenizers(register: Register) -> None:
    """Register tokenizer classes (subclasses of `varkit.Tokenizer`).

    Example::

        @varkit.hookimpl
        def varkit_register_tokenizers(register):
            register(MultiScaleVQ)
    """


@hookspec
def varkit_register_prediction_units(register: Register) -> None:
    """Register prediction unit classes (subclasses of `varkit.PredictionUnit`).

    Example::

        @varkit.hookimpl
        def varkit_register_prediction_units(register):
            register(NextScale)
    """


@hookspec
def varkit_register_attention_backends(register: Register) -> None:
    """Register attention backend classes (subclasses of `varkit.AttentionBackend`).

    Example::

        @varkit.hookimpl
        def varkit_register_attention_backends(register):
            register(SDPA)
    """


@hookspec
def varkit_register_samplers(register: Register) -> None:
    """Register sampler classes (subclasses of `varkit.Sampler`).

    Example::

        @varkit.hookimpl
        def varkit_register_samplers(register):
            register(TopKTopP)
    """


@hookspec
def varkit_register_strategies(register: Register) -> None:
    """Register generation strategy classes (subclasses of `varkit.Strategy`).

    Example::

        @varkit.hookimpl
        def varkit_register_strategies(register):
            register(Jacobi)
    """
