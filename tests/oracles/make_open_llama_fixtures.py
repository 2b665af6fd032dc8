"""Make the Open-Llama parity fixtures with transformers 4.31.0, the last release with a working Open-Llama.

transformers 5 removed Open-Llama, and 4.32-4.57 kept it only under ``models.deprecated``, with a KV
cache that cannot read back what it returns. So the reference is transformers 4.31.0. The tests never
import it: this script runs once, in its own environment, and writes small fixtures that
``tests/test_open_llama.py`` compares optkit against. It never imports optkit.

Recreate the environment from nothing (Python 3.11; any Python that has torch 2.13 wheels works):

    python3.11 -m venv /tmp/open-llama-4.31
    /tmp/open-llama-4.31/bin/pip install torch==2.13.0 transformers==4.31.0 'numpy<2' safetensors
    # optional, a CPU-only torch (much smaller):
    #   add --extra-index-url https://download.pytorch.org/whl/cpu to the line above

then, from the repository root:

    /tmp/open-llama-4.31/bin/python tests/oracles/make_open_llama_fixtures.py

It rewrites ``tests/fixtures/open_llama/`` (a few seconds on one CPU core). The fixtures were made with
transformers 4.31.0, torch 2.13.0+cpu, numpy 1.26.4, safetensors 0.8.0, tokenizers 0.13.3 and
huggingface_hub 0.36.2. Rerunning it with those versions reproduces them byte for byte (the seeds
are fixed); ``--check`` regenerates into a temporary directory and reports any difference.

For each case, ``tests/fixtures/open_llama/<case>/`` holds:

* ``config.json`` and ``model.safetensors``: the checkpoint exactly as 4.31's
  ``save_pretrained(safe_serialization=True)`` writes it. That includes the persistent
  ``rotary_emb.inv_freq`` buffers, which optkit ignores on load. ``generation_config.json`` is
  removed: optkit does not read it.
* ``expected.safetensors``: for each run ``R``, its inputs ``R.input_ids``, ``R.attention_mask``,
  ``R.position_ids``, ``R.inputs_embeds`` (those it uses) and its outputs: ``R.logits``
  (``R.last_hidden_state`` for the base model), ``R.tokens`` (greedy or generate) and ``R.scores``
  (generate's per-step logits, ``(batch, steps, vocab)``).
* ``case.json``: the config overrides, the head and transformers class, the versions, and per run
  its kind, tensors and what it means.

Run kinds:

* ``forward``: one uncached forward (``use_cache=False``) on an untouched copy of the model.
  transformers' dynamic-NTK rotary keeps an enlarged base after a long input, so every run starts
  from a fresh copy, except ``history`` runs.
* ``history``: the same as ``forward``, right after the run named in ``after``, on the same object.
  It records transformers' history dependence; optkit has none.
* ``greedy``: an uncached argmax loop. Every step re-runs the whole sequence with the positions
  that ``generate`` would pass (``cumsum(mask) - 1``, with padding at 1).
* ``generate``: 4.31's own cached greedy ``generate`` (no EOS, exactly ``steps`` tokens), and the
  logits of each step.
* ``seqcls``: sequence classification. ``R.logits`` holds the logits of the rightmost real
  token, taken from ``R.position_logits`` (``score`` applied at every position). ``R.pooled_4_31``
  holds 4.31's own pooled output. 4.31 pools ``count(non-pad) - 1``, which is wrong for left
  padding.

The models are tiny: hidden 32, 2 heads, 2 layers, vocab 128, 32 trained positions. Their norms
are perturbed away from ones and zeros, so a skipped or misplaced norm shows in the logits.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

VERSION = "4.31.0"
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "open_llama"
SEED = 7

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LINEAR = {"rope_scaling": {"type": "linear", "factor": 2.0}}
DYNAMIC = {"rope_scaling": {"type": "dynamic", "factor": 2.0}}
CLASSES = {"causal_lm": "OpenLlamaForCausalLM", "base": "OpenLlamaModel",
           "sequence_classification": "OpenLlamaForSequenceClassification"}


# -- inputs -------------------------------------------------------------------------------------------
def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """Ids from 3 up: never the pad (0), bos (1) or eos (2) id."""
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def padded(batch: int, length: int, pads: list[int], seed: int, side: str = "left") -> dict[str, torch.Tensor]:
    ids = random_ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        if pad:
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, TINY["pad_token_id"]), "attention_mask": mask}


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """What 4.31's prepare_inputs_for_generation passes: cumsum - 1, with padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def with_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}


