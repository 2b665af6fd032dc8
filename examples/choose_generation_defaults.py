"""Measure decoding settings for a small model and print the table that chose the bundled model's defaults.

Why: a tiny model decoded greedily loops ("the path is a path is a path"); repetition penalties and n-gram
bans stop the loops but move probability away from the text the model learned. This script measures both
sides for each setting, so the shipped ``generation_config.json`` is a measured choice, not a guess:

- repetition: ``1 - distinct n-grams / n-grams`` of the new tokens (n = 4, 3, 2), averaged over the
  prompts: the first three lines of ``heldout.txt`` that start with ``def `` (text the model never trained
  on), ``--new-tokens`` greedy tokens each;
- cost: the held-out perplexity of ``heldout.txt`` under the processed distribution (teacher forcing, windows
  of ``--window`` tokens, the window itself is the row the processors look at), over the tokens the setting
  still allows, and the share of held-out tokens it forbids (``no_repeat_ngram_size`` sets them to -inf).

    python examples/choose_generation_defaults.py                      # the bundled model
    python examples/choose_generation_defaults.py --model DIR --markdown
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import optkit
from optkit.generation import no_repeat_ngram, repetition_penalty


@dataclass(frozen=True)
class Setting:
    label: str
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


SETTINGS = (
    Setting("greedy (no processors)"),
    Setting("greedy, repetition_penalty 1.2", 1.2),
    Setting("greedy, repetition_penalty 1.3", 1.3),
    Setting("greedy, no_repeat_ngram_size 3", 1.0, 3),
    Setting("greedy, no_repeat_ngram_size 4", 1.0, 4),
    Setting("greedy, rp 1.1 + nr 3", 1.1, 3),
    Setting("greedy, rp 1.2 + nr 3", 1.2, 3),
    Setting("greedy, rp 1.2 + nr 4", 1.2, 4),
    Setting("greedy, rp 1.3 + nr 3", 1.3, 3),
    Setting("greedy, rp 1.4 + nr 3", 1.4, 3),
)


def prompts(heldout: str, count: int = 3) -> list[str]:
    return [line for line in heldout.splitlines() if line.startswith("def ")][:count]


def repeated_rate(tokens: list[int], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(model: optkit.Model, tokenizer: optkit.Tokenizer, texts: list[str], setting: Setting,
               new_tokens: int) -> list[float]:
    """Mean repeated 4-, 3- and 2-gram rates of greedy continuations of ``texts``."""
    rates = {4: [], 3: [], 2: []}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             repetition_penalty=setting.repetition_penalty,
                             no_repeat_ngram_size=setting.no_repeat_ngram_size)
        new = out[0, ids.shape[1]:].tolist()
        for n in rates:
            rates[n].append(repeated_rate(new, n))
    return [sum(v) / len(v) for v in rates.values()]


@torch.no_grad()
def processed_perplexity(model: optkit.Model, windows: torch.Tensor, setting: Setting) -> tuple[float, float]:
    """(perplexity over allowed tokens, share forbidden) of ``windows`` under the processed distribution."""
    start = torch.zeros(1, dtype=torch.long)
    processors = []
    if setting.repetition_penalty != 1.0:
        processors.append(repetition_penalty(setting.repetition_penalty, start))
    if setting.no_repeat_ngram_size:
        processors.append(no_repeat_ngram(setting.no_repeat_ngram_size, start))
    nll, allowed, forbidden = 0.0, 0, 0
    for window in windows:
        logits = model(window[None]).logits[0].float()
        for t in range(1, window.numel()):
            scores = logits[t - 1:t]
            for process in processors:
                scores = process(window[None, :t], scores)
            logp = torch.log_softmax(scores, dim=-1)[0, window[t]]
            if math.isinf(float(logp)):
                forbidden += 1
            else:
                nll, allowed = nll - float(logp), allowed + 1
    return math.exp(nll / allowed), forbidden / (allowed + forbidden)


def heldout_windows(tokenizer: optkit.Tokenizer, text: str, window: int, count: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    usable = min(count, ids.numel() // window)
    return ids[:usable * window].reshape(usable, window)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(optkit.default_model_dir()))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = optkit.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = optkit.Tokenizer.from_pretrained(args.model)
    heldout = (Path(args.model) / "heldout.txt").read_text(encoding="utf-8")
    texts = prompts(heldout)
    windows = heldout_windows(tokenizer, heldout, args.window, args.windows)
    print(f"model {args.model}; prompts {texts}; {windows.numel()} held-out tokens", file=sys.stderr)
    print("| setting | repeated 4-grams | 3-grams | 2-grams | held-out ppl | tokens forbidden |")
    print("|---|---|---|---|---|---|")
    for setting in SETTINGS:
        r4, r3, r2 = repetition(model, tokenizer, texts, setting, args.new_tokens)
        ppl, forbidden = processed_perplexity(model, windows, setting)
        print(f"| {setting.label} | {r4:.3f} | {r3:.3f} | {r2:.3f} | {ppl:.1f} | {100 * forbidden:.1f} % |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
