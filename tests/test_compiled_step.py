"""The compiled decode step (``generate(compile=True)``) computes what the plain decode loop computes.

torch.compile runs inductor here, which writes C++ on CPU: these tests need a C++ compiler and skip,
saying so, without one. Each compilation of a tiny model takes 10-30 s on the CI machine, so the
tests share the few compilations they need, and each test that compiles is marked ``slow`` (run by
default and in CI; ``-m "not slow"`` leaves them out of a quick local run). The CUDA case (marker
``cuda``) also replays the graph captured around the compiled step.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import optkit
from optkit import inference
from optkit.inference import DecodeStep, decode_graph
from optkit.inference.compiled import compile_step, inductor_with_gemv
from optkit.errors import InputError
from optkit.generation import _forward_last
from tests.helpers import batch, saved_pair

NEW = 12
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile (inductor) on CPU needs a C++ compiler (g++ or c++)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Shared on purpose, so the compilations are too: tests only generate with it (which prepares the
    model in place, idempotently) and never change its backend, mode or dtype."""
    return saved_pair(tmp_path_factory.mktemp("compiled"), seed=3, init_std=0.2, attention="sdpa")


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs)


def hf_greedy(hf, ids, mask):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                       pad_token_id=1)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("rows", [1, 3])  # one row: the projections become inductor reductions
def test_compiled_step_gives_transformers_tokens(pair, rows):
    hf, model = pair
    ids, mask = batch(rows, batch_size=rows, length=7)  # rows padded by 0 / 2 / 4
    expected = hf_greedy(hf, ids, mask)
    assert torch.equal(greedy(model, ids, mask, compile=True), expected)
    assert torch.equal(greedy(model, ids, mask, decode_graph=False), expected)


@pytest.mark.slow
@needs_compiler
def test_compiled_step_logits_equal_the_plain_steps(pair):
    """Same numbers within fp32 rounding (the reductions sum in another order than the BLAS GEMV)."""
    _, model = pair
    ids, mask = batch(5, batch_size=1, length=7)
    total = ids.shape[1] + 6
    plain_cache = model.new_cache(1, max_length=total, kind="static")
    length = decode_graph.padded_length(total, compiled=True)
    assert length == decode_graph.COMPILED_LENGTH_STEP  # rounded up: fewer recompilations
    step = DecodeStep(model, model.new_cache(1, max_length=length, kind="static"), 1, run=compile_step())
    with torch.no_grad():
        inference.prepare(model)
        first = _forward_last(model, ids, mask, plain_cache)
        _forward_last(model, ids, mask, step.cache)
        step.start(mask)
        token, grown = first.argmax(-1), mask
        for _ in range(5):
            grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=1)
            expected = _forward_last(model, token[:, None], None, plain_cache)
            got = step(token)
            assert float((got - expected).abs().max()) <= 1e-5
            token = expected.argmax(-1)


def one_row_code(module, x):
    compiled = torch.compile(module, backend=inductor_with_gemv, dynamic=False)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
    return out, code[0][code[0].index("def call"):]


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_products_become_reductions_and_others_stay_gemms(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    mlp = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.randn(1, 48)
    out, code = one_row_code(mlp, x)
    assert "extern_kernels" not in code  # one fused reduction kernel, no BLAS call
    with torch.no_grad():
        assert float((out - mlp(x)).abs().max()) <= 1e-6
    rows = torch.randn(4, 48)
    out, code = one_row_code(mlp, rows)
    assert "extern_kernels.addmm" in code or "extern_kernels.mm" in code  # several rows: a real GEMM
    with torch.no_grad():
        assert float((out - mlp(rows)).abs().max()) <= 1e-6


@pytest.mark.slow
@needs_compiler
def test_one_row_reduction_rounds_once_in_reduced_precision():
    """bf16 in, fp32 sums, one rounding at the end: as close to the fp32 result as bf16 allows."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    out, _ = one_row_code(layer, x)
    with torch.no_grad():
        exact = x.float() @ layer.weight.float().t() + layer.bias.float()
    assert out.dtype == torch.bfloat16
    assert float((out.float() - exact).abs().max()) <= float(exact.abs().max()) * 2**-8


def test_compile_explains_what_it_cannot_do(pair):
    _, model = pair
    ids, mask = batch(0, batch_size=2, length=5)
    with pytest.raises(InputError, match="decode_graph=False"):
        greedy(model, ids, mask, compile=True, decode_graph=False)
    with pytest.raises(InputError, match="compile=True: kv_cache 'dynamic'"):
        greedy(model, ids, mask, compile=True, cache_implementation="dynamic")
    with pytest.raises(InputError, match="compile=True: beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, compile=True)


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_compiled_graph_equals_the_plain_loop(tmp_path):
    hf, model = saved_pair(tmp_path, seed=3, init_std=0.2)
    hf = hf.to("cuda")
    model = optkit.from_pretrained(tmp_path / "hf-causal_lm-3", attention="sdpa", device="cuda")
    for rows in (1, 3):
        ids, mask = (t.cuda() for t in batch(rows, batch_size=rows, length=7))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail instead
            compiled = greedy(model, ids, mask, compile=True)
        assert model.inference_session.kept_step.graph is not None, "the compiled step was not captured"
        assert torch.equal(compiled, greedy(model, ids, mask, decode_graph=False))
        assert torch.equal(compiled, hf_greedy(hf, ids, mask))
        assert torch.equal(greedy(model, ids, mask, compile=True), compiled)  # the kept graph, replayed
