"""The plugin manager and the registries it fills: adapters, mask generators, losses.

Plugins are modules exposed through the ``kdinpaint`` entry-point group; the built-in adapters use the same
group (``pyproject.toml``); kdinpaint registers its own objective, ``eq11`` (the paper's Eq. 11,
:class:`kdinpaint.train.objective.Eq11Objective`), through the same ``register_losses`` hook. Nothing is imported
until first use (:func:`load_plugins`, called by every registry function). Entry points load one at a
time: a plugin that fails to import (an exception, or ``sys.exit()`` at import), fails validation, or whose hook
raises is logged and recorded with its distribution name (:func:`plugin_failures`) and the others still load. Environment:

- ``KDINPAINT_STRICT_PLUGINS=1`` (or ``strict=True``): any such failure raises :class:`PluginError` (CI).
- ``KDINPAINT_LOAD_PLUGINS=dist-a,dist-b``: load only these third-party distributions (or entry-point
  names); empty = none. The ``kdinpaint`` distribution's own entry points always load.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from kdinpaint import hookspecs
from kdinpaint.adapter import Adapter
from kdinpaint.spec import AdapterSpec, SpecLike, load_spec
from kdinpaint.hookspecs import hookimpl
from kdinpaint.train import objective
from kdinpaint.train.objective import Eq11Objective, TrainingObjective, is_training_objective

__all__ = ["pm", "hookimpl", "PluginError", "Failure", "load_plugins", "plugin_failures", "list_adapters",
           "get_adapter", "list_mask_generators", "get_mask_generator", "list_losses", "get_loss",
           "resolve_objective", "resolve_spec", "import_target", "adapter_from_target"]

log = logging.getLogger(__name__)
GROUP, HOME = "kdinpaint", "kdinpaint"
LOAD_ENV, STRICT_ENV = "KDINPAINT_LOAD_PLUGINS", "KDINPAINT_STRICT_PLUGINS"

pm = pluggy.PluginManager("kdinpaint")
pm.add_hookspecs(hookspecs)


class PluginError(RuntimeError):
    """A plugin failed (import, validation, a hook that raised, a duplicate name) and strict mode is on."""


@dataclass(frozen=True)
class Failure:
    """One plugin problem: which distribution (and version) and entry point, and what went wrong."""

    distribution: str
    version: str | None
    plugin: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {_who(self.distribution, self.version)}: {self.error}"


@dataclass(frozen=True)
class _Entry:
    name: str
    value: Any
    distribution: str
    version: str | None


_providers: dict[str, tuple[str, str | None]] = {}  # pluggy plugin name -> (distribution, version)
_failures: list[Failure] = []
_state = {"loaded": False}
_cache: dict[str, tuple[tuple, dict[str, list[_Entry]], list[Failure]]] = {}


def _who(dist: str, version: str | None) -> str:
    return f"{dist} {version}" if version else dist


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _strict(strict: bool | None) -> bool:
    return strict if strict is not None else os.environ.get(STRICT_ENV, "").lower() in ("1", "true", "yes", "on")


def _raise_if_strict(failures: list[Failure], strict: bool | None) -> None:
    if failures and _strict(strict):
        raise PluginError("; ".join(map(str, failures)) + f" (strict mode: unset {STRICT_ENV} to continue)")


def _what_failed(e: BaseException) -> str:
    """A plugin's exception in a Failure's words; ``sys.exit()`` (``SystemExit``) said for what it is, since
    uncaught it would end the program quietly, with its exit status."""
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r}): the plugin called sys.exit() or exit() while loading; it must not end the program"
    return f"{type(e).__name__}: {e}"


def _providers_of(entries: list[_Entry]) -> str:
    return " and ".join(_who(e.distribution, e.version) for e in entries)


def load_plugins(*, strict: bool | None = None, reload: bool = False) -> list[Failure]:
    """Load every ``kdinpaint`` entry point once (``reload``: unload them and load again); returns the failures."""
    if reload:
        for name in list(_providers):
            if pm.has_plugin(name):
                pm.unregister(name=name)
        _providers.clear(), _failures.clear(), _cache.clear()
        _state["loaded"] = False
    if not _state["loaded"]:
        _state["loaded"] = True
        _register_builtins()
        env = os.environ.get(LOAD_ENV)
        wanted = None if env is None else {_norm(s.strip()) for s in env.split(",") if s.strip()}
        for ep in metadata.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "(unknown distribution)"
            version = ep.dist.version if ep.dist is not None else None
            if wanted is not None and _norm(dist) != HOME and not {_norm(dist), _norm(ep.name)} & wanted:
                continue
            name = f"{dist}:{ep.name}"
            try:
                pm.register(ep.load(), name=name)
                try:
                    pm.check_pending()  # a hookimpl whose name matches no hook (a typo) is an error
                except pluggy.PluginValidationError:
                    pm.unregister(name=name)
                    raise
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - one broken plugin must not break the others, nor end the program
                _failures.append(Failure(dist, version, ep.name, _what_failed(e)))
                log.warning("kdinpaint %s", _failures[-1])
                continue
            _providers[name] = (dist, version)
    _raise_if_strict(_failures, strict)
    return list(_failures)


def _register_builtins() -> None:
    """kdinpaint's own registrations outside the adapters: the ``eq11`` objective (:mod:`kdinpaint.objective`)."""
    name = f"{HOME}:objective"
    if not pm.has_plugin(name):
        pm.register(objective, name=name)
    try:
        version = metadata.version(HOME)
    except metadata.PackageNotFoundError:
        version = None
    _providers[name] = (HOME, version)


