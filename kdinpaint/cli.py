"""The ``kdinpaint`` command line: one argparse subparser per subcommand, each a small function.

    kdinpaint adapters [--json]                 installed adapters: name, variants, provider, description
    kdinpaint spec show NAME[:VARIANT]          an adapter's spec as YAML
    kdinpaint spec suggest NAME[:VARIANT]       a draft spec traced from a registered adapter's student
    kdinpaint spec suggest --model pkg.mod:fn   ... or from any model built by ``fn()``
    kdinpaint evaluate MODEL [--images SRC] [--masks DIR | --mask-generator freeform|rect | --protocol NAME]
                                                the paper's Table 1 layout (PSNR / SSIM / mean L1 per hole-ratio bucket);
                                                for a network also the floor (weight-free baselines on the same
                                                images and masks, the gap to biharmonic): --floor M ..., --no-floor;
                                                LPIPS and FID when their weights are here (--[no-]perceptual)
    kdinpaint inpaint MODEL INPUT MASK OUTPUT   one image, or a folder (masks by file stem, or one mask for all)
    kdinpaint bench [--adapters NAME ...]       the paper's Table 2 layout (ms per image, parameters), each model's
                                                time relative to Net8 in the same run, peak memory;
                                                --size, --repeats, --device, --dtype, --compile
    kdinpaint export --checkpoint PATH OUT      the deployed model as torch.export (.pt2) or ONNX (.onnx)
    kdinpaint check-weights gatedconv FILE      which channel order DeepFill v2 weights expect (PSNR on the holes
                                                of the bundled photos in RGB and in BGR) and the setting to use
    kdinpaint serve [--checkpoint F]            a local page to brush a mask and see the fill (kdinpaint[serve])

MODEL is ``--checkpoint PATH`` (``--adapter NAME[:VARIANT]`` then checks what it is), ``--model PKG.MODULE:CLASS``
(your own network; ``--model-kwargs``, ``--spec``, ``--stride``) with ``--checkpoint`` an exported file or a plain
state dict, ``--adapter NAME --weights PATH`` (the official release), ``--adapter`` alone (random weights, for
smoke tests), or ``--baseline biharmonic|telea|ns|mean``. Running, padding and
compositing go through :class:`kdinpaint.inference.Inpainter`.

Other subcommands plug in with :func:`add_command` (``name``, help, a function adding arguments, a function
``(args) -> exit code``). A plugin that fails to load is reported by ``adapters`` and never stops the CLI;
``--strict-plugins`` (or ``KDINPAINT_STRICT_PLUGINS=1``) makes it an error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from kdinpaint import deploy
from kdinpaint.calling import convention
from kdinpaint.data import ImageFolder, MaskFolder, list_images, sample_images
from kdinpaint.data.masks import detect_hole_colour
from kdinpaint.data.protocols import PROTOCOLS, describe_protocol, protocol_masks
from kdinpaint.evaluation.baselines import BASELINES, BYTES_PER_PIXEL
from kdinpaint.evaluation.compare import paired_gap, paired_to_markdown, paired_verdict
from kdinpaint.evaluation.floor import (FLOOR_BATCH_SIZE, FLOOR_METHODS, evaluate_floor, floor_methods, floor_to_csv,
                                       floor_to_markdown)
from kdinpaint.evaluation.metrics import CONVENTIONS, to_csv, to_json, to_markdown
from kdinpaint.evaluation.perceptual import perceptual_report, perceptual_unavailable
from kdinpaint.export import as_completed, is_exported, load_checkpoint_adapter, load_network
from kdinpaint.inference import (
    GeneratedMasks,
    InferenceOutOfMemory,
    Inpainter,
    deployed_model,
    evaluate_model,
    load_image,
    load_mask,
    mask_to_rgb,
    resolve_device,
    save_image,
)
from kdinpaint.inference.memory import QUICK_SECONDS, available_bytes, gib, peak_bytes
from kdinpaint.inference.timing import median_seconds
from kdinpaint.plugins import PluginError, get_adapter, import_target, list_adapters, plugin_failures, resolve_spec
from kdinpaint.serve.command import cmd_serve, serve_arguments
from kdinpaint.suggest import analyse, example_call

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
    sug.add_argument("--input", choices=("separate", "concat", "concat_mask_first"), default=None,
                     help="how the model takes image and mask (default: the adapter's; for --model, concat when "
                          "its forward takes one tensor: torch.cat([image * (1 - mask), mask], 1))")
    sug.add_argument("--min-reduction", type=int, default=2, help="keep levels at least this much smaller than the input")
    sug.set_defaults(run=cmd_spec_suggest)


def cmd_spec_show(args: argparse.Namespace) -> int:
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
    if os.getcwd() not in sys.path and "" not in sys.path:  # a module in the current folder, as `python -c` finds it
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


def cmd_spec_suggest(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.model is None):
        raise ValueError("spec suggest needs exactly one of NAME[:VARIANT] or --model package.module:callable")
    image_arg, mask_arg, hand, conv = _arg(args.image_arg), _arg(args.mask_arg), None, args.input
    shape = [1, 3, 64, 64]
    if args.name is not None:
        name, _, variant = args.name.partition(":")
        adapter = get_adapter(name, strict=_strict(args))
        hand = adapter.spec.variant(variant or None)
        model = adapter.student(variant or None)
        shape = list(hand.probe_shape)
        image_arg = hand.image_arg if image_arg is None else image_arg
        mask_arg = hand.mask_arg if mask_arg is None else mask_arg
        conv = hand.input if conv is None else conv
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
    example, conv = example_call(model, image, mask, image_arg=image_arg, mask_arg=mask_arg, input=conv)
    result = analyse(model, example, image_arg=image_arg, mask_arg=mask_arg if conv == "separate" else None,
                     input=conv, min_reduction=args.min_reduction, name=args.name or args.model)
    print(f"# draft spec traced from {type(model).__name__} on a {tuple(shape)} input; review before use")
    for level, size in zip(result.spec.encoder_levels, result.level_sizes):
        print(f"# level {level}: {size[0]}x{size[1]}")
    if hand is not None:
        print(f"# hand-written encoder_levels: {hand.encoder_levels}")
    for note in result.notes:
        print(f"# note: {note}")
    print(result.spec.to_yaml(), end="")
    return 0


# ---- shared by evaluate / inpaint / bench ----------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (tqdm ships with accelerate's dependencies); a plain counter without it."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False)
    except ImportError:
        return _Counter(total, desc, enabled)


class _Counter:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            print(f"\r{self.desc}: {self.done}/{self.total}", end="" if self.done < self.total else "\n", file=sys.stderr)

    def close(self) -> None:
        pass


def _model_arguments(p: argparse.ArgumentParser, baseline: bool = True) -> None:
    g = p.add_argument_group("model (a checkpoint, an adapter, or a weight-free baseline)")
    g.add_argument("--checkpoint", help="a file written by kdinpaint.save_exported(..., adapter='name:variant')")
    g.add_argument("--adapter", help="NAME[:VARIANT]: with --checkpoint, the adapter it must belong to; "
                                     "alone, that adapter with RANDOM weights (smoke tests only)")
    if baseline:
        g.add_argument("--baseline", choices=sorted(BASELINES), help="a weight-free baseline (telea/ns need kdinpaint[cv])")
    _network_arguments(g)
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the first available of cuda, mps, cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (lower it when memory runs out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _network_arguments(g: Any) -> None:
    g.add_argument("--weights", metavar="PATH",
                   help="with --adapter NAME: its official weights, the released file or folder (see the README's "
                        "Weights), read by the adapter's own loader; nothing is downloaded")
    g.add_argument("--model", metavar="PKG.MODULE:CLASS",
                   help="your own network by import path, built with --model-kwargs; --checkpoint gives its weights "
                        "(a file of kdinpaint.save_exported or a plain state dict)")
    g.add_argument("--model-kwargs", metavar="YAML", default=None,
                   help="keyword arguments of --model (or of --adapter's builder) as YAML or JSON, e.g. '{width: 32}'")
    g.add_argument("--spec", default=None,
                   help="how --model is called (input, image_arg, mask_arg, output): a YAML file, a registered "
                        "adapter's name or inline YAML such as '{input: concat}' (default: model(image, mask)); a "
                        "file of save_exported brings its own")
    g.add_argument("--stride", type=int, default=None,
                   help="--model takes sizes that are multiples of this (e.g. 8 for three stride-2 levels; default: "
                        "the file's record, else 1)")


def _model_kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        kwargs = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--model-kwargs {text!r} is not YAML or JSON ({str(e).splitlines()[0]}); write e.g. '{{width: 32}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs {text!r} must be a mapping of keyword arguments, e.g. '{{width: 32}}'")
    return kwargs


def _cli_spec(text: str | None) -> Any:
    """``--spec``: inline YAML (``{...}``), else a YAML file or a registered adapter's name."""
    if text is None:
        return None
    if not text.lstrip().startswith("{"):
        return resolve_spec(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--spec {text!r} is not YAML ({str(e).splitlines()[0]}); write e.g. '{{input: concat}}' "
                         "or give a spec file") from None


