"""The tiny training setup the distributed training tests share: a regular corpus, its BPE, OPT and Open-Llama
specs small enough to train in seconds, and a probe input. Dropout is 0, so sharded runs compare exactly with
one process (ranks of different data-parallel groups draw other dropout masks)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import optkit
from optkit import training

TINY = {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "max_positions": 64,
        "dropout": 0.0}
PROBE = torch.tensor([[2, 17, 40, 99, 5, 250, 3]])


def documents() -> list[str]:
    return [f"# module {i}\n" + "\n".join(f"def f_{i}_{j}(v):\n    return v + {j}\n" for j in range(6))
            for i in range(16)]


@functools.cache
def tokenizer() -> Any:
    return training.train_bpe(documents(), vocab_size=TINY["vocab_size"])


def spec() -> optkit.ModelSpec:
    return optkit.load_spec("opt-tiny", decoder=TINY)


def llama_spec() -> optkit.ModelSpec:
    """Open-Llama (RMSNorm, rotary positions, SwiGLU, untied head), dropout 0: the second family trains sharded."""
    return optkit.load_spec("open-llama-tiny-v2-style", decoder={
        "vocab_size": TINY["vocab_size"], "hidden_size": 32, "num_heads": 2, "ffn_dim": 64, "max_positions": 64,
        "attention_dropout": 0.0, "mlp": {"name": "gated", "params": {"activation": "silu", "dropout": 0.0}}})


def torchrun_train(work: Path, *options: str, timeout: float) -> subprocess.CompletedProcess:
    """``optkit train`` on 2 processes under a real torchrun, on the tiny spec, corpus and tokenizer written
    into ``work`` (2 steps of 16-token windows, checkpoints in ``work/run``); ``options`` add to the command."""
    training.save_opt_tokenizer(tokenizer(), work / "tok")
    (work / "tiny.yaml").write_text(spec().to_yaml(), encoding="utf-8")
    (work / "data").mkdir()
    for i, doc in enumerate(documents()):
        (work / "data" / f"doc{i:02d}.py").write_text(doc, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "optkit.cli", "train", "--spec", str(work / "tiny.yaml"), "--data", str(work / "data"),
               "--out", str(work / "run"), "--tokenizer", str(work / "tok"), "--steps", "2", "--seq-len", "16",
               "--eval-every", "2", "--eval-fraction", "0.25", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
