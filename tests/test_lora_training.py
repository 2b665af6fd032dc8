"""LoRA fine-tuning with optkit.training: only adapters train, the base stays bit-identical, checkpoints hold the
adapter (PEFT's files) and the trainer state, and a resumed run ends where an uninterrupted one does.

The text is this project's docs/adapters.md: prose and code the bundled model (trained on Python's standard
library) has not seen, split by lines into a training part and a held-out part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import optkit
from tests.helpers import base_hash
from optkit import training
from optkit.adapters import adapter_parameters
from optkit.bundled import default_model_dir
from optkit.cli import main
from optkit.training import TRAINER_STATE, encode_documents, eval_windows, load_tokenizer, parameter_groups, perplexity

MODEL_DIR = default_model_dir()
TEXT = (Path(__file__).resolve().parents[1] / "docs" / "adapters.md").read_text(encoding="utf-8")
LINES = TEXT.splitlines(keepends=True)
TRAIN_TEXT, HELD_OUT = "".join(LINES[: len(LINES) * 3 // 4]), "".join(LINES[len(LINES) * 3 // 4:])
TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]
int8_reasons = optkit.registry.get("linear", "int8").unavailable_reasons("cpu", torch.float32)


def lora_model(linear: str | None = None, r: int = 8) -> optkit.Model:
    model = optkit.from_pretrained(MODEL_DIR, dtype=torch.float32, linear=linear)
    torch.manual_seed(0)  # the adapters' A matrices
    return model.add_adapter(r=r, alpha=2 * r, target_modules=TARGETS)


def held_out_windows(seq_len: int = 64) -> torch.Tensor:
    tokenizer = load_tokenizer(MODEL_DIR)
    return eval_windows(encode_documents(tokenizer, [HELD_OUT], 2), seq_len=seq_len, max_windows=16)


def fit(model: nn.Module, out: Path, *, steps: int, **settings) -> training.TrainResult:
    settings = {"batch_size": 4, "seq_len": 64, "lr": 5e-3, "warmup_steps": 2, "eval_every": steps, "log_every": 100,
                "eval_windows": 16, **settings}
    return training.train(model, [TRAIN_TEXT], eval_corpus=[HELD_OUT], out_dir=out, steps=steps, **settings)


def test_lora_fine_tune_lowers_held_out_loss_and_leaves_the_base_bit_identical(tmp_path):
    model = lora_model()
    before_hash = base_hash(model)
    before = perplexity(model, held_out_windows())
    trainable = {id(p) for p in adapter_parameters(model).values()}
    assert {id(p) for group in parameter_groups(model, 0.1) for p in group["params"]} == trainable
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in adapter_parameters(model).values())

    result = fit(model, tmp_path, steps=12)
    after = result.final_perplexity
    assert after < 0.85 * before, f"held-out perplexity {before:.1f} -> {after:.1f}"
    assert base_hash(model) == before_hash

    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert "model.safetensors" not in files and "config.json" not in files  # never the frozen base
    base_bytes = (MODEL_DIR / "model.safetensors").stat().st_size
    assert files["adapter_model.safetensors"] < 1_000_000 and files[TRAINER_STATE] < base_bytes / 3
    reloaded = optkit.from_pretrained(MODEL_DIR, dtype=torch.float32, adapter=tmp_path)
    ids = held_out_windows()[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)


def test_interrupted_lora_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    settings = {"batch_size": 2, "seq_len": 32, "save_every": 2}
    straight = fit(lora_model(r=2), tmp_path / "straight", steps=4, **settings)

    real_step = training._train_step

    def crash_at_step_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "_train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        fit(lora_model(r=2), tmp_path / "resumed", steps=4, **settings)
    monkeypatch.setattr(training, "_train_step", real_step)
    resumed = fit(lora_model(r=2), tmp_path / "resumed", steps=4, **settings)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    expected = adapter_parameters(straight.model)
    for name, param in adapter_parameters(resumed.model).items():
        assert torch.equal(param, expected[name]), name


def test_resuming_with_other_adapters_or_none_is_refused(tmp_path):
    fit(lora_model(r=2), tmp_path, steps=1, batch_size=1, seq_len=16)
    with pytest.raises(optkit.CheckpointError, match="holds a LoRA adapter checkpoint, but this model has no adapters"):
        fit(optkit.from_pretrained(MODEL_DIR, dtype=torch.float32), tmp_path, steps=2, batch_size=1, seq_len=16)
    with pytest.raises(optkit.CheckpointError, match="the saved adapter does not fit this model's adapters"):
        fit(lora_model(r=4), tmp_path, steps=2, batch_size=1, seq_len=16)


@pytest.mark.skipif(bool(int8_reasons), reason=f"int8 linear unavailable: {int8_reasons}")
def test_int8_base_lora_trains_on_cpu_with_gradients_only_in_adapters(tmp_path):
    model = lora_model(linear="int8", r=4)
    assert type(model.decoder.layers[0].self_attn.q_proj.base).__name__ == "Int8Linear"
    ids = held_out_windows(32)[:2]
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_parameters(model))
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B.default.weight"))
    model.zero_grad(set_to_none=True)
    before_hash, before = base_hash(model), {n: p.clone() for n, p in adapter_parameters(model).items()}
    # the training text's own windows (3 steps' losses come from 3 random batches, too noisy to compare)
    seen = eval_windows(encode_documents(load_tokenizer(MODEL_DIR), [TRAIN_TEXT], 2), seq_len=32, max_windows=16)
    perplexity_before = perplexity(model, seen)
    fit(model, tmp_path, steps=3, batch_size=2, seq_len=32)
    assert base_hash(model) == before_hash
    assert all(not torch.equal(p, before[n]) for n, p in adapter_parameters(model).items() if "lora_B" in n)
    assert perplexity(model, seen) < perplexity_before
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()


def test_cli_trains_lora_adapters_on_a_checkpoint_and_resumes(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.md").write_text(TRAIN_TEXT, encoding="utf-8")
    (tmp_path / "held.md").write_text(HELD_OUT, encoding="utf-8")
    argv = ["train", "--model", str(MODEL_DIR), "--lora-r", "2", "--lora-alpha", "4", "--lora-dropout", "0.05",
            "--lora-targets", "q_proj,fc2", "--data", str(data), "--eval-data", str(tmp_path / "held.md"),
            "--out", str(tmp_path / "run"), "--batch-size", "1", "--seq-len", "16", "--eval-every", "2"]
    assert main([*argv, "--steps", "2"]) == 0
    assert "adapter (PEFT format) in" in capsys.readouterr().out
    config = (tmp_path / "run" / "adapter_config.json").read_text()
    assert '"r": 2' in config and '"lora_dropout": 0.05' in config and '"fc2"' in config
    assert main([*argv, "--steps", "3"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_cli_lora_errors_name_the_option(tmp_path, capsys):
    common = ["train", "--model", str(MODEL_DIR), "--data", str(MODEL_DIR / "heldout.txt"), "--out", str(tmp_path)]
    assert main([*common, "--lora-targets", "q_proj"]) == 2
    assert "--lora-targets: LoRA option(s) given without --lora-r" in capsys.readouterr().err
    assert main([*common, "--lora-r", "2", "--lora-targets", "q_proj,qkv"]) == 2
    err = capsys.readouterr().err
    assert "unknown name(s) ['qkv']" in err and "q_proj, k_proj, v_proj, out_proj, fc1, fc2" in err


# -- memory per method (docs/fine-tuning.md's table) -------------------------------------------------------------
def test_memory_counts_are_the_models_own_and_the_methods_add_up():
    from optkit.adapters.memory import count, estimate, memory_table

    counts = count("opt-tiny", r=8, target_modules=["q_proj", "v_proj"])
    model = optkit.build("opt-tiny").add_adapter(r=8, alpha=8, target_modules=["q_proj", "v_proj"])
    assert counts.parameters == model.num_parameters() - counts.adapter_parameters
    assert counts.adapter_parameters == sum(p.numel() for p in adapter_parameters(model).values()) == 2 * 2 * 8 * 128
    h, ffn, layers = 64, 128, 2  # opt-tiny: q/k/v/out are h x h, fc1 h x ffn, fc2 ffn x h
    assert counts.projection_weights == layers * (4 * h * h + 2 * h * ffn)
    assert counts.projection_rows == layers * (4 * h + ffn + h)
    projected = count("opt-tiny-350m-style")  # + project_in (32 -> 64) and project_out (64 -> 32)
    assert projected.projection_weights == counts.projection_weights + 2 * 32 * 64

    n, a, w = counts.parameters, counts.adapter_parameters, counts.projection_weights
    full, lora = estimate(counts, "full"), estimate(counts, "lora")
    assert (full.weights, full.gradients, full.optimizer, full.total) == (4 * n, 4 * n, 8 * n, 16 * n)
    assert (lora.weights, lora.adapter, lora.gradients) == (2 * n, 16 * a, 0)
    int8 = estimate(counts, "int8+lora")
    assert int8.weights == 2 * (n - w) + w + 4 * counts.projection_rows
    nf4, nf4_dq = estimate(counts, "nf4+lora"), estimate(counts, "nf4+lora", double_quant=True)
    assert nf4.weights == 2 * (n - w) + w // 2 + 4 * (w // 64)
    assert nf4_dq.total < nf4.total < int8.total < lora.total < full.total
    with pytest.raises(optkit.InputError, match="unknown fine-tuning method 'qlora'; choose one of full, lora"):
        estimate(counts, "qlora")
    assert "| opt-tiny | 0.1 M |" in memory_table(["opt-tiny"])


def test_fine_tuning_doc_shows_the_computed_table():
    from optkit.adapters.memory import memory_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    rows = memory_table(["opt-125m", "opt-350m"]).splitlines()
    assert all(row in doc for row in rows), "docs/fine-tuning.md's memory table is out of date"