def _recorded_stride(path: str) -> int:
    if not is_exported(path):
        return 1
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return int((f.metadata() or {}).get("kdinpaint.stride", "1"))


def _network(args: argparse.Namespace) -> tuple[Any, int, str] | None:
    """``--model`` (with or without ``--checkpoint``) or ``--adapter NAME --weights PATH``: the model to deploy, its
    stride and its name; ``None`` when neither is asked for."""
    model_arg, weights = getattr(args, "model", None), getattr(args, "weights", None)
    kwargs = _model_kwargs(getattr(args, "model_kwargs", None))
    if model_arg is None and weights is None:
        if args.spec or args.stride or (kwargs and not (args.adapter and not args.checkpoint)):
            raise ValueError("--model-kwargs, --spec and --stride go with --model PKG.MODULE:CLASS (--model-kwargs "
                             "also with --adapter NAME, alone or with --weights PATH)")
        return None
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be at least 1, got {args.stride}")
    if model_arg is not None:
        if args.adapter or weights:
            raise ValueError("--model names your own network: give its weights with --checkpoint PATH, without "
                             "--adapter / --weights (those are for a registered adapter's official weights)")
        factory = import_target(model_arg)
        try:
            network = factory(**kwargs)
        except TypeError as e:
            raise ValueError(f"--model {model_arg} could not be built with --model-kwargs {kwargs}: {e}") from None
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"--model {model_arg} built a {type(network).__name__}, not an nn.Module")
        spec = _cli_spec(args.spec)
        if args.checkpoint is None:
            print(f"WARNING: --model {model_arg} without --checkpoint runs RANDOM WEIGHTS: the output is noise. "
                  "Pass --checkpoint PATH (an exported file or a state dict) for a trained model.", file=sys.stderr)
            return as_completed(network, spec), args.stride or 1, f"{model_arg} (random weights)"
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
        if spec is not None and is_exported(args.checkpoint):
            print(f"note: {args.checkpoint} was exported with its spec, which is used; --spec is ignored", file=sys.stderr)
        try:
            model = load_network(args.checkpoint, network, spec)
        except ValueError as e:  # most often a network built otherwise than the trained one
            raise ValueError(f"{e} (--model {model_arg} was built with --model-kwargs {kwargs}: give the arguments it "
                             "was trained with)") from None
        return model, args.stride or _recorded_stride(args.checkpoint), f"{model_arg} ({Path(args.checkpoint).name})"
    if not args.adapter:
        raise ValueError("--weights PATH is an adapter's official weights: name the adapter, e.g. --adapter edgeconnect "
                         "(your own network: --model PKG.MODULE:CLASS --checkpoint PATH; LPIPS / FID backbone files: "
                         "--perceptual-weights DIR)")
    if args.checkpoint:
        raise ValueError("--weights and --checkpoint are both weights: --weights PATH for the official release, "
                         "--checkpoint PATH for a file kdinpaint exported")
    if args.spec or args.stride:
        raise ValueError(f"--spec and --stride go with --model; {args.adapter} has its own")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--weights {weights!r} does not exist (nothing is downloaded: see the README's Weights "
                                "for where the official files come from)")
    name, _, variant = args.adapter.partition(":")
    spec = get_adapter(name, strict=_strict(args)).spec.variant(variant or None)
    if spec.sites or any(site.fusion for site in spec.attention_sites):
        raise ValueError(f"--weights loads {name} as released, but {args.adapter} adds completion blocks that no "
                         f"official file holds: use --adapter {name}, or --checkpoint for a trained {args.adapter}")
    model, stride = deployed_model(args.adapter, {**kwargs, "pretrained": weights})
    return model, stride, f"{args.adapter} ({Path(weights).name})"


