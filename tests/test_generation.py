"""optkit.generation against transformers' ``generate`` on tiny random OPT models (same weights).

The models use ``init_std=0.2`` (OPT's is 0.02): with tiny random weights at 0.02 greedy decoding
repeats one token forever, which would let a wrong step, position or cache slip through.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import batch, make_text_model_dir, saved_pair
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit.errors import InputError
from optkit.generation import (
    no_repeat_ngram,
    repetition_penalty,
    suppress_eos,
    temperature_scaling,
    top_k_filter,
    top_p_filter,
)
from optkit.streaming import TextStreamer
from optkit.tokenizer import Tokenizer

SEEDS = (0, 1, 2)
PAD = 1
PROMPT = 7  # padded prompt length of hf_oracle.batch(..., length=PROMPT)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory):
    """seed -> (transformers model, optkit model) with identical weights."""
    return {seed: saved_pair(tmp_path_factory.mktemp(f"pair{seed}"), seed=seed, init_std=0.2) for seed in SEEDS}


def prompts(seed: int):
    """3 rows, left padded by 0 / 2 / 4 tokens."""
    return batch(seed, batch_size=3, length=PROMPT)


def assert_same(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == torch.long
    assert actual.shape == expected.shape and torch.equal(actual, expected), f"\nexpected\n{expected}\ngot\n{actual}"


def both(pair, ids, mask, **kwargs):
    hf, ok = pair
    return hf.generate(ids, attention_mask=mask, **kwargs), ok.generate(ids, attention_mask=mask, **kwargs)


def frequent_token(pair, seed: int) -> int:
    """A token greedy decoding emits early in row 0: as EOS it ends some rows and beams, not all."""
    ids, mask = prompts(seed)
    free = pair[1].generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    return int(free[0, PROMPT + 2])


# -- greedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_left_padded_batch_matches_transformers(pairs, seed):
    ids, mask = prompts(seed)
    expected, actual = both(pairs[seed], ids, mask, max_new_tokens=12, eos_token_id=2, pad_token_id=PAD)
    assert_same(expected, actual)
    assert len(set(actual[:, PROMPT:].flatten().tolist())) >= 4  # the test would see a wrong token


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_rows_stop_at_eos_and_are_padded(pairs, seed):
    ids, mask = prompts(seed)
    eos = frequent_token(pairs[seed], seed)
    expected, actual = both(pairs[seed], ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    assert_same(expected, actual)
    new = actual[0, PROMPT:].tolist()
    end = new.index(eos)
    assert end <= 2 and all(t == PAD for t in new[end + 1:])
    alone = pairs[seed][1].generate(ids[:1], max_new_tokens=12, eos_token_id=eos)
    assert alone.shape[1] == PROMPT + end + 1  # all rows done: generation stops early


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_unpadded_prompts_of_several_lengths(pairs, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for length in (1, 4, 11):
        ids = torch.randint(3, 99, (2, length), generator=g)
        expected, actual = both(pairs[seed], ids, torch.ones_like(ids), max_new_tokens=9, eos_token_id=2,
                                pad_token_id=PAD)
        assert_same(expected, actual)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_left_padded_row_equals_the_row_alone(pairs, data):
    """Every row of a left-padded batch gets exactly the tokens it gets alone (EOS and padding included)."""
    model = pairs[data.draw(st.sampled_from(SEEDS))][1]
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    rows = [data.draw(st.lists(st.integers(3, 98), min_size=n, max_size=n)) for n in lengths]
    eos = data.draw(st.integers(3, 98))
    width = max(lengths)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD)
    for row, tokens in enumerate(rows):
        alone = model.generate(torch.tensor([tokens]), max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD)[0]
        new_alone, new_batch = alone[len(tokens):].tolist(), out[row, width:].tolist()
        assert new_batch[:len(new_alone)] == new_alone
        assert all(t == PAD for t in new_batch[len(new_alone):])


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_default_length_is_20_new_tokens_within_the_positions(pairs):
    """transformers 5.x: without max_length/max_new_tokens, 20 new tokens, capped at max positions."""
    ids, mask = prompts(0)
    expected, actual = both(pairs[0], ids, mask, eos_token_id=2, pad_token_id=PAD)
    assert_same(expected, actual)
    assert pairs[0][1].generate(ids, attention_mask=mask, eos_token_id=[]).shape == (3, PROMPT + 20)
    long = torch.randint(3, 99, (1, 55))
    expected, actual = both(pairs[0], long, torch.ones_like(long), eos_token_id=[], pad_token_id=PAD)
    assert_same(expected, actual)
    assert actual.shape == (1, 64)


def test_max_length_counts_the_prompt_and_max_new_tokens_wins(pairs):
    ids, mask = prompts(1)
    expected, actual = both(pairs[1], ids, mask, max_length=12, eos_token_id=[], pad_token_id=PAD)
    assert_same(expected, actual)
    assert actual.shape[1] == 12
    out = pairs[1][1].generate(ids, attention_mask=mask, max_length=12, max_new_tokens=3, eos_token_id=[])
    assert out.shape[1] == PROMPT + 3


@pytest.mark.parametrize("seed", SEEDS)
def test_min_new_tokens_holds_back_eos(pairs, seed):
    ids, mask = prompts(seed)
    free = pairs[seed][1].generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])
    eos = int(free[0, PROMPT])  # row 0 would end at once
    expected, actual = both(pairs[seed], ids, mask, max_new_tokens=10, min_new_tokens=4, eos_token_id=eos,
                            pad_token_id=PAD)
    assert_same(expected, actual)
    assert eos not in actual[:, PROMPT:PROMPT + 4].tolist()[0]


def test_mask_is_inferred_from_pad_tokens_like_transformers(pairs):
    ids, _ = prompts(2)
    hf, ok = pairs[2]
    expected = hf.generate(ids, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD)
    assert_same(expected, ok.generate(ids, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD))


@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7, no_repeat_ngram_size=3),
    dict(no_repeat_ngram_size=2, min_new_tokens=3),
], ids=["rep", "rep-ngram", "ngram-min"])
@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_with_processors_matches_transformers(pairs, seed, options):
    ids, mask = prompts(seed)
    eos = frequent_token(pairs[seed], seed)
    expected, actual = both(pairs[seed], ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD,
                            **options)
    assert_same(expected, actual)


def test_static_cache_and_sdpa_give_the_same_tokens(pairs, tmp_path):
    hf, ok = pairs[0]
    hf.save_pretrained(tmp_path)
    ids, mask = prompts(0)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=frequent_token(pairs[0], 0), pad_token_id=PAD)
    for beams in (1, 3):
        expected = ok.generate(ids, num_beams=beams, **kwargs)
        for options in (dict(kv_cache="static"), dict(attention="sdpa")):
            other = optkit.from_pretrained(tmp_path, **options)
            assert_same(expected, other.generate(ids, num_beams=beams, **kwargs))


# -- beam search -------------------------------------------------------------------------------
BEAM_CASES = [  # num_beams, length_penalty, early_stopping, num_return_sequences
    (2, 1.0, False, 1),
    (2, 0.0, True, 2),
    (3, 2.0, False, 3),
    (3, -1.0, True, 2),
    (4, 1.0, True, 4),
    (4, 0.5, False, 1),
    (4, 1.5, "never", 3),
    (3, -0.5, "never", 2),
]


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, returned", BEAM_CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_beam_search_matches_transformers(pairs, seed, num_beams, length_penalty, early_stopping, returned):
    ids, mask = prompts(seed)
    eos = frequent_token(pairs[seed], seed)
    expected, actual = both(pairs[seed], ids, mask, max_new_tokens=10, num_beams=num_beams,
                            length_penalty=length_penalty, early_stopping=early_stopping,
                            num_return_sequences=returned, eos_token_id=eos, pad_token_id=PAD)
    assert_same(expected, actual)
    assert actual.shape[0] == 3 * returned


def test_beam_search_finishes_hypotheses_at_different_lengths(pairs):
    """Guard on the cases above: EOS does end some beams early, so finished-beam handling is exercised."""
    ids, mask = prompts(1)
    eos = frequent_token(pairs[1], 1)
    out = pairs[1][1].generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=4, num_return_sequences=4,
                               eos_token_id=eos, pad_token_id=PAD)
    ends = {row[PROMPT:].tolist().index(eos) if eos in row[PROMPT:].tolist() else None for row in out}
    assert len(ends) >= 3


def test_beam_search_with_processors_matches_transformers(pairs):
    ids, mask = prompts(2)
    expected, actual = both(pairs[2], ids, mask, max_new_tokens=10, num_beams=3, num_return_sequences=2,
                            no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=2,
                            eos_token_id=frequent_token(pairs[2], 2), pad_token_id=PAD)
    assert_same(expected, actual)


# -- sampling ----------------------------------------------------------------------------------
SAMPLING_CASES = [
    dict(),  # transformers' default top_k=50 applies
    dict(temperature=0.7, top_k=10),
    dict(top_p=0.8, temperature=1.3, top_k=0),
    dict(num_return_sequences=3, top_k=5, top_p=0.9),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=2),
    dict(num_beams=3, num_return_sequences=2, top_k=8),
]


@pytest.mark.parametrize("options", SAMPLING_CASES, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("seed", SEEDS)
def test_sampling_matches_transformers_with_the_same_global_seed(pairs, seed, options):
    """generator=None draws from torch's global RNG exactly as transformers does."""
    ids, mask = prompts(seed)
    hf, ok = pairs[seed]
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, eos_token_id=2, pad_token_id=PAD, **options)
    torch.manual_seed(seed)
    expected = hf.generate(ids, **kwargs)
    torch.manual_seed(seed)
    assert_same(expected, ok.generate(ids, **kwargs))