PLAIN = {"input_ids": random_ids(2, 12, 11)}
LEFT = padded(3, 12, [0, 3, 6], seed=12)
RIGHT = padded(3, 12, [0, 3, 6], seed=13, side="right")
EMBEDS = {"inputs_embeds": torch.randn(2, 8, TINY["hidden_size"], generator=torch.Generator().manual_seed(14))}
SHORT = {"input_ids": random_ids(2, 20, 15)}
LONG = {"input_ids": random_ids(2, 48, 16)}  # past the 32 trained positions, within 2 x 32
PROMPT = padded(2, 10, [0, 3], seed=17)
CROSS = {"input_ids": random_ids(1, 26, 18)}  # + 12 tokens = 38: crosses the trained 32

# Runs: name -> (kind, inputs, extra). ``note`` ends up in case.json.
RUNS: dict[str, tuple[str, dict[str, torch.Tensor], dict[str, Any]]] = {
    "plain": ("forward", PLAIN, {"note": "unpadded"}),
    "left": ("forward", with_positions(LEFT), {"note": "left padding, generate's positions (cumsum - 1)"}),
    "left_arange": ("forward", LEFT, {"note": "left padding, forward()'s default positions: arange, over padding "
                                              "too (optkit takes them from the mask; RoPE is relative)"}),
    "embeds": ("forward", EMBEDS, {"note": "user inputs_embeds (they skip the stable-embedding LayerNorm)"}),
    "short": ("forward", SHORT, {"note": "20 tokens, within the trained 32"}),
    "long": ("forward", LONG, {"note": "48 tokens, past the trained 32, on a fresh model"}),
    "short_after_long": ("history", SHORT, {"after": "long", "note": "the 'short' input right after 'long' on the "
                                                                     "same object: 4.31 keeps the long input's base"}),
    "greedy": ("greedy", PROMPT, {"steps": 8, "note": "uncached greedy loop, left-padded prompt"}),
    "greedy_cross": ("greedy", CROSS, {"steps": 12, "note": "uncached greedy loop, 26 -> 38 tokens"}),
    "generate": ("generate", PROMPT, {"steps": 8, "note": "4.31's cached generate, left-padded prompt"}),
    "generate_cross": ("generate", CROSS, {"steps": 12, "note": "4.31's cached generate, 26 -> 38 tokens"}),
    "seqcls_left": ("seqcls", with_positions(LEFT), {"note": "left padding; 4.31's own pooling picks a wrong "
                                                             "token here, so logits come from position_logits"}),
    "seqcls_right": ("seqcls", RIGHT, {"note": "right padding; logits equal 4.31's own pooled output"}),
    "hidden_left": ("forward", with_positions(LEFT), {"note": "last_hidden_state, left padding"}),
}