def _check_device(args: argparse.Namespace) -> None:
    """``--device`` checked even where the model ignores it (a baseline runs on the CPU): ``meta`` is refused."""
    if args.device is not None:
        resolve_device(args.device)


def _inpainter(args: argparse.Namespace) -> Any:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    baseline = getattr(args, "baseline", None)
    if baseline and (args.checkpoint or args.adapter or args.model or args.weights):
        raise ValueError("--baseline takes no --checkpoint, --adapter, --model or --weights: choose one model")
    if baseline:
        return Inpainter.from_baseline(baseline, batch_size=args.batch_size)
    network = _network(args)
    if network is not None:
        model, stride, name = network
        return Inpainter(model.eval(), stride=stride, spec=model.spec, device=resolve_device(args.device),
                         batch_size=args.batch_size, name=name)
    if args.checkpoint:
        return Inpainter.from_checkpoint(args.checkpoint, args.adapter, device=args.device, batch_size=args.batch_size)
    if args.adapter:
        print(f"WARNING: --adapter {args.adapter} without --checkpoint runs RANDOM WEIGHTS: the output is noise and "
              "any metric says nothing about the method. Pass --checkpoint PATH for a trained model.", file=sys.stderr)
        return Inpainter.from_adapter(args.adapter, device=args.device, batch_size=args.batch_size,
                                      builder_kwargs=_model_kwargs(args.model_kwargs))
    raise ValueError("choose a model: --checkpoint PATH, --model PKG.MODULE:CLASS --checkpoint PATH, --adapter NAME "
                     "--weights PATH (official weights), --adapter NAME[:VARIANT] alone or --baseline NAME")


# ---- kdinpaint evaluate -------------------------------------------------------------------------
def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--images", help="a folder of images or a .flist/.txt file list (default: the bundled sample photos)")
    p.add_argument("--count", type=int, default=None, help="number of images (default: 10 sample crops, or the whole folder)")
    p.add_argument("--size", type=int, default=256, help="images are centre-cropped and resized to SIZE x SIZE")
    p.add_argument("--masks", help="a folder of mask images (NVIDIA irregular masks or similar); mask i for image i, cycling")
    p.add_argument("--mask-hole", choices=("auto", "white", "black"), default="auto", help="which colour marks holes in --masks")
    p.add_argument("--mask-generator", choices=("freeform", "rect"), default=None,
                   help="generated masks instead (default freeform): mask i in Table 1 bucket i mod 4, seeded")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated masks")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="the field's fixed masks instead: LaMa's thin/medium/thick or MAT's large/small at their config's "
                        "side, fixed by the name (kdinpaint.data.protocols; --seed does not apply)")
    p.add_argument("--perceptual", action=argparse.BooleanOptionalAction, default=None,
                   help="LPIPS and FID beside the table (default: when torchmetrics and the backbone weights are here; "
                        "--perceptual requires them, --no-perceptual skips them)")
    p.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex", help="LPIPS backbone (default alex)")
    p.add_argument("--perceptual-weights", metavar="DIR", default=None,
                   help="folder of the LPIPS / FID backbone files (default $KDINPAINT_WEIGHTS, else torch's hub cache)")
    p.add_argument("--compat", choices=CONVENTIONS, default="default", help="metric convention (kdinpaint.evaluation.metrics)")
    p.add_argument("--floor", nargs="+", metavar="METHOD", choices=sorted(BASELINES), default=None,
                   help=f"weight-free baselines scored beside the network on the same images and masks, with the gap "
                        f"to biharmonic (default for a checkpoint or adapter: {' '.join(FLOOR_METHODS)}; Telea only "
                        "with OpenCV); with --baseline only when given")
    p.add_argument("--no-floor", action="store_true", help="no floor comparison")
    p.add_argument("--control", metavar="CHECKPOINT",
                   help="a second exported network scored on the same images and masks, e.g. the control.safetensors "
                        "of a run with train.control: the paired gap (checkpoint - control) per bucket with its 95 %% "
                        "interval: did distillation help?")
    p.add_argument("--json", dest="json_path", help="also write the summary and per-image rows as JSON here "
                                                    "(the floor comparison under \"floor\", the control under \"control\")")
    p.add_argument("--csv", dest="csv_path", help="also write the summary as CSV here (with the floor: one more "
                                                  "leading column, method)")


def _evaluation_images(args: argparse.Namespace) -> tuple[Sequence[torch.Tensor], list[str], str]:
    if args.size < 16:
        raise ValueError(f"--size must be at least 16 (SSIM's 11x11 window), got {args.size}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be positive, got {args.count}")
    if args.images is None:
        count = args.count or 10
        return list(sample_images(args.size, count)), [f"sample{i}" for i in range(count)], f"{count} sample crops"
    folder = ImageFolder(args.images, size=args.size, crop="center")
    bad = folder.scan()
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s), e.g. {bad[:3]}", file=sys.stderr)
    paths = folder.paths[: args.count] if args.count else folder.paths
    if args.count and len(paths) < args.count:
        print(f"warning: --count {args.count} asked for more images than {args.images} has; scoring its "
              f"{len(paths)}", file=sys.stderr)

    class _Lazy(Sequence):  # loads image i on demand: a 12,000-image folder never sits in memory
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
            return folder.load(i)

    names = [os.path.relpath(p, args.images) if os.path.isdir(args.images) else p for p in paths]
    return _Lazy(), names, f"{len(paths)} images from {args.images}"


class _Picked(Sequence):
    """Masks read on demand from a folder: mask ``i`` is the file ``indices[i % len(indices)]``."""

    def __init__(self, folder: Any, indices: list[int], count: int):
        self.folder, self.indices, self.count = folder, indices, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.folder[self.indices[i % len(self.indices)]]


