"""The hooks a kdinpaint plugin can implement (pluggy project ``"kdinpaint"``).

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`, exposed through the
``kdinpaint`` entry-point group of its distribution::

    # pyproject.toml of the plugin
    [project.entry-points.kdinpaint]
    my_net = "my_package.kdinpaint_plugin"

    # my_package/kdinpaint_plugin.py
    from kdinpaint.hookspecs import hookimpl

    @hookimpl
    def register_adapters(register):
        register(Adapter(name="my-net", spec={...}, build_student=MyNet))

Every hook takes a ``register`` callback (the llm pattern): kdinpaint records which distribution supplied
each entry, validates it and rejects duplicate names, instead of merging lists returned by the hooks.
The built-in adapters are registered through these same hooks and the same entry-point group.
"""

from __future__ import annotations

from typing import Callable

import pluggy

__all__ = ["hookimpl", "hookspec", "register_adapters", "register_mask_generators", "register_losses"]

hookspec = pluggy.HookspecMarker("kdinpaint")
hookimpl = pluggy.HookimplMarker("kdinpaint")


@hookspec
def register_adapters(register: Callable) -> None:
    """Register networks: call ``register(adapter)`` once per :class:`kdinpaint.adapter.Adapter`.

    The adapter's ``name`` is its registry key (``kdinpaint.get_adapter(name)``,
    ``attach(..., spec="name:variant")``); it must be unique across every installed plugin.
    """


@hookspec
def register_mask_generators(register: Callable) -> None:
    """Register mask generators: call ``register(name, factory)``.

    ``factory(**kwargs)`` returns a mask source as in :mod:`kdinpaint.data.generators`: an object with
    ``sample(rng: numpy.random.Generator, size: (H, W)) -> bool array (H, W)``, ``True`` = hole, whose
    randomness comes only from ``rng`` (e.g. ``register("free-form", FreeFormMasks)``).
    """


@hookspec
def register_losses(register: Callable) -> None:
    """Register loss functions: call ``register(name, fn)``.

    ``fn`` is a pure function of tensors returning a scalar tensor (its docstring opens with its equation);
    recipes refer to it by ``name`` and apply the weight themselves.
    """