# Cases: name -> (config overrides, head, runs, description).
CASES: dict[str, tuple[dict[str, Any], str, list[str], str]] = {
    "v1": ({}, "causal_lm", ["plain", "left", "left_arange", "embeds", "greedy", "generate"],
           "V1: OpenLlamaConfig defaults (stable embedding, shared input-output embedding, no scaling)"),
    "v2": (dict(use_stable_embedding=False, shared_input_output_embedding=False, rms_norm_eps=1e-5,
                use_memory_efficient_attention=False), "causal_lm",
           ["plain", "left", "embeds", "greedy", "generate"],
           "V2 style: no stable embedding, a separate lm_head, rms eps 1e-5"),
    "linear": (dict(LINEAR, shared_input_output_embedding=False), "causal_lm",
               ["plain", "left", "long", "greedy", "generate", "generate_cross"],
               "linear rope scaling x2, stable embedding, separate lm_head"),
    "dynamic": (dict(DYNAMIC, use_stable_embedding=False), "causal_lm",
                ["short", "left", "long", "short_after_long", "greedy", "greedy_cross", "generate",
                 "generate_cross"],
                "dynamic NTK rope scaling x2, no stable embedding, shared embedding"),
    "seqcls": (dict(num_labels=3), "sequence_classification", ["seqcls_left", "seqcls_right"],
               "OpenLlamaForSequenceClassification, 3 labels"),
    "base": ({}, "base", ["hidden_left"], "OpenLlamaModel (no head, no 'model.' prefix)"),
}


# -- transformers 4.31 ----------------------------------------------------------------------------------
def build(config: dict[str, Any], head: str) -> torch.nn.Module:
    torch.manual_seed(SEED)
    cls = getattr(transformers, CLASSES[head])
    model = cls(transformers.OpenLlamaConfig(**config)).eval()
    with torch.no_grad():  # norms start at ones/zeros: make a skipped or misplaced one visible
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@torch.no_grad()
def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(**inputs, use_cache=False)
    if getattr(out, "logits", None) is not None:
        return {"logits": out.logits}
    return {"last_hidden_state": out.last_hidden_state}


@torch.no_grad()
def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=generation_positions(mask),
                       use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return {"tokens": ids}


@torch.no_grad()
def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """4.31's cached greedy search: exactly ``steps`` tokens, and the logits of each step."""
    # No EOS anywhere: 4.31 rebuilds an edited model.generation_config from model.config (bringing
    # eos_token_id back) unless one is passed, and greedy_search falls back to
    # model.generation_config.eos_token_id when the passed one is None. So set both.
    config = transformers.GenerationConfig(max_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=None,
                                           pad_token_id=TINY["pad_token_id"], bos_token_id=TINY["bos_token_id"],
                                           output_scores=True, return_dict_in_generate=True)
    model.generation_config = config
    out = model.generate(**inputs, generation_config=config)
    # The cache works: the cached step logits equal those of uncached passes over each prefix
    # (dynamic NTK past the trained length excepted, by design; see docs/open-llama.md).
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + steps
    return {"tokens": out.sequences, "scores": torch.stack(out.scores, dim=1)}