def _evaluation_masks(args: argparse.Namespace, count: int) -> tuple[Sequence[torch.Tensor], str]:
    if sum(map(bool, (args.masks, args.mask_generator, args.protocol))) > 1:
        raise ValueError("give one of --masks DIR, --mask-generator or --protocol")
    if args.protocol:
        return protocol_masks(args.protocol, count, args.size), describe_protocol(args.protocol)
    if not args.masks:
        kind = args.mask_generator or "freeform"
        return GeneratedMasks(kind, count, args.size, args.seed), f"{kind} masks (seed {args.seed}, bucket i mod 4)"

    if not os.path.exists(args.masks):
        raise FileNotFoundError(f"--masks {args.masks!r} does not exist")
    folder = MaskFolder(args.masks, size=args.size, hole=args.mask_hole)
    usable: list[int] = []
    dropped = 0
    for j in range(len(folder)):  # skip masks with no hole or no known pixel (metrics refuse them)
        if len(usable) == count:
            break
        try:
            hole = folder.hole(j)
        except ValueError:  # unreadable: named in folder.skipped, counted below
            continue
        if hole.any() and not hole.all():
            usable.append(j)
        else:
            dropped += 1
    if not usable:
        raise ValueError(f"every mask in {args.masks} is empty, full or unreadable (holes read as {folder.hole_colour}); check --mask-hole")
    if dropped:
        print(f"warning: skipped {dropped} mask(s) with no hole or no known pixel", file=sys.stderr)
    if folder.skipped:
        print(f"warning: skipped {len(folder.skipped)} unreadable mask file(s), e.g. {folder.skipped[:3]}", file=sys.stderr)
    cycling = f", {len(usable)} cycled over {count} images" if len(usable) < count else ""
    return _Picked(folder, usable, count), f"masks from {args.masks} (holes {folder.hole_colour}{cycling})"


def _floor_choice(args: argparse.Namespace) -> list[str]:
    """The floor methods to run: ``--floor``, else the default for a network and none for ``--baseline``."""
    if args.no_floor and args.floor:
        raise ValueError("give --floor METHOD ... or --no-floor, not both")
    if args.no_floor:
        return []
    if args.floor:
        return list(args.floor)
    return [] if args.baseline else list(FLOOR_METHODS)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.perceptual and (why := perceptual_unavailable(args.lpips_net, args.perceptual_weights)):
        raise ValueError(f"--perceptual: {why}")  # before any image is inpainted
    usable, skipped = floor_methods(_floor_choice(args))
    if args.floor and skipped:  # asked for by name: say why it is missing
        if not usable:
            raise ValueError(f"no --floor method can run here: {skipped}")
        for method, why in skipped.items():
            print(f"warning: floor {method} skipped: {why}", file=sys.stderr)
    inpainter = _inpainter(args)
    inpainter.inverted_mask_fix = "check --mask-hole (white or black: the colour of the holes in --masks)"
    _check_evaluation_memory(args, inpainter, usable)  # before any image is built
    images, names, what_images = _evaluation_images(args)
    masks, what_masks = _evaluation_masks(args, len(images))
    bar = _progress(len(images), "evaluate", not args.no_progress)
    try:
        rows, summary = evaluate_model(inpainter, images, masks, convention=args.compat, names=names, on_batch=bar.update)
    finally:
        bar.close()
    floor = None
    if usable:
        bar = _progress(len(images) * len(usable), f"floor ({', '.join(usable)})", not args.no_progress)
        try:
            result = evaluate_floor(images, masks, usable, convention=args.compat, names=names,
                                    on_batch=lambda _method, n: bar.update(n))
        finally:
            bar.close()
        result.skipped.update(skipped)
        floor = result.compare(summary, name=inpainter.name, network_rows=rows)
    control = _control_comparison(args, images, masks, names, rows, summary, inpainter.name, floor)
    shown = {inpainter.name: inpainter}  # LPIPS / FID of the network and of the reference floor method
    if "biharmonic" in usable:
        shown["biharmonic"] = Inpainter.from_baseline("biharmonic")
    perceptual, perceptual_text = perceptual_report(
        shown, images, masks, mode={None: "auto", True: "on", False: "off"}[args.perceptual], lpips_net=args.lpips_net,
        weights=args.perceptual_weights, batch_size=args.batch_size)
    print(f"{inpainter.name} on {what_images} at {args.size}x{args.size}, {what_masks}, convention {args.compat}\n")
    if control is not None:
        print(f"Did distillation help? {inpainter.name} against {control['name']} on the same images and masks\n")
        print(control["table"])
    print(to_markdown(summary), end="")
    if floor is not None:
        print(f"\nThe floor: weight-free baselines on the same images and masks, gap to {floor['reference']}\n")
        print(floor_to_markdown(summary, floor), end="")
    if perceptual_text:
        title = "Perceptual: LPIPS per image and FID of the set, composites against the originals\n\n"
        print(f"\n{title if perceptual is not None else ''}{perceptual_text}", end="")
    if args.json_path:
        extra = {} if control is None else {"control": {k: v for k, v in control.items() if k != "table"}}
        if perceptual is not None:
            extra["perceptual"] = perceptual
        Path(args.json_path).write_text(to_json(summary, rows, floor=floor, **extra) + "\n")
    if args.csv_path:
        Path(args.csv_path).write_text(to_csv(summary) if floor is None else floor_to_csv(summary, floor))
    return 0


