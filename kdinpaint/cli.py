"""The ``kdinpaint`` command line: one argparse subparser per subcommand, each a small function.

    kdinpaint adapters [--json]                 installed adapters: name, variants, provider, description
    kdinpaint spec show NAME[:VARIANT]          an adapter's spec as YAML
    kdinpaint spec suggest NAME[:VARIANT]       a draft spec traced from a registered adapter's student
    kdinpaint spec suggest --model pkg.mod:fn   ... or from any model built by ``fn()``

Other subcommands plug in with :func:`add_command` (``name``, help, a function adding arguments, a function
``(args) -> exit code``). A plugin that fails to load is reported by ``adapters`` and never stops the CLI;
``--strict-plugins`` (or ``KDINPAINT_STRICT_PLUGINS=1``) makes it an error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Callable, Sequence

import torch

__all__ = ["main", "build_parser", "add_command"]

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def add_command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None], run: Handler) -> None:
    """Register a subcommand (call at import time of the module defining it, before :func:`main`)."""
    if any(name == n for n, *_ in _COMMANDS):
        raise ValueError(f"kdinpaint subcommand {name!r} is already defined")
    _COMMANDS.append((name, help, arguments, run))


def _strict(args: argparse.Namespace) -> bool | None:
    return True if args.strict_plugins else None


# ---- kdinpaint adapters -------------------------------------------------------------------------
def _adapters_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON: {adapters: [...], failures: [...]}")


def cmd_adapters(args: argparse.Namespace) -> int:
    from kdinpaint.plugins import list_adapters, plugin_failures

    adapters = list_adapters(strict=_strict(args))
    failures = plugin_failures(strict=_strict(args))
    rows = [
        {
            "name": a.name,
            "variants": a.variants,
            "distribution": getattr(a, "distribution", None),
            "version": getattr(a, "version", None),
            "description": a.description or a.spec.description,
        }
        for a in adapters
    ]
    if args.json:
        fails = [{"distribution": f.distribution, "version": f.version, "plugin": f.plugin, "error": f.error} for f in failures]
        print(json.dumps({"adapters": rows, "failures": fails}, indent=2))
        return 0
    table = [("NAME", "VARIANTS", "FROM", "DESCRIPTION")] + [
        (r["name"], ",".join(r["variants"]) or "-", f"{r['distribution']} {r['version'] or ''}".strip(), r["description"])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    if not rows:
        print("(no adapters registered)")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 0


# ---- kdinpaint spec show / suggest --------------------------------------------------------------
def _spec_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="spec_command", metavar="{show,suggest}", required=True)
    show = sub.add_parser("show", help="print a registered adapter's spec (a variant applied) as YAML")
    show.add_argument("name", help="adapter name, optionally with a variant: NAME[:VARIANT]")
    show.set_defaults(run=cmd_spec_show)
    sug = sub.add_parser("suggest", help="trace one forward and print a draft spec as YAML")
    sug.add_argument("name", nargs="?", help="a registered adapter (its student is traced): NAME[:VARIANT]")
    sug.add_argument("--model", help="instead: a model factory 'package.module:callable' called with no arguments")
    sug.add_argument("--shape", default=None, help="probe image shape B,C,H,W (default: the adapter's probe_shape or 1,3,64,64)")
    sug.add_argument("--image-arg", default=None, help="parameter name or position of the image (default: first argument)")
    sug.add_argument("--mask-arg", default=None, help="parameter name or position of the mask (default: second argument)")
    sug.add_argument("--min-reduction", type=int, default=2, help="keep levels at least this much smaller than the input")
    sug.set_defaults(run=cmd_spec_suggest)


def cmd_spec_show(args: argparse.Namespace) -> int:
    from kdinpaint.plugins import get_adapter

    name, _, variant = args.name.partition(":")
    adapter = get_adapter(name, strict=_strict(args))
    spec = adapter.spec.variant(variant or None)
    print(f"# adapter {adapter.name} from {getattr(adapter, 'distribution', '?')} {getattr(adapter, 'version', '') or ''}".rstrip())
    print(spec.to_yaml(), end="")
    return 0


def _arg(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def _load_factory(target: str) -> torch.nn.Module:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {target!r} must look like 'package.module:callable'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


def cmd_spec_suggest(args: argparse.Namespace) -> int:
    from kdinpaint.calling import CallConvention
    from kdinpaint.suggest import analyse

    if (args.name is None) == (args.model is None):
        raise ValueError("spec suggest needs exactly one of NAME[:VARIANT] or --model package.module:callable")
    image_arg, mask_arg, hand = _arg(args.image_arg), _arg(args.mask_arg), None
    shape = [1, 3, 64, 64]
    if args.name is not None:
        from kdinpaint.plugins import get_adapter

        name, _, variant = args.name.partition(":")
        adapter = get_adapter(name, strict=_strict(args))
        hand = adapter.spec.variant(variant or None)
        model = adapter.student(variant or None)
        shape = list(hand.probe_shape)
        image_arg = hand.image_arg if image_arg is None else image_arg
        mask_arg = hand.mask_arg if mask_arg is None else mask_arg
    else:
        model = _load_factory(args.model)
    if args.shape:
        try:
            shape = [int(s) for s in args.shape.split(",")]
        except ValueError:
            shape = []
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"--shape {args.shape!r} must be four positive ints B,C,H,W")
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    image = torch.rand(B, C, H, W, generator=g) * 2 - 1
    mask = torch.zeros(B, 1, H, W)
    mask[..., H // 4 : H // 2, W // 4 : W // 2] = 1
    call_args, call_kwargs = CallConvention(model, 0 if image_arg is None else image_arg,
                                            1 if mask_arg is None else mask_arg).build(image, mask)
    example = call_kwargs if call_kwargs and not call_args else call_args
    if call_args and call_kwargs:
        raise ValueError("spec suggest builds calls by position or by keyword, not both; give --image-arg and --mask-arg alike")
    result = analyse(model, example, image_arg=image_arg, mask_arg=mask_arg, min_reduction=args.min_reduction,
                     name=args.name or args.model)
    print(f"# draft spec traced from {type(model).__name__} on a {tuple(shape)} input; review before use")
    for level, size in zip(result.spec.encoder_levels, result.level_sizes):
        print(f"# level {level}: {size[0]}x{size[1]}")
    if hand is not None:
        print(f"# hand-written encoder_levels: {hand.encoder_levels}")
    for note in result.notes:
        print(f"# note: {note}")
    print(result.spec.to_yaml(), end="")
    return 0


# ---- entry point --------------------------------------------------------------------------------
add_command("adapters", "list installed adapters (name, variants, provider, description)", _adapters_arguments, cmd_adapters)
add_command("spec", "show or suggest adapter specs", _spec_arguments, lambda args: 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdinpaint", description="Distillation-guided image inpainting toolkit.")
    parser.add_argument("--strict-plugins", action="store_true", help="fail on any broken plugin (also KDINPAINT_STRICT_PLUGINS=1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log plugin loading and other details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, arguments, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        if p.get_default("run") is None:
            p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    from kdinpaint.plugins import PluginError

    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, PluginError, ImportError, AttributeError) as e:
        print(f"kdinpaint {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
