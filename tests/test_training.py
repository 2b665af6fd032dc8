"""optkit.training: a tiny model on a tiny synthetic corpus (fast; the whole file takes seconds).

What must hold for the bundled model to be trustworthy: loss goes down, a seed fixes the loss
curve bit for bit, an interrupted run resumes to the very same weights, and the pieces the loop
leans on (dropout modes, gradient checkpointing, ignored labels) behave.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import optkit
from optkit import training
from optkit.cli import main as cli_main
from optkit.training import TRAINER_STATE, lr_factor, parameter_groups, train, train_bpe

TINY = {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "max_positions": 64}
FAST = dict(steps=24, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=4, eval_every=8, eval_fraction=0.25,
            log_every=1000)


def synthetic_documents(count: int = 24) -> list[str]:
    """Small, very regular Python-like documents: easy to learn, so the loss must fall."""
    docs = []
    for i in range(count):
        lines = [f"def func_{i}_{j}(value):\n    return value + {j}\n" for j in range(6)]
        docs.append(f"# module {i}\n" + "\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return train_bpe(synthetic_documents(), vocab_size=TINY["vocab_size"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One file per document, so the held-out split is by document."""
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, doc in enumerate(synthetic_documents()):
        paths.append(root / f"doc{i:02d}.py")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


def tiny_spec(**decoder: object) -> optkit.ModelSpec:
    return optkit.load_spec("opt-tiny", decoder={**TINY, "dropout": 0.0, **decoder})


def run(out_dir: Path, corpus: list[Path], tokenizer: object, **overrides: object) -> training.TrainResult:
    settings = {**FAST, **overrides}
    spec = settings.pop("spec", None) or tiny_spec()
    return train(spec, corpus, out_dir=out_dir, tokenizer=tokenizer, **settings)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the loop ------------------------------------------------------------------------------------
def test_loss_goes_down_and_checkpoint_is_complete(tmp_path, corpus, tokenizer):
    result = run(tmp_path, corpus, tokenizer)
    assert len(result.losses) == FAST["steps"] and result.step == FAST["steps"]
    assert sum(result.losses[-4:]) / 4 < 0.6 * result.losses[0]
    assert [step for step, _ in result.evals] == [8, 16, 24]
    assert result.evals[-1][1] < result.evals[0][1] < TINY["vocab_size"]
    for name in ("config.json", "model.safetensors", TRAINER_STATE, "vocab.json", "merges.txt"):
        assert (tmp_path / name).is_file(), name
    state = torch.load(tmp_path / TRAINER_STATE, weights_only=True)  # plain tensors and numbers only
    assert state["step"] == FAST["steps"] and state["losses"].tolist() == result.losses
    reloaded = optkit.from_pretrained(tmp_path)
    for key, value in result.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_same_seed_gives_bitwise_same_losses(tmp_path, corpus, tokenizer):
    spec = tiny_spec(dropout=0.1, attention_dropout=0.1)  # the RNG matters: dropout is on
    first = run(tmp_path / "a", corpus, tokenizer, spec=spec, steps=10, seed=3)
    second = run(tmp_path / "b", corpus, tokenizer, spec=spec, steps=10, seed=3)
    other = run(tmp_path / "c", corpus, tokenizer, spec=spec, steps=10, seed=4)
    assert first.losses == second.losses
    assert first.losses != other.losses


def test_resume_after_interruption_gives_the_same_weights(tmp_path, corpus, tokenizer, monkeypatch):
    spec = tiny_spec(dropout=0.1)
    straight = run(tmp_path / "straight", corpus, tokenizer, spec=spec, steps=16, eval_every=5)

    real_step = training._train_step

    def crash_at_step_12(*args, **kwargs):
        if args[-1] == 12:  # the step index
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "_train_step", crash_at_step_12)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", corpus, tokenizer, spec=spec, steps=16, eval_every=5)
    monkeypatch.setattr(training, "_train_step", real_step)
    assert torch.load(tmp_path / "resumed" / TRAINER_STATE, weights_only=True)["step"] == 10
    resumed = run(tmp_path / "resumed", corpus, tokenizer, spec=spec, steps=16, eval_every=5)
    assert resumed.resumed_from == 10
    assert resumed.losses == straight.losses
    expected = weights(straight.model)
    for key, value in weights(resumed.model).items():
        assert torch.equal(value, expected[key]), key


def test_weights_and_trainer_state_are_saved_as_one(tmp_path, corpus, tokenizer, monkeypatch):
    first = run(tmp_path, corpus, tokenizer, steps=4, eval_every=4)
    saved = weights(optkit.from_pretrained(tmp_path))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith(TRAINER_STATE) or TRAINER_STATE in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(optkit.CheckpointError, match=TRAINER_STATE):
        training.save_checkpoint(first.model, torch.optim.SGD(first.model.parameters(), lr=1.0),
                                 torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1),
                                 {"step": 99}, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert training.load_checkpoint(tmp_path)["step"] == 4  # the old state, with the old weights
    assert all(torch.equal(v, saved[k]) for k, v in weights(optkit.from_pretrained(tmp_path)).items())
    (tmp_path / "config.json").unlink()  # as a save killed between its first and last rename leaves it
    with pytest.raises(optkit.CheckpointError, match="interrupted"):
        training.load_checkpoint(tmp_path)