def _check_evaluation_memory(args: argparse.Namespace, inpainter: Any, floor: Sequence[str]) -> None:
    """Refuse, with :class:`InferenceOutOfMemory` naming the ``--size`` that fits, an evaluation whose images and
    methods would not fit in memory, before any image is built: the sample crops are held whole (twice: the crops
    and their cache), ``count × 3 × size² × 4`` bytes each time; a folder is read one batch at a time. The method's
    own need is the network's measured one (:meth:`Inpainter.check_memory`, on its device) or, for a baseline and
    the floor, :data:`~kdinpaint.evaluation.baselines.BYTES_PER_PIXEL` per pixel of each image of a batch."""
    _check_device(args)
    size, pixels = args.size, args.size * args.size
    if size < 16 or (args.count is not None and args.count < 1):
        return  # refused with its own message by _evaluation_images
    held = 2 * (args.count or 10) if args.images is None else 0
    images = held * 3 * pixels * 4
    runs = [(args.baseline, args.batch_size)] if args.baseline else []
    runs += [(m, FLOOR_BATCH_SIZE) for m in floor]
    needs = {m: n * pixels * (BYTES_PER_PIXEL[m] + 16) for m, n in runs}  # + 16: the batch's image and mask
    if not args.baseline and inpainter.device.type == "cpu" and (model := inpainter.memory_model()) is not None:
        needs[inpainter.name] = model.bytes(pixels)
    method, need = max(needs.items(), key=lambda kv: kv[1], default=(None, 0))
    free = available_bytes(torch.device("cpu"))
    if free is not None and images + need > free:
        fits = int(size * math.sqrt(free / (images + need))) // 8 * 8  # every term grows with the pixels
        what = [f"{held // 2} sample images held twice, {held} x 3 x {size} x {size} x 4 bytes = {gib(images)}"]
        what = what if held else []
        what += [f"{gib(need)} for {method} at a time"] * bool(need)
        fix = f"use --size {fits} or less" if fits >= 16 else "free memory first: even --size 16 would not fit"
        raise InferenceOutOfMemory(
            f"evaluating at --size {size} needs about {gib(images + need)} ({'; '.join(what)}), but only "
            f"{gib(free)} is free: {fix}{', or fewer images (--count)' if held else ''}")
    inpainter.check_memory(size, size, option="--size")  # the network on its own device


def _control_comparison(args: argparse.Namespace, images, masks, names, rows, summary, name: str,
                        floor: dict | None) -> dict | None:
    """``--control``: the second network's rows on the same images and masks and the paired gap, or None."""
    if not args.control:
        return None
    other = Inpainter.from_checkpoint(args.control, device=args.device, batch_size=args.batch_size)
    label = f"{other.name} ({Path(args.control).name})" if other.name == name else other.name
    c_rows, c_summary = evaluate_model(other, images, masks, convention=args.compat, names=names)
    gap = paired_gap(rows, c_rows)
    summaries = {name: summary, label: c_summary}
    if floor is not None and "biharmonic" in floor.get("methods", {}):
        summaries["biharmonic"] = floor["methods"]["biharmonic"]
    return {"name": label, "buckets": c_summary["buckets"], "gap": gap, "verdict": paired_verdict(gap, name, label),
            "rows": [asdict(r) for r in c_rows], "table": paired_to_markdown(gap, summaries, name, label)}


# ---- kdinpaint inpaint --------------------------------------------------------------------------
def _inpaint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file, or a folder of images")
    p.add_argument("mask", help="a mask file (used for every image), or a folder of masks matched by file stem "
                                "(NAME.* or NAME_mask.*); resized to each image when of its aspect ratio, thresholded "
                                "when binary up to edges and noise (another aspect ratio or a soft mask is refused)")
    p.add_argument("output", help="the output file (single image) or folder (written as STEM.png, same subfolders)")
    _model_arguments(p)
    p.add_argument("--mask-hole", choices=("auto", "white", "black"), default="white",
                   help="which colour marks holes in the masks (auto: the colour covering less of them, as evaluate)")
    p.add_argument("--concat", action="store_true", help="write input | mask | result side by side")
    p.add_argument("--max-side", type=int, default=None,
                   help="run the network on the image scaled down so its longer side is at most this (the result "
                        "is scaled back up into the holes; known pixels stay the input's): for photos too large for "
                        "memory. Images whose forward would not fit are refused before they run, naming the side that fits")


def _inpaint_jobs(args: argparse.Namespace) -> list[tuple[Path, Path, Path]]:
    """(image, mask, output) for every image; every missing path is named before anything runs."""
    src, msk, out = Path(args.input), Path(args.mask), Path(args.output)
    for label, path in (("input", src), ("mask", msk)):
        if not path.exists():
            raise FileNotFoundError(f"{label} {str(path)!r} does not exist")
    if src.is_file():
        if msk.is_dir():
            raise ValueError(f"a single image needs a single mask file, but {str(msk)!r} is a folder")
        target = out / f"{src.stem}.png" if out.is_dir() or not out.suffix else out
        return _check_collisions([(src, msk, target)])
    if out.is_file():
        raise ValueError(f"input {str(src)!r} is a folder, so the output must be a folder, but {str(out)!r} is a file")
    images = [Path(p) for p in list_images(src)]
    if msk.is_file():
        masks = {None: msk}
    else:
        masks = {}
        for p in map(Path, list_images(msk)):
            key = str(p.relative_to(msk).with_suffix(""))
            if key in masks:
                raise ValueError(f"two masks for {key!r} in {str(msk)!r}: {masks[key].name} and {p.name}; keep one")
            masks[key] = p
    jobs, missing = [], []
    for img in images:
        rel = img.relative_to(src).with_suffix("")
        m = masks.get(None) or masks.get(str(rel)) or masks.get(f"{rel}_mask")
        if m is None:
            missing.append(str(img))
            continue
        jobs.append((img, m, out / rel.with_suffix(".png")))
    if missing:
        raise ValueError(f"no mask in {str(msk)!r} for {len(missing)} image(s), e.g. {missing[:3]}; "
                         "name masks like the images (NAME.png or NAME_mask.png) or pass one mask file for all")
    return _check_collisions(jobs)


