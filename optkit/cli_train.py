"""``optkit train``: the training loop of ``optkit.training`` on the command line.

    optkit train --spec optkit-default --data corpus/ --out runs/fresh --steps 500
    optkit train --model optkit-default --lora-r 8 --data notes/ --out runs/lora --steps 200

Rerunning the same command resumes from the last checkpoint in ``--out``. With ``--lora-r`` only LoRA
adapters on the frozen model train, and ``--out`` holds the adapter in PEFT's files (docs/fine-tuning.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optkit.errors import InputError
from optkit.training import TrainConfig

_DEFAULTS = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command (called by ``optkit.cli`` when this module exists)."""
    p = subparsers.add_parser("train", help="train a model on text files (resumes from --out)",
                              description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="preset name, alias or spec YAML path: a model with fresh weights (a YAML "
                                       "`adapters:` block adds LoRA adapters)")
    source.add_argument("--model", help="fine-tune trained weights: a checkpoint directory, Hub id or "
                                        "'optkit-default' (the bundled model), loaded with optkit.from_pretrained")
    p.add_argument("--data", nargs="+", required=True, type=Path,
                   help="text files or directories (one file = one document)")
    p.add_argument("--eval-data", nargs="+", type=Path, help="held-out files (default: --eval-fraction of --data)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory (config.json, model.safetensors, ...)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the bundled model's)")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps in all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                   help="windows per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=_DEFAULTS.seq_len, help="tokens per window (default: %(default)s)")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps,
                   help="linear warmup steps before the cosine decay (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay,
                   help="AdamW weight decay of matrices (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip,
                   help="clip the gradient norm to this; 0: no clipping (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every,
                   help="held-out perplexity (and a checkpoint) every N steps (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction,
                   help="share of --data documents held out when --eval-data is not given (default: %(default)s)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                   help="seeds weights, batches and dropout (default: %(default)s)")
    lora = p.add_argument_group("LoRA", "train low-rank adapters on the frozen model instead of every weight")
    lora.add_argument("--lora-r", type=int, help="adapter rank; turns LoRA on (only adapters train, --out holds "
                                                 "the adapter in PEFT's format)")
    lora.add_argument("--lora-alpha", type=float, help="scaling numerator: the delta is scaled by alpha / r "
                                                       "(default: 8, as PEFT's LoraConfig)")
    lora.add_argument("--lora-dropout", type=float, default=0.0,
                      help="dropout on the adapter's input while training (default: %(default)s)")
    lora.add_argument("--lora-targets", default="q_proj,v_proj",
                      help="comma-separated projection names as the checkpoint names them, or all-linear "
                           "(default: %(default)s)")
    lora.add_argument("--lora-rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    p.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the forward in one process (fp32 weights and optimizer); under torchrun "
                   "(FSDP2) bf16 compute with fp32 gradient reduction (default: %(default)s)")
    p.add_argument("--tp-size", type=int, help="under torchrun: tensor parallelism within groups of N consecutive "
                   "ranks and FSDP2 across the groups (a (world / N) x N mesh; the world size must be a multiple "
                   "of N); default: FSDP2 alone")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Build the spec, train, and print where the model is and how well it does.

    Bad settings and unreadable data are one line on stderr and exit status 2, like optkit's own errors.
    """
    import sys

    import torch
    import torch.distributed as dist

    from optkit.parallel.fsdp import join_torchrun_group
    from optkit.training import train

    joins = dist.is_available() and not dist.is_initialized()  # the group is this command's to leave
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive number of CPU threads")
    prints = join_torchrun_group()  # under torchrun: FSDP2 over the ranks; rank 0 alone prints
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = _model_and_tokenizer(args)
        result = train(model, args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, eval_every=args.eval_every, eval_fraction=args.eval_fraction,
                       seed=args.seed, grad_clip=args.grad_clip, gradient_checkpointing=args.gradient_checkpointing,
                       resume=not args.no_resume, tokenizer=tokenizer, eval_corpus=args.eval_data,
                       mixed_precision=args.mixed_precision, tp_size=args.tp_size)
    except (OSError, ValueError) as exc:  # OptkitError subclasses go to optkit.cli's handler
        from optkit.errors import OptkitError

        if isinstance(exc, OptkitError):
            raise
        print(f"optkit train: error: {exc}", file=sys.stderr)
        return 2
    ppl = f"{result.final_perplexity:.3f}" if result.final_perplexity is not None else "n/a (no held-out data)"
    what = "adapter (PEFT format)" if args.lora_r is not None else "model"
    if prints:
        print(f"done: step {result.step}, held-out perplexity {ppl}; {what} in {result.out_dir}")
    if joins:  # every rank got here: wait for all, then leave (see leave_process_group)
        from optkit.parallel.launch import leave_process_group

        leave_process_group(wait=True)
    return 0


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[object, object]:
    """What ``train`` gets: the spec (built there) or the loaded ``--model``, with LoRA adapters when
    ``--lora-r`` is given; the tokenizer is ``--tokenizer``, else the model directory's, else the bundled one."""
    lora_given = [flag for flag, value, default in (("--lora-alpha", args.lora_alpha, None),
                  ("--lora-dropout", args.lora_dropout, 0.0), ("--lora-targets", args.lora_targets, "q_proj,v_proj"),
                  ("--lora-rslora", args.lora_rslora, False)) if value != default]
    if args.lora_r is None and lora_given:
        raise InputError(f"{', '.join(lora_given)}: LoRA option(s) given without --lora-r; add --lora-r 8 "
                         "(the rank) to train adapters")
    tokenizer = args.tokenizer
    if args.model is None and args.lora_r is None:
        return args.spec, tokenizer
    if args.model is not None:
        import optkit

        model = optkit.from_pretrained(args.model, dtype="float32")
        if tokenizer is None and (Path(args.model) / "vocab.json").is_file():
            tokenizer = Path(args.model)
    else:
        from optkit.training import _model

        model = _model(args.spec, args.seed)
    if args.lora_r is not None:
        from optkit.adapters import add_adapters
        from optkit.adapters.lora import DEFAULT_ALPHA

        targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()]
        add_adapters(model, r=args.lora_r, alpha=DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha,
                     dropout=args.lora_dropout, use_rslora=args.lora_rslora,
                     target_modules=targets[0] if targets == ["all-linear"] else targets)
    return model, tokenizer