def test_explicit_held_out_corpus_and_no_resume(tmp_path, corpus, tokenizer):
    first = run(tmp_path, corpus[4:], tokenizer, steps=4, eval_every=4, eval_corpus=corpus[:4])
    again = run(tmp_path, corpus[4:], tokenizer, steps=4, eval_every=4, eval_corpus=corpus[:4], resume=False)
    assert again.resumed_from == 0 and again.losses == first.losses


def test_bf16_autocast_trains_fp32_weights_close_to_fp32_training(tmp_path, corpus, tokenizer):
    """mixed_precision="bf16" in one process: the forward runs in bf16 (so the losses differ from fp32 by
    bf16 rounding, not more), the weights, gradients and checkpoint stay fp32, and the run is reproducible."""
    fp32 = run(tmp_path / "fp32", corpus, tokenizer, steps=8)
    bf16 = run(tmp_path / "bf16", corpus, tokenizer, steps=8, mixed_precision="bf16")
    again = run(tmp_path / "again", corpus, tokenizer, steps=8, mixed_precision="bf16")
    assert bf16.losses == again.losses
    assert bf16.losses != fp32.losses  # autocast really ran
    for a, b in zip(fp32.losses, bf16.losses):
        assert abs(a - b) <= 0.02 * a
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    saved = torch.load(tmp_path / "bf16" / TRAINER_STATE, weights_only=True)
    assert saved["config"]["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        run(tmp_path / "bad", corpus, tokenizer, steps=2, mixed_precision="fp8")


def test_stop_at_ends_early_and_a_rerun_finishes_the_same_schedule(tmp_path, corpus, tokenizer):
    """A run in two parts (``stop_at``, then a plain rerun) equals one straight run, weights included."""
    straight = run(tmp_path / "straight", corpus, tokenizer, steps=12, eval_every=4)
    first = run(tmp_path / "parts", corpus, tokenizer, steps=12, eval_every=4, stop_at=8)
    assert first.step == 8 and len(first.losses) == 8
    assert torch.load(tmp_path / "parts" / TRAINER_STATE, weights_only=True)["step"] == 8
    rest = run(tmp_path / "parts", corpus, tokenizer, steps=12, eval_every=4)
    assert rest.resumed_from == 8 and rest.losses == straight.losses
    for key, value in weights(straight.model).items():
        assert torch.equal(weights(rest.model)[key], value), key


def test_vocabulary_mismatch_is_reported(tmp_path, corpus, tokenizer):
    with pytest.raises(ValueError, match="vocabulary"):
        run(tmp_path, corpus, tokenizer, spec=tiny_spec(vocab_size=200))


def test_cli_train_runs_and_resumes(tmp_path, corpus, tokenizer, capsys):
    training.save_opt_tokenizer(tokenizer, tmp_path / "tok")
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(tiny_spec().to_yaml(), encoding="utf-8")
    argv = ["train", "--spec", str(spec_file), "--data", str(corpus[0].parent), "--out", str(tmp_path / "run"),
            "--tokenizer", str(tmp_path / "tok"), "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-fraction", "0.2"]
    assert cli_main(argv + ["--steps", "4"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert cli_main(argv + ["--steps", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / TRAINER_STATE, weights_only=True)["step"] == 6
    missing = argv[:4] + [str(tmp_path / "nowhere")] + argv[5:]
    assert cli_main(missing + ["--steps", "2"]) == 2
    assert "nowhere" in capsys.readouterr().err


# -- the pieces the loop relies on ----------------------------------------------------------------
def test_schedule_warms_up_linearly_then_decays_by_cosine():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert math.isclose(factors[12], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(factors[20], 0.1)


def test_no_weight_decay_on_biases_norms_and_positions():
    model = optkit.build(tiny_spec())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 and "embed_positions" not in names[id(p)]
               for p in decay["params"])
    assert {"decoder.embed_positions.weight", "decoder.layers.0.self_attn.q_proj.bias",
            "decoder.layers.0.final_layer_norm.weight"} <= {names[id(p)] for p in no_decay["params"]}
    counted = len(decay["params"]) + len(no_decay["params"])
    assert counted == len({id(p) for p in model.parameters()})  # the tied LM head is not listed twice


def test_dropout_is_active_only_in_train_mode():
    model = optkit.build(tiny_spec(dropout=0.2, attention_dropout=0.2))
    ids = torch.randint(4, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = optkit.build(tiny_spec(dropout=0.1))
    model.train()
    ids = torch.randint(4, TINY["vocab_size"], (2, 16))

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable(checkpointing)
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in backward
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_labels_minus_100_are_ignored():
    model = optkit.build(tiny_spec()).eval()
    ids = torch.randint(4, TINY["vocab_size"], (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    logits = model(ids).logits
    targets = labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    torch.testing.assert_close(model(ids, labels=labels).loss, expected)
    single = torch.full_like(ids, -100)
    single[1, 5] = ids[1, 5]  # one target: predicted from position 4
    torch.testing.assert_close(model(ids, labels=single).loss, F.cross_entropy(logits[1, 4:5], ids[1, 5:6]))