def _check_collisions(jobs: list[tuple[Path, Path, Path]]) -> list[tuple[Path, Path, Path]]:
    """Refuse, before anything runs, two inputs written to one output (``a.png`` and ``a.jpg`` both give ``a.png``)
    and an output that is an input image or a mask (paths resolved): either would silently replace a file."""
    writers: dict[Path, list[Path]] = {}
    for img, _, target in jobs:
        writers.setdefault(target.resolve(), []).append(img)
    clashes = {t: imgs for t, imgs in writers.items() if len(imgs) > 1}
    if clashes:
        t, imgs = next(iter(clashes.items()))
        raise ValueError(f"{len(clashes)} output file(s) would each be written by several inputs, e.g. {str(t)!r} by "
                         f"{[str(i) for i in imgs]}: the last would replace the others. Rename the inputs so that "
                         "their names differ without the extension (e.g. a.jpg -> a_jpg.jpg)")
    inputs = {p.resolve(): label for img, mask, _ in jobs for p, label in ((img, "input image"), (mask, "mask"))}
    for t in writers:
        if t in inputs:
            raise ValueError(f"the output {str(t)!r} is an {inputs[t]}: writing the result would replace it; "
                             "choose another output file or folder")
    return jobs


def _scaled_to(image: torch.Tensor, mask: torch.Tensor, max_side: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``image (b, 3, H, W)`` and ``mask (b, 1, H, W)`` scaled down so the longer side is at most ``max_side``
    (area averaging; a pixel is hole if any of the pixels it covers is); unchanged when they already fit."""
    H, W = image.shape[-2:]
    if max_side is None or max(H, W) <= max_side:
        return image, mask
    scale = max_side / max(H, W)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    small = torch.nn.functional.interpolate(image, size=size, mode="area").clamp(-1, 1)
    return small, (torch.nn.functional.interpolate(mask, size=size, mode="area") > 0).to(mask.dtype)


def _image_progress(inpainter: Any, shape: tuple[int, int], count: int, enabled: bool) -> Any:
    """A second bar, within one forward, for images whose forward is estimated above 10 s (the layers run so far
    of the forward's total, counted by the memory probe); ``None`` for quick ones or without an estimate."""
    model = inpainter.memory_model() if enabled else None
    if model is None or model.calls_per_forward <= 0 or model.seconds(shape[0] * shape[1]) <= QUICK_SECONDS:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=model.calls_per_forward, desc=f"{count} image(s) of {shape[0]}x{shape[1]}", unit="layer",
               file=sys.stderr, leave=False)

    def show(done: int, total: int) -> None:
        if done > bar.n:
            bar.update(done - bar.n)  # tqdm redraws at most every 0.1 s
        elif done < bar.n:  # the next forward of a batch in several
            bar.reset(total)
            bar.update(done)

    inpainter.progress = show
    return bar


def cmd_inpaint(args: argparse.Namespace) -> int:
    jobs = _inpaint_jobs(args)
    _check_device(args)
    if args.mask_hole == "auto":  # as evaluate: the median white fraction of the masks (refused when near a half)
        args.mask_hole = detect_hole_colour(list(dict.fromkeys(str(m) for _, m, _ in jobs)))
    inpainter = _inpainter(args)
    other = "black" if args.mask_hole == "white" else "white"
    inpainter.inverted_mask_fix = f"run again with --mask-hole {other}"
    written = 0
    skipped: list[str] = []
    pending: list[tuple[torch.Tensor, torch.Tensor, Path]] = []
    bar = _progress(len(jobs), "inpaint", not args.no_progress)

    if args.max_side is not None and args.max_side < 16:
        raise ValueError(f"--max-side must be at least 16, got {args.max_side}")
    checked: set[tuple[int, int]] = set()

    def flush() -> None:
        if not pending:
            return
        image = torch.cat([p[0] for p in pending])  # (b, 3, H, W)
        mask = torch.cat([p[1] for p in pending])  # (b, 1, H, W)
        small_image, small_mask = _scaled_to(image, mask, args.max_side)
        shape = tuple(small_image.shape[-2:])
        if shape not in checked:  # refuse what would not fit before it runs (the CPU would be killed)
            inpainter.check_memory(*shape, option="--max-side")
            checked.add(shape)
        inner = _image_progress(inpainter, shape, len(pending), not args.no_progress)
        try:
            result = inpainter(small_image, small_mask)
        finally:
            inpainter.progress = None
            if inner is not None:
                inner.close()
        if result.shape != image.shape:  # scaled back up into the holes; known pixels are the input's
            up = torch.nn.functional.interpolate(result, size=image.shape[-2:], mode="bilinear", align_corners=False)
            result = torch.where(mask.bool(), up.clamp(-1, 1), image)
        for i, (_, _, target) in enumerate(pending):
            view = torch.cat([image[i], mask_to_rgb(mask[i : i + 1])[0], result[i]], -1) if args.concat else result[i]
            save_image(target, view)  # (3, H, W) or (3, H, 3W)
        nonlocal written
        written += len(pending)
        bar.update(len(pending))
        pending.clear()

    try:
        for img_path, mask_path, target in jobs:
            try:
                image = load_image(img_path)
            except ValueError as e:
                if len(jobs) == 1:
                    raise
                skipped.append(str(img_path))
                logging.getLogger(__name__).warning("%s", e)
                bar.update(1)
                continue
            try:  # a mask of another aspect ratio or a soft one is refused (nothing else about it is guessed)
                mask = load_mask(mask_path, tuple(image.shape[-2:]), args.mask_hole,
                                 image_name=f"image {str(img_path)!r}")
            except ValueError as e:
                if len(jobs) == 1:
                    raise
                skipped.append(str(img_path))
                print(f"kdinpaint inpaint: skipped {img_path}: {e}", file=sys.stderr)
                bar.update(1)
                continue
            if not mask.any():
                print(f"warning: mask {mask_path} has no hole over {img_path}: the output is the input", file=sys.stderr)
            if pending and (pending[0][0].shape != image.shape or len(pending) >= inpainter.batch_size):
                flush()
            pending.append((image, mask, target))
        flush()
    finally:
        bar.close()
    if len(jobs) == 1 and written:
        print(f"wrote {jobs[0][2]}")
    elif written:
        print(f"wrote {written} image(s) under {args.output} ({inpainter.name}, holes {args.mask_hole})")
    if skipped:
        print(f"kdinpaint inpaint: skipped {len(skipped)} image(s) unreadable or with a refused mask: {skipped[:5]}",
              file=sys.stderr)
        return 1
    return 0


# ---- kdinpaint bench ----------------------------------------------------------------------------
NET8 = "reference"  # the paper's final model (Table 3's Net8): every bench row is also given relative to it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", nargs="*", default=None, help="NAME[:VARIANT] ... (default: every installed adapter)")
    p.add_argument("--relative-to", default=NET8, metavar="NAME[:VARIANT]",
                   help=f"the model every time is divided by, run first (default: {NET8}, the paper's Net8)")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the first available)")
    p.add_argument("--size", type=int, default=256, help="image side (Table 2: 256)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (Table 2: 1); ms are per image")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the model's dtype (bfloat16 on a GPU for the fast path; float16 on CUDA only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards first (compilation, caches); default 2 on "
                                                           "a GPU, 1 on the CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards, the median is reported; default 10 on a "
                                                            "GPU, 3 on the CPU (a Net8 forward at 256x256 takes seconds there)")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) (compilation happens in the warm-up)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (one more forward per model)")
    p.add_argument("--json", dest="json_path", help="also write the rows as JSON here")