def plugin_failures(*, strict: bool | None = None) -> list[Failure]:
    """Load failures plus the failures of every registry built so far (hooks that raised, duplicates)."""
    load_plugins(strict=strict)
    return _failures + [f for _, _, fails in _cache.values() for f in fails]


def _registry(hook: str, strict: bool | None) -> dict[str, list[_Entry]]:
    """Call ``hook`` of every plugin, one at a time, with a ``register`` callback that records the provider."""
    load_plugins(strict=strict)
    key = tuple((name, id(plugin)) for name, plugin in pm.list_name_plugin())
    if hook not in _cache or _cache[hook][0] != key:
        entries: dict[str, list[_Entry]] = {}
        failures: list[Failure] = []
        for impl in getattr(pm.hook, hook).get_hookimpls():
            dist, version = _providers.get(impl.plugin_name, (impl.plugin_name, None))
            got: list[_Entry] = []

            def register(name: Any, value: Any = None, dist: str = dist, version: str | None = version, got=got) -> None:
                if hook == "register_adapters":
                    if not isinstance(name, Adapter):
                        raise TypeError(f"register() takes a kdinpaint.adapter.Adapter, got {type(name).__name__}")
                    name, value = name.name, name
                    value.distribution, value.version = dist, version  # provenance, for listings
                elif not isinstance(name, str) or not name or not callable(value):
                    raise TypeError(f"register(name, fn) takes a non-empty name and a callable, got {name!r}, {value!r}")
                got.append(_Entry(name, value, dist, version))

            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - sys.exit() in a hook too
                failures.append(Failure(dist, version, impl.plugin_name, f"{hook} raised {_what_failed(e)}"))
                log.warning("kdinpaint %s", failures[-1])
                continue
            for entry in got:
                entries.setdefault(entry.name, []).append(entry)
        for name, found in entries.items():
            if len(found) > 1:
                failures.append(Failure(found[-1].distribution, found[-1].version, hook,
                                        f"duplicate name {name!r} registered by {_providers_of(found)}"))
        _cache[hook] = (key, entries, failures)
    _raise_if_strict(_cache[hook][2], strict)
    return _cache[hook][1]


def _get(hook: str, what: str, name: str, strict: bool | None) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a string, got {type(name).__name__}")
    entries = _registry(hook, strict)
    found = entries.get(name)
    if not found:
        known = sorted(entries)
        close = difflib.get_close_matches(name, known, n=3)
        failed = [str(f) for f in plugin_failures()]
        raise ValueError(
            f"unknown {what} {name!r}" + (f" (did you mean {close}?)" if close else "")
            + f"; known {what}s: {known}" + (f"; plugins that failed to load: {failed}" if failed else "")
        )
    if len(found) > 1:
        raise ValueError(f"{what} name {name!r} is registered twice, by {_providers_of(found)}; uninstall one of them")
    return found[0]


