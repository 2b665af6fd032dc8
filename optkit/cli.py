"""The ``optkit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from optkit.errors import OptkitError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from optkit import registry

    registry.ensure_loaded()
    if args.json:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        print(json.dumps([{"name": p.name, "distribution": p.distribution, "version": p.version,
                           "status": p.status, "reason": p.reason,
                           "components": [f"{k}:{n}" for k, n in p.components],
                           "unusable": {f"{k}:{n}": r for k, n in p.components
                                        if (r := registry.get(k, n).unavailable_reasons(device, dtype))}}
                          for p in registry.plugins], indent=2))
        return 0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for p in registry.plugins:
        status = p.status if not p.reason else f"{p.status}: {p.reason}"
        print(f"{p.name} ({p.distribution} {p.version}) [{status}]")
        for kind, name in p.components:
            reasons = registry.get(kind, name).unavailable_reasons(device, dtype) if args.usable else []
            note = f"  (not usable on {device.type}/{args.dtype}: {'; '.join(reasons)})" if reasons else ""
            print(f"    {kind}: {name}{note}")
    if not registry.plugins:
        print("no optkit plugins are installed (is optkit installed with pip?)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    """Every component, usable or not on this machine, with the reasons (like xformers.info)."""
    from optkit import registry
    from optkit.presets import registry_file

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}; cuda available: {torch.cuda.is_available()}; checking {device.type}/{args.dtype}")
    for entry in registry.registrations():
        reasons = entry.unavailable_reasons(device, dtype)
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print(f"{entry.kind:21} {entry.name:24} {state}  [{entry.provider.plugin}]")
    for kind, entries in registry_file().catalogue.items():
        for name, item in entries.items():
            if (kind, name) not in registry:
                print(f"{kind:21} {name:24} not installed: {item.install or item.package}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from optkit.spec import load_spec

    failed = 0
    for source in args.specs:
        try:
            spec = load_spec(source)
        except OptkitError as exc:
            failed += 1
            print(f"{source}: INVALID\n{exc}", file=sys.stderr)
            continue
        print(f"{source}: ok ({spec.decoder.num_layers} layers, hidden {spec.decoder.hidden_size}, "
              f"attention {spec.decoder.attention.name}, head {spec.head.name})")
        if args.show:
            print(spec.to_yaml())
    return 1 if failed else 0


def _cmd_spec_show(args: argparse.Namespace) -> int:
    from optkit.spec import load_spec

    print(load_spec(args.spec).to_yaml(), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from optkit.presets import registry_file

    for name, preset in registry_file().presets.items():
        if preset.abstract:
            continue
        aliases = f" (aliases: {', '.join(preset.aliases)})" if preset.aliases else ""
        print(f"{name}{aliases}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optkit", description="Assemble, load and run OPT-family models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins, their status and what they register")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="judge usability for this device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--usable", action=argparse.BooleanOptionalAction, default=True,
                   help="say which components cannot run here, and why (default: on)")
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("info", help="which components can run here, and why not")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("validate", help="validate model spec YAML files or preset names")
    p.add_argument("specs", nargs="+")
    p.add_argument("--show", action="store_true", help="print the resolved spec")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("presets", help="list model presets from registry.yaml")
    p.set_defaults(func=_cmd_presets)
    spec = sub.add_parser("spec", help="show or validate model specs").add_subparsers(dest="spec_command", required=True)
    p = spec.add_parser("show", help="print the resolved spec (preset name, alias or YAML file) as YAML")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_spec_show)
    p = spec.add_parser("validate", help="validate spec files; every problem with its YAML path; exit 1 if any")
    p.add_argument("specs", nargs="+")
    p.add_argument("--show", action="store_true", help="print the resolved spec")
    p.set_defaults(func=_cmd_validate)
    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub: argparse._SubParsersAction) -> None:
    """Commands defined in other modules (generation) register here when present."""
    import importlib

    for module in ("optkit.cli_run", "optkit.cli_train"):
        try:
            register = importlib.import_module(module).register
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except BrokenPipeError:  # e.g. `optkit plugins | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("optkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        kind = "error" if isinstance(exc, OptkitError) else f"error ({type(exc).__name__})"
        print(f"optkit: {kind}: {exc} (run with --debug for the traceback)"
              if not isinstance(exc, OptkitError) else f"optkit: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