def bench_adapter(name: str, device: torch.device, size: int = 256, batch_size: int = 1, warmup: int = 2,
                  repeats: int = 10, compile: bool = False, dtype: torch.dtype = torch.float32,
                  memory: bool = True) -> dict[str, Any]:
    """Median ms per image of the deployed model's forward at ``size`` (a centre hole of a quarter of the image),
    its parameter count and the rise of peak memory during one forward (:func:`kdinpaint.inference.memory.peak_bytes`)."""
    model, stride = deployed_model(name)
    params = sum(p.numel() for p in model.parameters())
    side = -(-size // stride) * stride  # the size the model runs at after padding
    model = model.to(device=device, dtype=dtype)
    runner = torch.compile(model) if compile else model
    image = (torch.rand(batch_size, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    mask = torch.zeros(batch_size, 1, side, side, device=device, dtype=dtype)
    mask[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1  # a centre hole of 25 %
    call_args, call_kwargs = convention(model.model, model.spec).build(image, mask)
    with torch.inference_mode():
        seconds = median_seconds(lambda: runner(*call_args, **call_kwargs), device, repeats, warmup)
        peak = peak_bytes(lambda: runner(*call_args, **call_kwargs), device) if memory else None
    return {"model": name, "params": params, "ms": seconds * 1000 / batch_size, "device": str(device), "size": side,
            "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "compile": compile,
            "dtype": str(dtype).removeprefix("torch."), "peak_mib": None if peak is None else peak / 2**20}


def cmd_bench(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    on_cpu = device.type == "cpu"
    args.repeats = args.repeats if args.repeats is not None else (3 if on_cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 2)
    for key in ("size", "batch_size", "repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"--dtype float16 runs on CUDA only (CPU convolutions lack it); use --dtype bfloat16 or float32 on {device}")
    names = [n for arg in args.adapters for n in arg.split(",") if n] if args.adapters else [a.name for a in list_adapters(strict=_strict(args))]
    anchor = args.relative_to
    same = {anchor, f"{NET8}:net8"} if anchor == NET8 else {anchor}
    names = [anchor] + [n for n in dict.fromkeys(names) if n not in same]
    rows, failed = [], 0
    for i, name in enumerate(names, 1):
        print(f"bench [{i}/{len(names)}] {name}: {args.warmup} warm-up + {args.repeats} timed forwards at "
              f"{args.size}x{args.size} on {device} ...", file=sys.stderr, flush=True)
        try:
            row = bench_adapter(name, device, args.size, args.batch_size, args.warmup, args.repeats, args.compile,
                                dtype, not args.no_memory)
        except (torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", MemoryError)) as e:  # type: ignore[misc]
            failed += 1
            print(f"kdinpaint bench: {name} ran out of memory on {device} at batch size {args.batch_size}: "
                  f"lower --batch-size or --size ({str(e).splitlines()[0][:120]})", file=sys.stderr)
            continue
        except (ValueError, TypeError, RuntimeError) as e:  # one adapter failing (a compile error) keeps the table
            failed += 1
            print(f"kdinpaint bench: {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"bench [{i}/{len(names)}] {name}: {row['ms']:.1f} ms / image", file=sys.stderr, flush=True)
    reference = next((r["ms"] for r in rows if r["model"] == anchor), None)
    for r in rows:
        r["relative"] = None if reference is None else r["ms"] / reference
        r["relative_to"] = anchor
    label = "Net8" if anchor == NET8 else anchor
    what = f"{args.size}×{args.size}, batch {args.batch_size}, {device}, {args.dtype}{', compiled' if args.compile else ''}"
    print(f"| Model | Params (M) | ms / image ({what}) | × {label} | peak memory (MiB) |\n|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r["relative"] is None else f"{r['relative']:.2f}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['model']} | {r['params'] / 1e6:.3f} | {r['ms']:.1f} | {ratio} | {peak} |")
    print(f"\nmedian of {args.repeats} forwards after {args.warmup} warm-up, a centre hole of 25 %; × {label}: ms over "
          f"{anchor} in this run; peak memory: its rise during one forward ({'allocated' if device.type == 'cuda' else 'resident'}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; parameters of the deployed model "
          "(student + completion blocks + PGL)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


# ---- kdinpaint export ---------------------------------------------------------------------------
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the file to write: NAME.pt2 (torch.export) or NAME.onnx (ONNX, needs kdinpaint[onnx])")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="a file written by kdinpaint.save_exported(..., adapter='name:variant')")
    g.add_argument("--adapter", help="NAME[:VARIANT]: with --checkpoint, the adapter it must belong to; alone, that "
                                     "adapter with RANDOM weights (to try the export)")
    _network_arguments(g)
    p.add_argument("--size", type=int, nargs="+", default=[256], metavar="SIDE",
                   help="H [W] of the images the graph is for (multiples of the adapter's stride; default 256): a "
                        "graph is specialised to one size, export once per deployed size")
    p.add_argument("--batch-size", type=int, default=1, help="images per call (the graph is specialised to it)")
    p.add_argument("--format", choices=("pt2", "onnx"), default=None, help="default: from the output's suffix")
    p.add_argument("--no-check", action="store_true", help="skip reloading the file and comparing it with eager PyTorch")


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = args.format or {".pt2": "pt2", ".onnx": "onnx"}.get(out.suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the format of {str(out)!r}: name it .pt2 or .onnx, or pass --format pt2|onnx")
    if len(args.size) > 2 or min(args.size) < 1:
        raise ValueError(f"--size takes H or H W (positive), got {args.size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    H, W = args.size[0], args.size[-1]
    network = _network(args)
    if network is not None:
        model, stride, which = network
    elif args.checkpoint:
        model, which, adapter = load_checkpoint_adapter(args.checkpoint, args.adapter)
        stride = adapter.stride
    elif args.adapter:
        print(f"WARNING: --adapter {args.adapter} without --checkpoint exports RANDOM WEIGHTS", file=sys.stderr)
        model, stride = deployed_model(args.adapter, _model_kwargs(args.model_kwargs))
        which = args.adapter
    else:
        raise ValueError("choose a model: --checkpoint PATH, --model PKG.MODULE:CLASS --checkpoint PATH, --adapter "
                         "NAME --weights PATH (or --adapter NAME[:VARIANT] alone for random weights)")
    model = model.eval().float()
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        deploy.save_program(deploy.export_program(model, H, W, stride, args.batch_size), out)
    else:
        deploy.export_onnx(model, out, H, W, stride, batch=args.batch_size)
    print(f"wrote {out} ({fmt}, {which}, {args.batch_size}x3x{H}x{W}, {out.stat().st_size / 2**20:.1f} MiB)")
    if not args.no_check:
        image, mask = deploy.example_inputs(H, W, args.batch_size, seed=1)
        with torch.inference_mode():
            eager = deploy.Deployable(model)(image, mask)
        with torch.no_grad():
            got = deploy.load_program(out)(image, mask) if fmt == "pt2" else deploy.run_onnx(out, image, mask)
        diff = float((got - eager).abs().max())
        print(f"reloaded: max |{fmt} - eager| = {diff:.2e} on a random image with a centre hole")
        if not diff <= 1e-3:
            raise ValueError(f"the exported {fmt} differs from eager PyTorch by {diff:.2e}; report it with the command")
    return 0


# ---- kdinpaint check-weights --------------------------------------------------------------------
def _check_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", choices=("gatedconv",), help="the adapter whose weights to check (gatedconv: which "
                                                           "channel order DeepFill v2 weights expect)")
    p.add_argument("weights", help="the weights file, e.g. states_tf_places2.pth (generator under 'G')")
    p.add_argument("--images", help="a folder of images or a .flist/.txt file list (default: the bundled sample photos)")
    p.add_argument("--count", type=int, default=10, help="number of images (default 10)")
    p.add_argument("--size", type=int, default=256, help="images are centre-cropped and resized to SIZE x SIZE")
    p.add_argument("--seed", type=int, default=0, help="seed of the free-form masks (mask i in Table 1 bucket i mod 4)")
    p.add_argument("--compat", choices=("tf", "nipponjo"), default="tf",
                   help="numerics: the official TF graph (default) or nipponjo/deepfillv2-pytorch's port")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the first available)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward")
    p.add_argument("--json", dest="json_path", help="also write the per-image PSNRs and the verdict as JSON here")


def cmd_check_weights(args: argparse.Namespace) -> int:
    # an adapter package, imported when its command runs: a broken adapter does not break the other commands
    from kdinpaint_adapters.gatedconv import check_channel_order

    images, names, what_images = _evaluation_images(args)
    masks = GeneratedMasks("freeform", len(images), args.size, args.seed)
    result = check_channel_order(args.weights, [images[i] for i in range(len(images))],
                                 [masks[i] for i in range(len(masks))], names=names, compat=args.compat,
                                 batch_size=args.batch_size, device=resolve_device(args.device))
    print(f"{args.weights}: PSNR on the holes in each channel order; {what_images} at {args.size}x{args.size}, "
          f"free-form masks (seed {args.seed})\n")
    print(result.to_markdown(), end="")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="RECIPE", help="YAML recipe, e.g. recipes/demo.yaml (the main job's)")
    p.add_argument("--stage", choices=("all", "teacher", "student"), default="all")
    p.add_argument("--resume-changed", action="store_true", help="resume a run folder whose recipe.yaml differs")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu: train on the CPU even where a GPU is; cuda: refuse to start without one (default: the GPU "
                        "when there is one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seed=1 checkpoint.dir=runs/seed1")


def cmd_train(args: argparse.Namespace) -> int:
    """The Trainer on one process (several: ``accelerate launch recipes/train.py --config RECIPE``)."""
    from kdinpaint.train.trainer import main as train_main  # here: accelerate takes seconds to import

    flags = [f"--stage={args.stage}", *(["--resume-changed"] if args.resume_changed else []),
             *(["--debug"] if args.debug else []), *([f"--device={args.device}"] if args.device else [])]
    return train_main([*flags, args.config, *args.overrides], prog="kdinpaint train")


# ---- entry point --------------------------------------------------------------------------------
add_command("adapters", "list installed adapters (name, variants, provider, description)", _adapters_arguments, cmd_adapters)
add_command("spec", "show or suggest adapter specs", _spec_arguments, lambda args: 2)
add_command("evaluate", "the paper's Table 1 layout for a checkpoint, an adapter or a baseline", _evaluate_arguments, cmd_evaluate)
add_command("inpaint", "inpaint an image or a folder of images", _inpaint_arguments, cmd_inpaint)
add_command("train", "train a recipe: teacher stage, student stage, report (recipes/train.py's twin)", _train_arguments,
            cmd_train)
add_command("bench", "the paper's Table 2 layout: ms per image and parameters per adapter", _bench_arguments, cmd_bench)
add_command("export", "the deployed model as a torch.export program (.pt2) or ONNX (.onnx) for one image size",
            _export_arguments, cmd_export)
add_command("check-weights", "which channel order DeepFill v2 weights expect: PSNR on the holes in RGB and BGR",
            _check_weights_arguments, cmd_check_weights)
add_command("serve", "a local web page: brush a mask on a photo, see the network's fill beside biharmonic",
            serve_arguments, cmd_serve)


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

    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, PluginError, ImportError, AttributeError, OSError, InferenceOutOfMemory) as e:
        print(f"kdinpaint {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
