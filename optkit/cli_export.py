"""``optkit export``: a sharded (DCP) training checkpoint as a plain checkpoint that transformers loads.

    optkit export runs/tiny runs/tiny-hf          # a training out_dir: its newest dcp/step-* checkpoint
    optkit export runs/tiny/dcp/step-00000500 out  # one checkpoint

Runs in one process, whatever the world size that wrote the checkpoint (see optkit.parallel.fsdp).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command (called by ``optkit.cli`` when this module exists)."""
    p = subparsers.add_parser("export", help="turn a sharded training checkpoint (DCP) into config.json + safetensors",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a training out_dir, its dcp/ folder or one dcp/step-* directory")
    p.add_argument("out_dir", type=Path, help="where to write config.json + model.safetensors")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from optkit.parallel.fsdp import export_checkpoint

    written = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {written}")
    return 0