@torch.no_grad()
def seqcls(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-position scores from 4.31's own modules; the expected logits are the rightmost real token's."""
    pooled = model(**inputs, use_cache=False).logits
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    positions = model.score(hidden)
    mask = inputs["attention_mask"]
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    return {"logits": positions[torch.arange(mask.shape[0]), last], "position_logits": positions,
            "pooled_4_31": pooled}


def run(model: torch.nn.Module, kind: str, inputs: dict[str, torch.Tensor], extra: dict[str, Any]
        ) -> dict[str, torch.Tensor]:
    if kind in ("forward", "history"):
        return forward(model, inputs)
    if kind == "greedy":
        return greedy(model, inputs, extra["steps"])
    if kind == "generate":
        return generate(model, inputs, extra["steps"])
    return seqcls(model, inputs)


def make_case(name: str, directory: Path) -> dict[str, float]:
    overrides, head, runs, description = CASES[name]
    pristine = build({**TINY, **overrides}, head)
    pristine.save_pretrained(directory, safe_serialization=True)
    (directory / "generation_config.json").unlink(missing_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {}
    for run_name in runs:
        kind, inputs, extra = RUNS[run_name]
        model = models[extra["after"]] if kind == "history" else copy.deepcopy(pristine)
        models[run_name] = model
        outputs = run(model, kind, inputs, extra)
        for key, value in {**inputs, **outputs}.items():
            tensors[f"{run_name}.{key}"] = value.detach().contiguous().clone()
        meta[run_name] = {"kind": kind, "inputs": sorted(inputs), "outputs": sorted(outputs),
                          **{k: v for k, v in extra.items()}}
    save_file(tensors, str(directory / "expected.safetensors"), metadata={"transformers": VERSION})
    case = {"case": name, "description": description, "head": head, "class": CLASSES[head],
            "config_overrides": overrides, "seed": SEED, "transformers": transformers.__version__,
            "torch": torch.__version__, "script": "tests/oracles/make_open_llama_fixtures.py", "runs": meta}
    (directory / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    return self_check(name, directory, pristine, tensors)


@torch.no_grad()
def self_check(name: str, directory: Path, pristine: torch.nn.Module, tensors: dict[str, torch.Tensor]
               ) -> dict[str, float]:
    """What was saved is what ran: 4.31 reloads the files to bitwise-equal logits, and its cache agrees
    with uncached passes over each prefix (where it should)."""
    _, head, runs, _ = CASES[name]
    reloaded = getattr(transformers, CLASSES[head]).from_pretrained(directory).eval()
    saved = load_file(str(directory / "model.safetensors"))
    assert set(saved) == set(pristine.state_dict()), name
    assert all(torch.equal(saved[k], v) for k, v in pristine.state_dict().items()), name
    report = {}
    for run_name in runs:
        kind, inputs, extra = RUNS[run_name]
        if kind == "forward":
            out = forward(copy.deepcopy(reloaded), inputs)
            (key,) = out
            assert torch.equal(out[key], tensors[f"{run_name}.{key}"]), f"{name}/{run_name}: reload differs"
        if kind == "generate":
            ids, scores = tensors[f"{run_name}.tokens"], tensors[f"{run_name}.scores"]
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            prompt = inputs["input_ids"].shape[1]
            full = torch.cat([mask, mask.new_ones(mask.shape[0], ids.shape[1] - prompt)], dim=1)
            errors = []
            for step in range(ids.shape[1] - prompt):
                n = prompt + step
                if n > TINY["max_position_embeddings"] and "dynamic" in name:
                    continue  # past the trained length dynamic NTK's cache differs by design
                logits = copy.deepcopy(pristine)(input_ids=ids[:, :n], attention_mask=full[:, :n],
                                                 position_ids=generation_positions(full[:, :n]),
                                                 use_cache=False).logits[:, -1]
                errors.append((logits - scores[:, step]).abs().max().item())
            report[f"{name}/{run_name}: 4.31 cached vs uncached"] = max(errors)
            assert max(errors) <= 1e-5, (name, run_name, max(errors))
    return report


def write_all(out: Path) -> dict[str, float]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report: dict[str, float] = {}
    for name in CASES:
        (out / name).mkdir()
        report.update(make_case(name, out / name))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary directory and compare "
                                                             "with --out instead of overwriting it")
    args = parser.parse_args()
    if transformers.__version__ != VERSION:
        sys.exit(f"needs transformers=={VERSION} (this is {transformers.__version__}); see the docstring")
    torch.set_num_threads(1)  # reproducible reductions
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_all(Path(tmp) / "open_llama")
            diff = filecmp.dircmp(args.out, Path(tmp) / "open_llama")
            bad = _differences(diff)
            print("identical" if not bad else "differ: " + ", ".join(bad))
            return 1 if bad else 0
    report = write_all(args.out)
    for label, err in report.items():
        print(f"{label:<55} {err:.2e}")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(CASES)} cases to {args.out} ({total / 1024:.0f} KiB)")
    return 0


def _differences(diff: filecmp.dircmp, prefix: str = "") -> list[str]:
    bad = [prefix + n for n in diff.left_only + diff.right_only]
    _, mismatch, errors = filecmp.cmpfiles(diff.left, diff.right, diff.common_files, shallow=False)
    bad += [prefix + n for n in mismatch + errors]
    for name, sub in diff.subdirs.items():
        bad += _differences(sub, f"{prefix}{name}/")
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