def test_sampling_is_reproducible_with_a_generator(pairs):
    ids, mask = prompts(0)
    model = pairs[0][1]

    def sample(seed: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0,
                              num_return_sequences=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not all(torch.equal(sample(7), sample(s)) for s in (8, 9, 10))


def first_token_distribution(model, ids, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return (model(ids).logits[0, -1] / temperature).softmax(-1)


def sampled_first_tokens(model, ids, n: int = 400, **options) -> torch.Tensor:
    out = model.generate(ids, max_new_tokens=1, do_sample=True, num_return_sequences=n, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0), **options)
    return out[:, -1]


def test_top_k_restricts_the_support(pairs):
    model, ids = pairs[0][1], torch.tensor([[5, 17, 42, 8]])
    probs = first_token_distribution(model, ids, temperature=3.0)
    top3 = set(probs.topk(3).indices.tolist())
    free = sampled_first_tokens(model, ids, temperature=3.0, top_k=0)
    assert len(set(free.tolist())) > 6  # without top-k, flattened: many tokens appear
    restricted = sampled_first_tokens(model, ids, temperature=3.0, top_k=3)
    assert set(restricted.tolist()) <= top3 and len(set(restricted.tolist())) >= 2
    kept = probs[list(top3)] / probs[list(top3)].sum()
    best = probs.argmax()
    assert abs((restricted == best).float().mean() - kept.max()) < 0.1  # renormalised over the top k


def test_top_p_restricts_the_support(pairs):
    model, ids = pairs[0][1], torch.tensor([[5, 17, 42, 8]])
    probs = first_token_distribution(model, ids, temperature=1.0)
    ranked = probs.sort(descending=True)
    nucleus = set(ranked.indices[:int((ranked.values.cumsum(0) < 0.5).sum()) + 1].tolist())  # mass >= 0.5
    assert 3 < len(nucleus) < 30
    free = sampled_first_tokens(model, ids, top_k=0)
    assert not set(free.tolist()) <= nucleus
    sampled = set(sampled_first_tokens(model, ids, top_k=0, top_p=0.5).tolist())
    assert sampled <= nucleus and len(sampled) >= 3


# -- the processors, one by one, against transformers' classes ---------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(3, 30), length=st.integers(1, 12))
def test_processors_match_transformers(seed, vocab, length):
    from transformers.generation import logits_process as hf

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, vocab, generator=g) * 3
    ids = torch.randint(0, min(vocab, 4), (3, length), generator=g)  # few distinct ids: repeats happen
    start = torch.randint(0, length, (3,), generator=g)
    k, p, n = int(torch.randint(1, vocab + 1, ())), float(torch.rand((), generator=g)) * 0.9 + 0.05, 1 + seed % 3
    pairs = [
        (repetition_penalty(1.7, start), hf.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=start)),
        (repetition_penalty(0.6, start), hf.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=start)),
        (no_repeat_ngram(n, torch.zeros(3, dtype=torch.long)), hf.NoRepeatNGramLogitsProcessor(n)),
        (suppress_eos(3, length - 1, [0, 2]), hf.MinNewTokensLengthLogitsProcessor(length - 1, 3, [0, 2])),
        (temperature_scaling(0.6), hf.TemperatureLogitsWarper(0.6)),
        (top_k_filter(k), hf.TopKLogitsWarper(k)),
        (top_k_filter(1, min_keep=2), hf.TopKLogitsWarper(1, min_tokens_to_keep=2)),
        (top_p_filter(p), hf.TopPLogitsWarper(p)),
        (top_p_filter(p, min_keep=2), hf.TopPLogitsWarper(p, min_tokens_to_keep=2)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone()))


