"""``kdinpaint serve [--checkpoint F | --adapter NAME]``: the arguments, the methods shown, and the server."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from kdinpaint.serve.images import Limits

__all__ = ["serve_arguments", "cmd_serve", "build_methods"]


def serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the biharmonic fill alone)")
    g.add_argument("--checkpoint", help="a file written by kdinpaint.save_exported, e.g. a run's student.safetensors "
                                        "(its control.safetensors, when beside it, is shown too)")
    g.add_argument("--adapter", help="NAME[:VARIANT]: with --checkpoint, the adapter it must belong to; alone, that "
                                     "adapter with RANDOM weights (to try the page)")
    p.add_argument("--no-control", action="store_true", help="do not show the control network beside the checkpoint")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the first available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload in MiB (default 10)")
    p.add_argument("--max-pixels", type=float, default=40.0, help="largest upload in millions of pixels (default 40)")
    p.add_argument("--max-side", type=int, default=512, help="photos are shrunk to this longest side (default 512)")


def build_methods(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """``({label: inpainter}, note)``: the network (and its control), then biharmonic; the note warns of random weights."""
    from kdinpaint.inference import Inpainter

    methods: dict[str, Any] = {}
    note = None
    if args.checkpoint:
        net = Inpainter.from_checkpoint(args.checkpoint, args.adapter, device=args.device)
        methods[net.name] = net
        control = Path(args.checkpoint).with_name("control.safetensors")
        if not args.no_control and control.is_file() and control.resolve() != Path(args.checkpoint).resolve():
            twin = Inpainter.from_checkpoint(control, device=args.device)
            methods[f"{twin.name}, control"] = twin
    elif args.adapter:
        net = Inpainter.from_adapter(args.adapter, device=args.device)
        methods[net.name] = net
        note = f"{args.adapter} runs with RANDOM weights: its fill is noise. Pass --checkpoint for a trained network."
    else:
        note = "No network given (--checkpoint F): only the weight-free biharmonic fill is shown."
    methods["biharmonic"] = Inpainter.from_baseline("biharmonic")
    return methods, note


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(f"kdinpaint serve needs the serve extra ({e.name} is missing): "
                          "pip install 'kdinpaint[serve]'") from None
    from kdinpaint.serve.app import create_app

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    limits = Limits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_pixels * 1e6),
                    max_side=args.max_side)
    methods, note = build_methods(args)
    app = create_app(methods, limits=limits, note=note)
    if not _loopback(args.host):
        print(f"WARNING: listening on {args.host}: the page has no login; anyone who reaches this address can use "
              "this machine's CPU/GPU through it", file=sys.stderr)
    print(f"kdinpaint serve: open http://{args.host}:{args.port}/  ({', '.join(methods)}; Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
