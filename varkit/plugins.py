"""The plugin registry: entry points in, validated plugin classes by kind and name out.

Built-in plugins and third-party ones arrive the same way, through the ``varkit``
entry-point group. Each hook implementation is called on its own with a ``register``
callback bound to its plugin, so every class is attributed to the distribution that
registered it. A distribution whose import or registration fails (an exception, an
invalid class, a name another distribution already has) is recorded as broken, named,
and skipped; the others keep working. varkit's own distribution loads first, so a
third-party plugin that reuses a built-in name never displaces the built-in.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import attrs
import pluggy

from varkit import hookspecs
from varkit.base import AttentionBackend, PluginBase, PredictionUnit, Sampler, Strategy, Tokenizer
from varkit.config_types import field_types, is_recipe_field, unsupported
from varkit.errors import PluginError, did_you_mean

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")


@attrs.frozen
class Kind:
    """One plugin kind: its recipe key, its words for humans, its hook and base class."""

    key: str
    title: str
    hook: str
    base: type
    plural: str = ""

    @property
    def titles(self) -> str:
        """The title in the plural."""
        return self.plural or f"{self.title}s"


KINDS: dict[str, Kind] = {
    kind.key: kind
    for kind in (
        Kind("tokenizer", "tokenizer", "varkit_register_tokenizers", Tokenizer),
        Kind("unit", "prediction unit", "varkit_register_prediction_units", PredictionUnit),
        Kind("attention", "attention backend", "varkit_register_attention_backends", AttentionBackend),
        Kind("sampler", "sampler", "varkit_register_samplers", Sampler),
        Kind("strategy", "strategy", "varkit_register_strategies", Strategy, plural="strategies"),
    )
}


@attrs.frozen
class Entry:
    """A registered plugin class and where it came from."""

    kind: str
    name: str
    cls: type
    distribution: str

    def available(self) -> tuple[bool, str]:
        try:
            ok, why = self.cls.available()
        except Exception as exc:  # a plugin's own check must not take the listing down
            return False, f"its available() check failed: {exc!r}"
        return bool(ok), str(why)


@attrs.frozen
class Broken:
    """A plugin distribution that failed to import or to register."""

    distribution: str
    source: str
    error: str


class Registry:
    """Plugin classes by kind and name.

    Args:
        load_entry_points: load every distribution of the ``varkit`` entry-point group.
            Tests pass False and register modules by hand for a registry of their own.
    """

    def __init__(self, *, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, dict[str, Entry]] = {key: {} for key in KINDS}
        self.broken: list[Broken] = []
        self._distribution: dict[str, str] = {}
        if load_entry_points:
            self._load_entry_points()

    # -- loading ---------------------------------------------------------------
    def _load_entry_points(self) -> None:
        points = importlib.metadata.entry_points(group=hookspecs.PROJECT)
        # the built-ins first: a name clash then always blames the newcomer
        for ep in sorted(points, key=lambda ep: _distribution_name(ep) != OWN_DISTRIBUTION):
            dist = _distribution_name(ep)
            source = f"entry point {ep.name!r} = {ep.value!r}"
            if self.pm.get_plugin(ep.name) is not None:
                continue  # the same distribution found twice on sys.path
            try:
                module = ep.load()
            except Exception as exc:
                log.warning("plugin distribution %r failed to import: %r", dist, exc)
                self.broken.append(Broken(dist, source, f"import failed: {exc!r}"))
                continue
            try:
                self.add(module, name=ep.name, distribution=dist)
            except PluginError as exc:
                log.warning("plugin distribution %r was not registered: %s", dist, exc)
                self.broken.append(Broken(dist, source, f"registration refused: {exc}"))

    def add(self, plugin: object, *, name: str | None = None, distribution: str = "<local>") -> None:
        """Register the hook implementations of ``plugin`` (a module or an object).

        Raises:
            PluginError: ``plugin`` implements a hook that does not exist (a misspelled
                hook name), or registers an invalid or duplicate class.
        """
        plugin_name = self.pm.register(plugin, name=name)
        if plugin_name is None:
            return
        self._distribution[plugin_name] = distribution
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(
                f"plugin {plugin_name!r} from distribution {distribution!r} implements an "
                f"unknown hook: {exc}. The hooks are: {', '.join(k.hook for k in KINDS.values())}."
            ) from None
        added: list[Entry] = []
        try:
            for kind in KINDS.values():
                for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                    if impl.plugin_name != plugin_name:
                        continue
                    register = self._register_callback(kind, distribution, added)
                    kwargs = {"register": register}
                    impl.function(**{arg: kwargs[arg] for arg in impl.argnames if arg in kwargs})
        except PluginError:
            self._rollback(plugin, added)
            raise
        except Exception as exc:
            self._rollback(plugin, added)
            log.warning("plugin distribution %r failed to register: %r", distribution, exc)
            self.broken.append(
                Broken(distribution, f"plugin {plugin_name!r}", f"registration failed: {exc!r}")
            )

    def _rollback(self, plugin: object, added: list[Entry]) -> None:
        for entry in added:
            self.entries[entry.kind].pop(entry.name, None)
        self.pm.unregister(plugin)

    def _register_callback(self, kind: Kind, distribution: str, added: list[Entry]):
        def register(cls: type) -> None:
            entry = self._validate(kind, cls, distribution)
            self.entries[kind.key][entry.name] = entry
            added.append(entry)

        register.__doc__ = f"Register a {kind.title} class (subclass of varkit.{kind.base.__name__})."
        return register

    def _validate(self, kind: Kind, cls: Any, distribution: str) -> Entry:
        what = f"{distribution!r} registered {cls!r} as a {kind.title}"
        if not isinstance(cls, type) or not issubclass(cls, kind.base):
            raise PluginError(f"{what}, but it is not a subclass of varkit.{kind.base.__name__}.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PluginError(
                f"{what} with name {name!r}; a plugin's class attribute `name` must match "
                f"[a-z][a-z0-9_]* (lower case, digits, underscores)."
            )
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and attrs.has(config)):
            raise PluginError(f"{what}, but its `Config` is not an attrs class.")
        self._check_config(what, config)
        existing = self.entries[kind.key].get(name)
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"{kind.title} name {name!r} is registered twice: by {existing.distribution!r} "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by "
                f"{distribution!r} ({cls.__module__}.{cls.__qualname__}). Rename one of them."
            )
        return Entry(kind.key, name, cls, distribution)

    @staticmethod
    def _check_config(what: str, config: type) -> None:
        """Every recipe field of ``config`` must have a type the recipe loader can fill."""
        try:
            types = field_types(config)
        except Exception as exc:  # an annotation naming something that does not exist
            raise PluginError(
                f"{what}, but the annotations of its Config cannot be resolved: {exc!r}."
            ) from None
        for field in attrs.fields(config):
            if not is_recipe_field(field):
                continue
            why = unsupported(types[field.name])
            if why is not None:
                raise PluginError(
                    f"{what}, but its Config field {field.name!r} cannot come from a recipe: {why}."
                )

    # -- lookup ----------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def entry(self, kind: str, name: str) -> Entry:
        """The entry of ``name``; raises PluginError naming what exists when unknown."""
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; the kinds are {', '.join(KINDS)}")
        entries = self.entries[kind]
        if name not in entries:
            title = KINDS[kind].title
            names = ", ".join(sorted(entries)) or "none"
            broken = ""
            if self.broken:
                broken = (
                    " Broken plugin distributions: "
                    + ", ".join(f"{b.distribution} ({b.error})" for b in self.broken)
                    + "."
                )
            raise PluginError(
                f"unknown {title} {name!r}{did_you_mean(name, entries)}. "
                f"The {KINDS[kind].titles} registered are: {names}. `varkit plugins` lists them all.{broken}"
            )
        return entries[name]

    def get(self, kind: str, name: str, *, require_available: bool = True) -> type:
        """The class registered as ``name`` of ``kind``.

        Raises:
            PluginError: the name is unknown, or the plugin is unavailable here (with why).
        """
        entry = self.entry(kind, name)
        if require_available:
            ok, why = entry.available()
            if not ok:
                raise PluginError(
                    f"{KINDS[kind].title} {name!r} is not available on this machine: {why}. "
                    f"Choose another with `{kind}.name=...` (`varkit plugins` shows what is available)."
                )
        return entry.cls

    def __iter__(self) -> Iterator[Entry]:
        for kind in KINDS:
            for name in sorted(self.entries[kind]):
                yield self.entries[kind][name]


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else ep.value


#: The distribution whose entry points are the built-in plugins.
OWN_DISTRIBUTION = "varkit"

_lock = threading.Lock()
_default: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Registry()
        return _default


def reset() -> None:
    """Forget the process-wide registry (the next ``registry()`` loads again)."""
    global _default
    with _lock:
        _default = None


def plugin_config(cls: type[PluginBase], options: dict[str, Any]):
    """Build ``cls.Config`` from recipe options (raises TypeError/ValueError as attrs does)."""
    return cls.Config(**options)