def test_no_repeat_ngram_ignores_left_padding():
    """Unlike transformers, n-grams never span the padding, so a padded row is processed as if alone."""
    ids = torch.tensor([[PAD, PAD, 7, PAD, 7]])
    scores = torch.zeros(1, 10)
    banned = no_repeat_ngram(2, torch.tensor([2]))(ids, scores)
    assert torch.isinf(banned[0, PAD])  # "7 1" was seen after the padding
    alone = no_repeat_ngram(2, torch.tensor([0]))(ids[:, 2:], scores)
    assert torch.equal(banned, alone)


# -- errors: one InputError, before any compute -------------------------------------------------
LONG = torch.randint(3, 99, (1, 65))
ERRORS = [
    (dict(max_new_tokens=-1), "max_new_tokens=-1: must be a positive integer"),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be a positive integer"),
    (dict(max_length=-5), "max_length=-5: must be a positive integer"),
    (dict(max_length=5), "max_length=5 counts the prompt, which already has 7 tokens; pass max_new_tokens"),
    (dict(min_new_tokens=-2, max_new_tokens=3), "min_new_tokens=-2: must be an integer >= 0"),
    (dict(top_p=0.0, do_sample=True, max_new_tokens=3), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(top_p=1.5, do_sample=True, max_new_tokens=3), r"top_p=1.5: must be in \(0, 1\]"),
    (dict(temperature=0.0, do_sample=True, max_new_tokens=3), "temperature=0.0: must be > 0 when sampling"),
    (dict(temperature=-1.0, do_sample=True, max_new_tokens=3), "temperature=-1.0: must be > 0 when sampling"),
    (dict(top_k=-1, do_sample=True, max_new_tokens=3), "top_k=-1: must be an integer >= 0"),
    (dict(repetition_penalty=0.0, max_new_tokens=3), "repetition_penalty=0.0: must be > 0"),
    (dict(no_repeat_ngram_size=-1, max_new_tokens=3), "no_repeat_ngram_size=-1: must be an integer >= 0"),
    (dict(num_beams=0, max_new_tokens=3), "num_beams=0: must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3, max_new_tokens=3),
     "num_return_sequences=3 > num_beams=2: beam search returns at most num_beams"),
    (dict(num_return_sequences=2, max_new_tokens=3), "num_return_sequences=2 with greedy search"),
    (dict(num_return_sequences=0, max_new_tokens=3), "num_return_sequences=0: must be an integer >= 1"),
    (dict(early_stopping="sometimes", num_beams=2, max_new_tokens=3), "early_stopping='sometimes'"),
    (dict(max_new_tokens=60), r"prompt \(7 tokens\) \+ new tokens = 67 exceeds the model's 64 positions "
                              r"\(max_new_tokens=60\); use max_new_tokens <= 57"),
    (dict(max_length=100), "new tokens = 100 exceeds the model's 64 positions"),
    (dict(eos_token_id=500, max_new_tokens=3), r"eos_token_id=500: outside the vocabulary \(0..98\)"),
    (dict(pad_token_id=-3, max_new_tokens=3), "pad_token_id=-3: outside the vocabulary"),
    (dict(streamer=object(), max_new_tokens=3), "streamer: streaming needs one sequence"),
    (dict(attention_mask=torch.ones(3, 5, dtype=torch.long), max_new_tokens=3), "attention_mask: shape"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS, ids=[m.split(":")[0][:30] for _, m in ERRORS])
def test_bad_arguments_raise_one_input_error_before_compute(pairs, monkeypatch, kwargs, message):
    model = pairs[0][1]
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model despite bad arguments"))
    ids, _ = prompts(0)
    kwargs = {"attention_mask": torch.ones_like(ids), **kwargs}
    with pytest.raises(InputError, match=message):
        model.generate(ids, **kwargs)


@pytest.mark.parametrize("ids, kwargs, message", [
    (LONG, dict(max_new_tokens=1), r"the prompt has 65 tokens but the model has only 64 positions \(no room for "
                                   r"new tokens\); shorten the prompt"),
    (LONG[:, :64], {}, r"the prompt has 64 tokens but the model has only 64 positions"),
    (torch.tensor([[5, 120, 7]]), dict(max_new_tokens=2), r"input_ids: token id 120 is outside the vocabulary"),
    (torch.tensor([5, 6, 7]), dict(max_new_tokens=2), r"input_ids: expected an integer tensor of shape"),
    (torch.tensor([[5.0, 6.0]]), dict(max_new_tokens=2), r"input_ids: expected an integer tensor"),
])
def test_bad_prompts(pairs, monkeypatch, ids, kwargs, message):
    model = pairs[0][1]
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model despite bad arguments"))
    with pytest.raises(InputError, match=message):
        model.generate(ids, **kwargs)


def test_several_problems_are_listed_in_one_error(pairs):
    ids, mask = prompts(0)
    with pytest.raises(InputError, match=r"bad generate\(\) arguments: max_new_tokens=-1.*; top_p=2"):
        pairs[0][1].generate(ids, attention_mask=mask, max_new_tokens=-1, top_p=2)


def test_temperature_is_ignored_without_sampling(pairs):
    ids, mask = prompts(0)
    model = pairs[0][1]
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=4, temperature=0.0))


# -- streaming ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory):
    directory = make_text_model_dir(tmp_path_factory.mktemp("text_model"))
    return optkit.from_pretrained(directory), Tokenizer.from_pretrained(directory)


class RecordingStreamer:
    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def test_streamer_receives_prompt_then_one_token_per_step(text_model):
    model, tokenizer = text_model
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=9, eos_token_id=[], streamer=streamer)
    assert streamer.puts[0] == ids.tolist()
    assert streamer.puts[1:] == [[t] for t in out[0, ids.shape[1]:].tolist()]
    assert streamer.ended == 1


@pytest.mark.parametrize("prompt", ["Hello world", "café 日本語 😀", "the quick brown fox"])
def test_streamed_text_equals_the_final_decode(text_model, prompt):
    model, tokenizer = text_model
    chunks: list[str] = []
    streamer = TextStreamer(tokenizer, on_text=lambda text, final: chunks.append(text))
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=True, top_k=0, streamer=streamer,
                         generator=torch.Generator().manual_seed(3))
    known = [i for i in out[0].tolist() if i < len(tokenizer)]  # the model has 800 rows, the tokenizer fewer ids
    assert "".join(chunks) == tokenizer.decode(known)
    assert len(chunks) > 3
