"""The ``optkit`` command line.

Heavy modules (torch, the model code) are imported inside the commands, so that ``main`` is already
running, and a Ctrl-C during start-up is an exit status 130 with one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any, Callable

from optkit.errors import InputError, OptkitError


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name[:80]!r}: not a device; use cpu, cuda, cuda:1 ...") from None
    return name


def _cmd_plugins(args: argparse.Namespace) -> int:
    import torch

    from optkit import registry

    registry.ensure_loaded()
    if args.json:
        device, dtype = torch.device(_device(args.device)), getattr(torch, args.dtype)
        print(json.dumps([{"name": p.name, "distribution": p.distribution, "version": p.version,
                           "status": p.status, "reason": p.reason,
                           "components": [f"{k}:{n}" for k, n in p.components],
                           "unusable": {f"{k}:{n}": r for k, n in p.components
                                        if (r := registry.reasons_unavailable(k, n, device, dtype))},
                           "overrides": {f"{k}:{n}": note for k, n in p.components
                                         if (note := _override_note(registry, p, k, n))}}
                          for p in registry.plugins], indent=2))
        return 0
    device, dtype = torch.device(_device(args.device)), getattr(torch, args.dtype)
    for p in registry.plugins:
        status = p.status if not p.reason else f"{p.status}: {p.reason}"
        print(f"{p.name} ({p.distribution} {p.version}) [{status}]")
        for kind, name in p.components:
            reasons = registry.reasons_unavailable(kind, name, device, dtype) if args.usable else []
            note = f"  (not usable on {device.type}/{args.dtype}: {'; '.join(reasons)})" if reasons else ""
            override = _override_note(registry, p, kind, name)
            print(f"    {kind}: {name}{f'  ({override})' if override else ''}{note}")
    if not registry.plugins:
        print("no optkit plugins are installed (is optkit installed with pip?)")
    return 0


def _override_note(registry: Any, record: Any, kind: str, name: str) -> str:
    """Who really provides a component a plugin lists, when ``override=True`` made that another plugin."""
    current = registry.provider_of(kind, name)
    if current is not None and current.plugin != record.name:
        return f"overridden by {current}"
    replaced = [r for r in registry.plugins if r is not record and (kind, name) in r.components]
    if not replaced:
        return ""
    return f"overrides plugin '{replaced[0].name}' ({replaced[0].distribution} {replaced[0].version})"


def _cmd_info(args: argparse.Namespace) -> int:
    """Every component, usable or not on this machine, with the reasons (like xformers.info)."""
    import torch

    from optkit import registry
    from optkit.presets import registry_file

    device = torch.device(_device(args.device))
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
    """Check every spec given, report each (ok on stdout, INVALID with its problems on stderr); exit 1 if any failed."""
    from optkit.spec import load_spec

    failed = 0
    for source in args.specs:
        try:
            spec = load_spec(source)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not hide the others' reports
            if args.debug:
                raise
            failed += 1
            detail = str(exc) if isinstance(exc, OptkitError) else f"  - cannot be read: {type(exc).__name__}: {exc}"
            print(f"{source}: INVALID\n{detail}", file=sys.stderr)
            continue
        print(f"{source}: ok ({spec.decoder.num_layers} layers, hidden {spec.decoder.hidden_size}, "
              f"attention {spec.decoder.attention.name}, head {spec.head.name})")
        if args.show:
            print(spec.to_yaml())
    return 1 if failed else 0


def _cmd_validate_deprecated(args: argparse.Namespace) -> int:
    print("optkit: 'optkit validate' is deprecated; use 'optkit spec validate'", file=sys.stderr)
    return _cmd_validate(args)


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


def _cmd_plan(args: argparse.Namespace) -> int:
    """Per device: what would be placed there, weight and KV-cache bytes, and whether it fits (nothing allocated)."""
    from optkit.placement import plan
    from optkit.placement.devices import max_memory_from_text

    max_memory = max_memory_from_text(args.max_memory) if args.max_memory else None
    result = plan(args.model, dtype=args.dtype, max_memory=max_memory, batch=args.batch, max_length=args.max_length,
                  device_map=args.device_map)
    print(result)
    return 0 if result.fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optkit", description="Assemble, load and run OPT-family models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("plugins", help="list installed plugins, their status and what they register")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default=None, help="judge usability for this device (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--usable", action=argparse.BooleanOptionalAction, default=True,
                   help="say which components cannot run here, and why (default: on)")
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("info", help="which components can run here, and why not")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("validate")  # deprecated alias of `spec validate`: no help, so not listed
    p.add_argument("specs", nargs="+")
    p.add_argument("--show", action="store_true", help="print the resolved spec")
    p.set_defaults(func=_cmd_validate_deprecated)
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
    p = sub.add_parser("plan", help="which devices a model would occupy (weights + KV cache), without loading it")
    p.add_argument("model", help="preset name or alias, a spec YAML file, or a checkpoint directory (or a Hub id "
                   "in the Hugging Face cache): only its config.json is read")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32", "int8"],
                   help="default: a checkpoint's own dtype, else float16")
    p.add_argument("--max-memory", default=None, help="DEVICE=SIZE pairs, e.g. 0=80GiB,1=80GiB,cpu=200GiB,disk=2TB "
                   "(default: this machine's free memory)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once (sizes the KV cache)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: the model's positions)")
    p.add_argument("--device-map", default="auto", choices=["auto", "balanced", "sequential"])
    p.set_defaults(func=_cmd_plan)
    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub: argparse._SubParsersAction) -> None:
    """Commands defined in other modules (generation) register here when present."""
    import importlib

    for module in ("optkit.cli_run", "optkit.cli_train", "optkit.cli_export", "optkit.cli_bench"):
        try:
            register = importlib.import_module(module).register
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:  # anywhere: while importing, loading, generating
        print("optkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless a Ctrl-C is behind it
        if not _interrupted(exc):
            raise
        print("optkit: interrupted", file=sys.stderr)
        return 130


def _interrupted(exc: BaseException) -> bool:
    """Whether a Ctrl-C caused ``exc``: Python wraps a KeyboardInterrupt that lands in some places (a class
    body's ``__set_name__`` while torch imports, a plugin guard) into another exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except BrokenPipeError:  # e.g. `optkit plugins | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if _interrupted(exc):
            raise
        if args.debug:  # the traceback, but the same exit code as without --debug
            traceback.print_exc()
        if isinstance(exc, OptkitError):
            print(f"optkit: error: {exc}", file=sys.stderr)
        else:
            print(f"optkit: error ({type(exc).__name__}): {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