def list_adapters(*, strict: bool | None = None) -> list[Adapter]:
    """Every registered adapter, sorted by name; ``adapter.distribution`` / ``.version`` name its provider."""
    entries = _registry("register_adapters", strict)
    return [e.value for name in sorted(entries) for e in entries[name]]


def get_adapter(name: str, *, strict: bool | None = None) -> Adapter:
    """The adapter registered as ``name`` (variants are chosen in the spec: ``load_spec("name:variant")``)."""
    if isinstance(name, str) and ":" in name:
        raise ValueError(f"get_adapter({name!r}): pass the bare name; choose a variant with load_spec({name!r})")
    return _get("register_adapters", "adapter", name, strict).value


def list_mask_generators(*, strict: bool | None = None) -> dict[str, Callable]:
    """Registered mask-generator factories by name."""
    return {n: found[0].value for n, found in sorted(_registry("register_mask_generators", strict).items())}


def get_mask_generator(name: str, *, strict: bool | None = None) -> Callable:
    return _get("register_mask_generators", "mask generator", name, strict).value


def list_losses(*, strict: bool | None = None) -> dict[str, Callable]:
    """Registered loss functions by name."""
    return {n: found[0].value for n, found in sorted(_registry("register_losses", strict).items())}


def get_loss(name: str, *, strict: bool | None = None) -> Callable:
    return _get("register_losses", "loss", name, strict).value


def resolve_objective(name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[type[TrainingObjective], dict]:
    """The objective class a recipe's ``losses.objective`` names (a registered loss) and its keyword arguments.

    ``eq11`` (the default) is :class:`Eq11Objective`, whose options are the recipe's other ``losses`` keys;
    an adapter's registered TrainingObjective class (e.g. ``edgeconnect-gan``) brings its own losses and
    discriminators and takes ``kwargs`` (``losses.objective_kwargs``); a registered loss *function* (e.g.
    ``edgeconnect``) replaces R_recon and R_style inside Eq. (11): ``(Eq11Objective, {"loss": fn})``.
    """
    registered = get_loss(name)
    if is_training_objective(registered):
        return registered, dict(kwargs or {})
    if kwargs:
        raise ValueError(
            f"losses.objective_kwargs is set, but losses.objective {name!r} is a loss function, not an "
            "objective class: remove objective_kwargs"
        )
    return Eq11Objective, {"loss": registered}


def resolve_spec(spec: SpecLike) -> AdapterSpec:
    """:func:`kdinpaint.spec.load_spec`, and also a registered adapter's name ``name[:variant]``: its spec."""
    if isinstance(spec, str) and not spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
        name, _, variant = spec.partition(":")
        return get_adapter(name).spec.variant(variant or None)
    return load_spec(spec)


def import_target(target: str) -> Any:
    """The object ``"package.module:attr"`` names (``attr`` may be dotted); a module in the current folder is found
    as ``python -c`` finds it. A ``ValueError`` names a malformed target, the module or the missing attribute."""
    import importlib
    import sys

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r} must look like 'package.module:Class' (an import path and a name)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{target!r}: module {module_name!r} cannot be imported ({e}); install it or run from its folder") from None
    except SystemExit as e:  # uncaught, it would end the program quietly with the module's exit status
        raise ValueError(f"{target!r}: importing module {module_name!r} called sys.exit({e.code!r}); a module that names "
                         "a network must not end the program when imported (guard its script part with "
                         "if __name__ == '__main__':)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{target!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def adapter_from_target(target: str, spec: SpecLike, stride: int = 1) -> Adapter:
    """An :class:`Adapter` for your own network named by import path, without a plugin: ``build_student`` is the
    class (or factory) ``target`` names, the teacher a fresh instance of it, ``spec`` its spec (a mapping, an
    ``AdapterSpec`` or a YAML file)."""
    factory = import_target(target)
    if not callable(factory):
        raise ValueError(f"{target!r} is a {type(factory).__name__}, not a class or function that builds a network")
    spec = load_spec(spec)
    return Adapter(name=target.replace(":", "."), spec=spec, build_student=factory, stride=stride,
                   description=f"{target} (by import path)")
