"""``optkit train``: the training loop of ``optkit.training`` on the command line.

    optkit train --spec opt-tiny --data corpus/ --out runs/tiny --steps 500

Rerunning the same command resumes from the last checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optkit.training import TrainConfig

_DEFAULTS = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command (called by ``optkit.cli`` when this module exists)."""
    p = subparsers.add_parser("train", help="train a model on text files (resumes from --out)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="preset name, alias or spec YAML path")
    p.add_argument("--data", nargs="+", required=True, type=Path,
                   help="text files or directories (one file = one document)")
    p.add_argument("--eval-data", nargs="+", type=Path, help="held-out files (default: --eval-fraction of --data)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory (config.json, model.safetensors, ...)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the bundled model's)")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    p.add_argument("--seq-len", type=int, default=_DEFAULTS.seq_len)
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    p.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip)
    p.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every)
    p.add_argument("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction)
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Build the spec, train, and print where the model is and how well it does.

    Bad settings and unreadable data are one line on stderr and exit status 2, like optkit's own errors.
    """
    import sys

    import torch

    from optkit.training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = train(args.spec, args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, eval_every=args.eval_every, eval_fraction=args.eval_fraction,
                       seed=args.seed, grad_clip=args.grad_clip, gradient_checkpointing=args.gradient_checkpointing,
                       resume=not args.no_resume, tokenizer=args.tokenizer, eval_corpus=args.eval_data)
    except (OSError, ValueError) as exc:  # OptkitError subclasses go to optkit.cli's handler
        from optkit.errors import OptkitError

        if isinstance(exc, OptkitError):
            raise
        print(f"optkit train: error: {exc}", file=sys.stderr)
        return 2
    ppl = f"{result.final_perplexity:.3f}" if result.final_perplexity is not None else "n/a (no held-out data)"
    print(f"done: step {result.step}, held-out perplexity {ppl}; model in {result.out_dir}")
    return 0
