"""GPU backends as plugins: flash-attn, xformers, bitsandbytes int8.

Two layers of tests:

* CPU, always: every plugin imports without its library and explains why it cannot run; explicit choices that
  cannot run are errors listing the reasons; ``auto`` picks and logs; the mask -> varlen/bias rewriting that
  flash and xformers rely on is run end to end through pure-torch stand-ins that follow the libraries' documented
  semantics (bottom-right causal, zero rows) and real call signatures, and compared with eager; int8 runs for
  real wherever bitsandbytes supports the CPU.
* ``@pytest.mark.cuda`` plus ``importorskip``: the real kernels against eager, fp16 and bf16, forward and
  backward, model logits, greedy tokens, NaN-freedom, int8 agreement. Run them on a CUDA machine with
  ``python -m pytest tests/test_gpu_backends.py -m cuda -v``.

Tolerances: stand-ins compute in fp32 and must match eager to 1e-5. Real kernels in fp16/bf16 are compared with
eager computed in fp32 on the same (rounded) inputs and must be within twice the error of eager itself run in
that dtype, plus a floor (fp16 1e-3, bf16 8e-3; gradients 4x those floors).
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import optkit
import optkit_flash
import optkit_int8
import optkit_xformers
from optkit.errors import BackendUnavailableError, SpecValidationError
from optkit.interfaces import AttentionMask
from optkit_attention_eager import EagerAttention
from optkit_flash.library import FlashLibrary
from optkit_flash.torch_kernels import TorchKernels
from optkit_flash.varlen import Segments, needs_varlen, plan_for, plan_varlen
from optkit_xformers import Bias, XformersAttention, XformersOps, dense_bias

LIBRARIES = {"flash": "flash_attn", "xformers": "xformers", "int8": "bitsandbytes"}
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture
def no_library(monkeypatch):
    """Make a plugin's library look uninstalled and the machine CUDA-less, whatever this machine has."""
    def block(name: str) -> None:
        for module in [m for m in sys.modules if m == LIBRARIES[name] or m.startswith(LIBRARIES[name] + ".")]:
            monkeypatch.delitem(sys.modules, module)
        monkeypatch.setitem(sys.modules, LIBRARIES[name], None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if name == "flash":  # a CPU-only torch also lacks torch's own flash kernels (implementation "torch")
            monkeypatch.setattr(torch.version, "cuda", None)
        optkit_int8.probe.cache_clear()

    yield block
    optkit_int8.probe.cache_clear()


# -- pure-torch stand-ins with the libraries' documented semantics ------------------------------------------
def bottom_right(n_q: int, n_k: int, device: Any = None) -> Tensor:
    """flash-attn >= 2.1 / xformers *FromBottomRight*: query i of n_q may see keys j <= i + n_k - n_q."""
    i = torch.arange(n_q, device=device)[:, None]
    return torch.arange(n_k, device=device)[None, :] <= i + (n_k - n_q)


def top_left(n_q: int, n_k: int, device: Any = None) -> Tensor:
    """xformers' LowerTriangularMask: query i may see keys j <= i, whatever n_k is."""
    return torch.arange(n_k, device=device)[None, :] <= torch.arange(n_q, device=device)[:, None]


def reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float, p: float = 0.0) -> Tensor:
    """One sequence, (T, H, D): softmax in fp32, rows without keys give zeros (what flash-attn documents)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    if p > 0.0:
        probs = F.dropout(probs, p=p)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def split(cu: Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


class TorchFlash:
    """A `FlashBackend` in pure torch; asserts the invariants the real kernels need."""

    label = "pure-torch flash stand-in"

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def validate(self, query: Tensor, dropout_p: float) -> None:
        pass

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float) -> Tensor:
        self.calls.append(("dense", causal))
        allowed = bottom_right(q.shape[1], k.shape[1]) if causal else None
        return torch.stack([reference(q[b], k[b], v[b], allowed, scale, dropout_p) for b in range(q.shape[0])])

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, seg: Segments, *, scale: float, dropout_p: float) -> Tensor:
        self.calls.append(("varlen", seg.causal))
        assert seg.cu_seqlens_q.dtype == seg.cu_seqlens_k.dtype == torch.int32
        assert int(seg.cu_seqlens_q[-1]) == q.shape[0] and int(seg.cu_seqlens_k[-1]) == k.shape[0]
        outs = []
        for (q0, q1), (k0, k1) in zip(split(seg.cu_seqlens_q), split(seg.cu_seqlens_k)):
            assert 0 < q1 - q0 <= seg.max_seqlen_q and 0 < k1 - k0 <= seg.max_seqlen_k
            assert not seg.causal or k1 - k0 >= q1 - q0  # every query sees a key: no empty rows handed over
            allowed = bottom_right(q1 - q0, k1 - k0) if seg.causal else None
            outs.append(reference(q[q0:q1], k[k0:k1], v[k0:k1], allowed, scale, dropout_p))
        return torch.cat(outs)


class TorchXformers:
    """An `XformersBackend` in pure torch: (B, T, H, D), block-diagonal biases only with batch 1."""

    def __init__(self) -> None:
        self.biases: list[str] = []

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Bias, *, p: float, scale: float) -> Tensor:
        self.biases.append(bias.kind)
        if bias.kind.startswith("block_diagonal"):
            assert q.shape[0] == 1
            causal = bias.kind.endswith("bottom_right")
            return TorchFlash().varlen(q[0], k[0], v[0], _segments(bias, causal), scale=scale, dropout_p=p)[None]
        n_q, n_k = q.shape[1], k.shape[1]
        allowed = {"none": None, "causal": top_left(n_q, n_k), "causal_from_bottom_right": bottom_right(n_q, n_k)}
        return torch.stack([reference(q[b], k[b], v[b], allowed[bias.kind], scale, p) for b in range(q.shape[0])])


def _segments(bias: Bias, causal: bool) -> Segments:
    cu = lambda lens: F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
    return Segments(torch.empty(0), torch.empty(0), cu(bias.q_seqlens), cu(bias.k_seqlens), max(bias.q_seqlens),
                    max(bias.k_seqlens), causal)


# -- masks --------------------------------------------------------------------------------------------------
@st.composite
def mask_case(draw, head_dims=(8, 16, 24)):
    """Random batch/heads/head_dim, cache offset, unwritten static-cache slots, causal or not, padding patterns."""
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from(head_dims))
    causal = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else True
    q_len, past = draw(st.integers(1, 8)), draw(st.integers(0, 6)) if causal else 0
    unwritten = draw(st.integers(0, 3)) if causal else 0
    written = past + q_len
    side = draw(st.sampled_from(["none", "left", "right", "random", "left"]))
    rows = []
    for _ in range(batch):
        pad = draw(st.integers(0, written))
        if side == "random":
            rows.append(draw(st.lists(st.booleans(), min_size=written, max_size=written)))
        else:
            real = [True] * written
            for j in range(pad):
                real[j if side == "left" else written - 1 - j] = side == "none"
            rows.append(real)
    padding = torch.tensor([r + [False] * unwritten for r in rows], dtype=torch.bool)
    if side == "none" and draw(st.booleans()):
        padding = None  # the core passes None when no key is padding; unwritten slots are then cut by causality
    seed = draw(st.integers(0, 2**16))
    return batch, heads, head_dim, q_len, past, written + unwritten, padding, causal, seed


def make_case(case, dtype=torch.float32, device="cpu"):
    batch, heads, head_dim, q_len, past, kv_len, padding, causal, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for n in (q_len, kv_len, kv_len))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    if padding is not None:
        padding = padding.to(device)
    mask = AttentionMask(batch_size=batch, q_len=q_len, kv_len=kv_len, q_offset=past, key_padding=padding,
                         causal=causal)
    return q, k, v, mask


def eager(q, k, v, mask, scale, dropout_p=0.0):
    return EagerAttention()(q, k, v, mask, scale=scale, dropout_p=dropout_p).output


# == CPU: plugins load and explain ==========================================================================
def test_plugins_import_without_their_libraries():
    """In a fresh interpreter where the libraries cannot be imported, the plugins import and explain why."""
    code = """
import sys, torch
sys.modules.update(flash_attn=None, xformers=None, bitsandbytes=None)
torch.version.cuda = None  # no flash kernels inside torch either, whatever build runs this
import optkit_flash, optkit_xformers, optkit_int8
cpu = torch.device("cpu")
print(optkit_flash.check(cpu, torch.float16)[0])
print(optkit_xformers.check(cpu, torch.float16)[0])
print(optkit_int8.check(cpu, torch.float32)[0])
assert all(sys.modules[name] is None for name in ("flash_attn", "xformers", "bitsandbytes"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("flash_attn is not installed") and "pip install 'optkit[flash]'" in lines[0]
    assert lines[1].startswith("xformers is not installed") and "pip install 'optkit[xformers]'" in lines[1]
    assert lines[2].startswith("bitsandbytes is not installed") and "pip install 'optkit[int8]'" in lines[2]


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_attention_reasons_on_cpu_without_library(name, no_library):
    no_library(name)
    reasons = optkit.registry.get("attention", name).unavailable_reasons("cpu", torch.float32)
    text = "; ".join(reasons)
    assert "device cpu (supported: cuda)" in text
    assert "dtype float32 (supported: bfloat16, float16)" in text
    assert f"{LIBRARIES[name]} is not installed" in text and f"pip install 'optkit[{name}]'" in text
    assert "no CUDA device" in text
    assert len(reasons) == (5 if name == "flash" else 4)  # flash: also why torch's own kernels cannot serve


def test_int8_reasons_without_library(no_library):
    no_library("int8")
    entry = optkit.registry.get("linear", "int8")
    assert entry.unavailable_reasons("cpu", torch.float32) == [
        "bitsandbytes is not installed: install it with `pip install 'optkit[int8]'`"]
    cuda = "; ".join(entry.unavailable_reasons("cuda", torch.float16))
    assert "bitsandbytes is not installed" in cuda and "no CUDA device" in cuda


def test_flash_reasons_name_old_gpus_and_missing_cuda(monkeypatch):
    lib = optkit_flash.library
    monkeypatch.setattr(lib, "installed", lambda: {"fa2": "2.8.3"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    assert lib.unavailable_reasons("cuda", torch.float16) == ["compute capability 7.5 of Tesla T4 is below 8.0"]
    monkeypatch.setattr(lib, "installed", lambda: {"fa4": "4.0.0b36"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert lib.unavailable_reasons("cuda", torch.float16) == ["compute capability 8.0 of Tesla T4 is below 9.0"]
    monkeypatch.setattr(lib, "installed", lambda: {"fa2": "2.0.9"})
    assert "needs >= 2.1" in lib.unavailable_reasons("cuda", torch.float16)[0]
    assert lib.choose("auto", {"fa2": "2.8", "fa4": "4.0"}) == "fa2"
    assert lib.choose("fa4", {"fa2": "2.8", "fa4": "4.0"}) == "fa4" and lib.choose("fa4", {"fa2": "2.8"}) is None


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_explicit_attention_that_cannot_run_is_an_error(name, no_library):
    no_library(name)
    with pytest.raises(BackendUnavailableError) as error:
        optkit.build("opt-tiny", attention=name)
    message = str(error.value)
    for part in (f"attention '{name}'", "device cpu", "dtype float32", f"{LIBRARIES[name]} is not installed",
                 "no CUDA device"):
        assert part in message
    model = optkit.build("opt-tiny")
    with pytest.raises(BackendUnavailableError, match=f"attention '{name}' cannot run on cpu"):
        optkit.set_backend(model, attention=name)
    assert model.attention_backend == "eager"


def test_explicit_int8_without_library_is_an_error(no_library):
    no_library("int8")
    with pytest.raises(BackendUnavailableError, match=r"linear 'int8': bitsandbytes is not installed"):
        optkit.build("opt-tiny", linear="int8")


def test_auto_on_cpu_picks_sdpa_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="optkit"):
        model = optkit.build("opt-tiny", attention="auto")
    assert model.attention_backend == "sdpa"
    assert "attention=auto picked 'sdpa' for cpu/torch.float32" in caplog.text


def test_auto_priority_flash_then_xformers_then_sdpa(monkeypatch):
    """With the libraries' own checks faked usable, priorities from registry.yaml decide."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    select = lambda dtype: optkit.registry.select_auto("attention", "cuda", dtype).name  # noqa: E731
    assert select(torch.float16) == "sdpa"
    monkeypatch.setattr(optkit_xformers, "unavailable_reasons", lambda device, dtype: [])
    assert select(torch.float16) == "xformers"
    monkeypatch.setattr(optkit_flash.library, "unavailable_reasons", lambda device, dtype: [])
    assert select(torch.bfloat16) == "flash"
    assert select(torch.float32) == "sdpa"  # flash and xformers declare half precision only


def test_head_dim_is_checked_at_build_and_call_time():
    spec = optkit.load_spec("opt-tiny", decoder={"hidden_size": 48})  # 4 heads of 12
    with pytest.raises(BackendUnavailableError, match="head_dim=12"):
        optkit.build(spec, attention="flash", device="meta", target_device="meta")
    kernel = optkit_flash.FlashAttention(backend=TorchFlash())
    for head_dim in (12, 264):
        q = torch.randn(1, 1, 3, head_dim)
        with pytest.raises(BackendUnavailableError, match=f"head_dim <= 256 and a multiple of 8.*{head_dim}"):
            kernel(q, q, q, AttentionMask(batch_size=1, q_len=3, kv_len=3), scale=1.0)


def test_flash_library_refuses_float32_cpu_and_fa4_dropout():
    lib = FlashLibrary("flash-attn-4 test", fa4=True, dense_fn=None, varlen_fn=None)
    with pytest.raises(BackendUnavailableError, match="float16/bfloat16 on CUDA; got torch.float32 on cpu"):
        lib.validate(torch.zeros(1, 1, 1, 8), 0.0)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)  # validate reads only these
    lib.validate(on_cuda, 0.0)
    with pytest.raises(BackendUnavailableError, match="no attention dropout"):
        lib.validate(on_cuda, 0.1)


# == CPU: the mask -> varlen rewrite ========================================================================
def test_bottom_right_stand_in_matches_flash_docstring():
    """The examples flash_attn_func documents for causal=True (>= 2.1)."""
    assert bottom_right(2, 5).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert bottom_right(5, 2).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_plan_left_padded_prefill():
    padding = torch.tensor([[False, False, True, True], [True, True, True, True]])
    plan = plan_varlen(AttentionMask(batch_size=2, q_len=4, kv_len=4, key_padding=padding))
    (seg,) = plan.calls
    assert seg.causal and plan.key_len == 4
    assert seg.q_index.tolist() == [2, 3, 4, 5, 6, 7] and seg.k_index.tolist() == [2, 3, 4, 5, 6, 7]
    assert seg.cu_seqlens_q.tolist() == [0, 2, 6] and seg.cu_seqlens_k.tolist() == [0, 2, 6]
    assert (seg.max_seqlen_q, seg.max_seqlen_k) == (4, 4)


def test_plan_cached_decode_step_is_bottom_right():
    """One new token after 3 cached: its own key plus the real cached keys, one query per row."""
    padding = torch.tensor([[False, True, True, True], [True, True, True, True]])
    plan = plan_varlen(AttentionMask(batch_size=2, q_len=1, kv_len=4, q_offset=3, key_padding=padding))
    (seg,) = plan.calls
    assert seg.cu_seqlens_q.tolist() == [0, 1, 2] and seg.cu_seqlens_k.tolist() == [0, 3, 7]
    assert seg.k_index.tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_plan_static_cache_drops_unwritten_slots():
    padding = torch.tensor([[False, True, True, False, False, False]])  # 3 written (1 pad), 3 unwritten
    plan = plan_varlen(AttentionMask(batch_size=1, q_len=2, kv_len=6, q_offset=1, key_padding=padding))
    (seg,) = plan.calls
    assert plan.key_len == 3 and seg.k_index.tolist() == [1, 2]
    assert not needs_varlen(AttentionMask(batch_size=1, q_len=1, kv_len=6, q_offset=2,
                                          key_padding=torch.tensor([[True, True, True, False, False, False]])))


def test_plan_right_padding_and_fully_padded_rows():
    """Pad queries after the text see the text (one full-attention group); an all-pad row is in no call."""
    padding = torch.tensor([[True, True, False, False], [False, False, False, False]])
    plan = plan_varlen(AttentionMask(batch_size=2, q_len=4, kv_len=4, key_padding=padding))
    causal, full = plan.calls
    assert causal.causal and causal.q_index.tolist() == [0, 1] and causal.cu_seqlens_k.tolist() == [0, 2]
    assert not full.causal and full.q_index.tolist() == [2, 3] and full.k_index.tolist() == [0, 1]
    assert full.cu_seqlens_q.tolist() == [0, 2] and full.cu_seqlens_k.tolist() == [0, 2]
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    mask = AttentionMask(batch_size=2, q_len=4, kv_len=4, key_padding=padding)
    out = optkit_flash.FlashAttention(backend=TorchFlash())(q, k, v, mask, scale=1.0).output
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.allclose(out, eager(q, k, v, mask, 1.0), atol=1e-6)


def test_dense_paths_for_masks_without_padding():
    backend = TorchFlash()
    kernel = optkit_flash.FlashAttention(backend=backend)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 9, 8)
    for mask, call in [(AttentionMask(batch_size=1, q_len=3, kv_len=3), ("dense", True)),
                       (AttentionMask(batch_size=1, q_len=3, kv_len=9, q_offset=4), ("dense", True)),
                       (AttentionMask(batch_size=1, q_len=1, kv_len=9, q_offset=8), ("dense", False)),
                       (AttentionMask(batch_size=1, q_len=3, kv_len=9, causal=False), ("dense", False))]:
        keys = k[:, :, : mask.kv_len]
        got = kernel(q[:, :, : mask.q_len], keys, keys, mask, scale=0.5).output
        assert backend.calls[-1] == call
        assert torch.allclose(got, eager(q[:, :, : mask.q_len], keys, keys, mask, 0.5), atol=1e-6)
    assert [dense_bias(AttentionMask(batch_size=1, q_len=t, kv_len=n, q_offset=o, causal=c))
            for t, n, o, c in [(3, 3, 0, True), (2, 5, 3, True), (1, 5, 4, True), (3, 5, 0, False)]] == [
        "causal", "causal_from_bottom_right", "none", "none"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_case())
def test_flash_plan_equals_eager(case):
    q, k, v, mask = make_case(case)
    scale = case[2] ** -0.5
    got = optkit_flash.FlashAttention(backend=TorchFlash())(q, k, v, mask, scale=scale).output
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert (got - eager(q, k, v, mask, scale)).abs().max() <= 1e-5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_case())
def test_xformers_biases_equal_eager(case):
    q, k, v, mask = make_case(case)
    got = XformersAttention(backend=TorchXformers())(q, k, v, mask, scale=1.0).output
    assert torch.isfinite(got).all()
    assert (got - eager(q, k, v, mask, 1.0)).abs().max() <= 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_case())
def test_plan_gradients_equal_eager(case):
    grads = {}
    for name, kernel in (("eager", EagerAttention()), ("flash", optkit_flash.FlashAttention(backend=TorchFlash())),
                         ("xformers", XformersAttention(backend=TorchXformers())),
                         ("flash on torch's op", torch_flash_stand_in())):
        q, k, v, mask = make_case(case)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = kernel(q, k, v, mask, scale=0.3).output
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = [t.grad for t in (q, k, v)]
    for name in ("flash", "xformers", "flash on torch's op"):
        for ours, ref in zip(grads[name], grads["eager"]):
            assert torch.isfinite(ours).all() and (ours - ref).abs().max() <= 1e-5


def test_plan_is_computed_once_per_mask():
    padding = torch.tensor([[False, True, True]])
    mask = AttentionMask(batch_size=1, q_len=3, kv_len=3, key_padding=padding)
    assert plan_for(mask, torch.device("cpu")) is plan_for(mask, torch.device("cpu"))
    assert plan_for(AttentionMask(batch_size=1, q_len=3, kv_len=3), torch.device("cpu")) is None


STAND_INS = {"flash": lambda: optkit_flash.FlashAttention(backend=TorchFlash()),
             "xformers": lambda: XformersAttention(backend=TorchXformers())}


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_stand_ins_inside_a_model_match_eager(name):
    """The decoder's real masks (left padding, dynamic and static caches, decoding) through the rewrite."""
    torch.manual_seed(0)
    reference = optkit.build("opt-tiny").eval()
    model = optkit.build("opt-tiny").eval()
    model.load_state_dict(reference.state_dict())
    for layer in model.decoder.layers:
        layer.self_attn.kernel = STAND_INS[name]()
    ids, mask = prompts()
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - reference(ids, attention_mask=mask).logits).abs().max() < 1e-5
        for kind in ("dynamic", "static"):
            steps = []
            for m in (reference, model):
                cache = m.new_cache(ids.shape[0], max_length=16, kind=kind)
                logits = [m(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache).logits]
                for t in range(6, 10):
                    logits.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
                steps.append(torch.cat(logits, 1))
            assert (steps[0] - steps[1]).abs().max() < 1e-5
    generated = [m.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]) for m in (reference, model)]
    assert torch.equal(*generated)


# -- the real call signatures, exercised on CPU with recording fakes ----------------------------------------
def fa2_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func (2.8.3) signature; computes with the stand-in."""
    CALLS.append(("fa2_func", dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)))
    return TorchFlash().dense(q, k, v, causal=causal, scale=softmax_scale, dropout_p=dropout_p)


def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
               return_attn_probs=False, block_table=None):
    CALLS.append(("fa2_varlen", dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)))
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    seg = Segments(torch.empty(0), torch.empty(0), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return TorchFlash().varlen(q, k, v, seg, scale=softmax_scale, dropout_p=dropout_p)


def fa4_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
             window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
             deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
             aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None, return_lse=False,
             gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
    """flash_attn.cute.flash_attn_func (flash-attn-4 4.0.0b36): returns (out, lse)."""
    CALLS.append(("fa4_func", dict(softmax_scale=softmax_scale, causal=causal)))
    return TorchFlash().dense(q, k, v, causal=causal, scale=softmax_scale, dropout_p=0.0), None


def fa4_varlen(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
               min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
               softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
               num_splits=1, pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None,
               block_sparse_tensors=None, aux_tensors=None, aux_scalars=None, return_lse=False,
               scheduler_metadata=None, seqlen_k_per_split=None, disable_scheduler_metadata=False,
               gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
    CALLS.append(("fa4_varlen", dict(softmax_scale=softmax_scale, causal=causal)))
    seg = Segments(torch.empty(0), torch.empty(0), cu_seqlens_q, cu_seqlens_k, 1 << 30, 1 << 30, causal)
    return TorchFlash().varlen(q, k, v, seg, scale=softmax_scale, dropout_p=0.0), None


CALLS: list[tuple[str, dict[str, Any]]] = []


class CPUFlashLibrary(FlashLibrary):
    def validate(self, query: Tensor, dropout_p: float) -> None:  # the fakes run on CPU in fp32
        pass


@pytest.mark.parametrize("fa4", [False, True])
def test_flash_calls_use_the_real_signatures(fa4):
    lib = CPUFlashLibrary("fake", fa4=fa4, dense_fn=fa4_func if fa4 else fa2_func,
                          varlen_fn=fa4_varlen if fa4 else fa2_varlen)
    kernel = optkit_flash.FlashAttention(backend=lib)
    padding = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]])
    cases = [AttentionMask(batch_size=2, q_len=5, kv_len=5), AttentionMask(batch_size=2, q_len=2, kv_len=5,
             q_offset=3, key_padding=padding), AttentionMask(batch_size=2, q_len=5, kv_len=5, key_padding=padding)]
    for mask in cases:
        CALLS.clear()
        q, k, v = (torch.randn(2, 3, n, 16) for n in (mask.q_len, 5, 5))
        got = kernel(q, k, v, mask, scale=1.0).output
        assert torch.allclose(got, eager(q, k, v, mask, 1.0), atol=1e-5)
        assert CALLS and all(kwargs["softmax_scale"] == 1.0 for _, kwargs in CALLS)
    assert [name for name, _ in CALLS] == ["fa4_varlen" if fa4 else "fa2_varlen"] * 2  # causal + full (right pad)
    if not fa4:
        CALLS.clear()
        kernel(q, k, v, cases[0], scale=1.0, dropout_p=0.25)
        assert CALLS[0] == ("fa2_func", {"dropout_p": 0.25, "softmax_scale": 1.0, "causal": True})


@pytest.fixture
def fake_xformers(monkeypatch):
    """xformers.ops.fmha with the 0.0.35 names and signatures, computing with the stand-ins."""
    used: list[tuple[str, Any]] = []

    class Block:
        def __init__(self, q_seqlen, kv_seqlen, causal):
            self.bias = Bias("block_diagonal_causal_from_bottom_right" if causal else "block_diagonal",
                             tuple(q_seqlen), tuple(kv_seqlen))

    def block_class(name, causal):
        def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
            used.append((name, device))
            return Block(q_seqlen, kv_seqlen or q_seqlen, causal)
        return type(name, (), {"from_seqlens": classmethod(from_seqlens)})

    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.LowerTriangularMask = type("LowerTriangularMask", (), {"bias": Bias("causal")})
    attn_bias.LowerTriangularFromBottomRightMask = type("LowerTriangularFromBottomRightMask", (),
                                                        {"bias": Bias("causal_from_bottom_right")})
    attn_bias.BlockDiagonalMask = block_class("BlockDiagonalMask", False)
    attn_bias.BlockDiagonalCausalFromBottomRightMask = block_class("BlockDiagonalCausalFromBottomRightMask", True)
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias = attn_bias

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        used.append((type(attn_bias).__name__, scale))
        bias = Bias("none") if attn_bias is None else attn_bias.bias
        return TorchXformers().attend(query, key, value, bias, p=p, scale=scale)

    fmha.memory_efficient_attention = memory_efficient_attention
    for name, module in {"xformers": types.ModuleType("xformers"), "xformers.ops": types.ModuleType("xformers.ops"),
                         "xformers.ops.fmha": fmha, "xformers.ops.fmha.attn_bias": attn_bias}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return used


def test_xformers_that_imports_but_cannot_run_is_unavailable(fake_xformers, monkeypatch):
    """A wheel built for another torch imports, then refuses every call: that is a reason, not a crash later."""
    def refuse(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query : shape=(1, 2, 1, 64)\n`cutlassF-pt` is not supported because:\n"
                                  "    xFormers wasn't build with CUDA support")

    monkeypatch.setattr(sys.modules["xformers.ops.fmha"], "memory_efficient_attention", refuse)
    monkeypatch.setattr(optkit_xformers, "_present", lambda: True)
    monkeypatch.setattr(optkit_xformers, "cuda_reasons", lambda device, minimum: [])
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: torch.zeros(*shape, dtype=torch.float16))
    optkit_xformers._import_error.cache_clear()
    optkit_xformers._run_error.cache_clear()
    try:
        reasons = optkit_xformers.unavailable_reasons("cuda", torch.float16)
    finally:
        optkit_xformers._run_error.cache_clear()
        optkit_xformers._import_error.cache_clear()
    assert len(reasons) == 1 and "cannot run on this GPU with this torch" in reasons[0]
    assert "NotImplementedError: xFormers wasn't build with CUDA support" in reasons[0]


def test_xformers_translates_to_the_real_bias_classes(fake_xformers):
    kernel = XformersAttention(backend=XformersOps())
    padding = torch.tensor([[False, True, True, True], [True, True, False, False]])
    expected = [(AttentionMask(batch_size=2, q_len=4, kv_len=4), "LowerTriangularMask"),
                (AttentionMask(batch_size=2, q_len=2, kv_len=4, q_offset=2), "LowerTriangularFromBottomRightMask"),
                (AttentionMask(batch_size=2, q_len=1, kv_len=4, q_offset=3), "NoneType"),
                (AttentionMask(batch_size=2, q_len=4, kv_len=4, key_padding=padding), "Block")]
    for mask, name in expected:
        fake_xformers.clear()
        q, k, v = (torch.randn(2, 2, n, 8) for n in (mask.q_len, 4, 4))
        got = kernel(q, k, v, mask, scale=1.0).output
        assert torch.allclose(got, eager(q, k, v, mask, 1.0), atol=1e-5)
        assert fake_xformers[-1] == (name, 1.0)
    assert [name for name, _ in fake_xformers if name.startswith("BlockDiagonal")] == [
        "BlockDiagonalCausalFromBottomRightMask", "BlockDiagonalMask"]
    assert all(device == torch.device("cpu") for name, device in fake_xformers if name.startswith("BlockDiagonal"))


# == CPU (where bitsandbytes supports it) and CUDA: int8 =====================================================
INT8_CPU_REASONS = optkit_int8.unavailable_reasons("cpu", torch.float32)  # collection time: no registry yet
needs_int8_cpu = pytest.mark.skipif(bool(INT8_CPU_REASONS), reason=f"int8 on CPU: {'; '.join(INT8_CPU_REASONS)}")


def int8_layer(threshold: float = 6.0, device: str = "cpu"):
    from optkit_int8.linear import Int8Linear

    torch.manual_seed(1)
    dense = torch.nn.Linear(256, 128).to(device)
    layer = Int8Linear(256, 128, bias=True, threshold=threshold).to(device).eval()  # eval: the int8 inference path
    layer.load_state_dict(dense.state_dict())
    return dense, layer


def relative_error(got: Tensor, ref: Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@needs_int8_cpu
def test_int8_layer_close_to_fp32_and_threshold_keeps_outliers():
    """LLM.int8 error is ~0.5% of the output norm; the fp16 outlier path beats plain int8 on an outlier column."""
    dense, layer = int8_layer(6.0)
    _, plain = int8_layer(0.0)
    x = torch.randn(4, 7, 256)
    x[..., 5] *= 40.0
    with torch.no_grad():
        ref, got, no_outliers = dense(x), layer(x), plain(x)
    assert layer.is_quantized and layer.weight.dtype == torch.int8 and got.dtype == torch.float32
    assert relative_error(got, ref) < 1e-2
    assert relative_error(got, ref) < relative_error(no_outliers, ref)


def tiny_pair(preset: str = "opt-tiny", scale: float = 8.0, **int8_params: Any):
    """An fp32 model with decisive logits (embedding x ``scale``) and the same weights through int8."""
    torch.manual_seed(0)
    ref = optkit.build(preset).eval()
    with torch.no_grad():
        ref.decoder.embed_tokens.weight.mul_(scale)
    linear = {"name": "int8", "params": int8_params} if int8_params else "int8"
    quantized = optkit.build(preset, linear=linear).eval()
    quantized.load_state_dict(ref.state_dict())
    return ref, quantized


def prompts(vocab: int = 512, device: str = "cpu"):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.to(device), mask.to(device)


def greedy_agreement(ref, model, ids: Tensor, mask: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
    """Free-running token agreement, teacher-forced agreement on ref's text, and ref's margins at disagreements."""
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    free = float((out_ref[:, ids.shape[1]:] == out[:, ids.shape[1]:]).float().mean())
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype, device=mask.device)], 1)
    with torch.no_grad():
        a = ref(out_ref, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float()
        b = model(out_ref, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float()
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = a.topk(2, dim=-1).values
    return free, float(agree.float().mean()), (top2[..., 0] - top2[..., 1])[~agree]


@needs_int8_cpu
def test_int8_model_logits_and_greedy_tokens_on_cpu(record_property):
    ref, quantized = tiny_pair()
    ids, mask = prompts()
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, quantized(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = float((a - b)[real].abs().max())
    assert diff <= 0.01 * float(a[real].abs().max()) + 0.02, diff
    free, forced, margins = greedy_agreement(ref, quantized, ids, mask, new_tokens=8)
    record_property("int8_cpu_greedy_agreement", free)
    record_property("int8_cpu_teacher_forced_agreement", forced)
    print(f"int8 vs fp32 on CPU: max |dlogit| {diff:.4f}, greedy agreement {free:.1%}, teacher-forced {forced:.1%}")
    assert forced >= 0.9 and free >= 0.75
    assert bool((margins < 4 * diff).all()), "int8 changed a token where fp32 was not close to a tie"


@needs_int8_cpu
def test_int8_replaces_exactly_the_ctx_linear_projections():
    from optkit_int8.linear import Int8Linear

    model = optkit.build("opt-tiny-350m-style", linear="int8")
    quantized = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    expected = {f"decoder.layers.{i}.{part}" for i in range(2) for part in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")} | {"decoder.project_in", "decoder.project_out"}
    assert quantized == expected
    assert not isinstance(model.decoder.embed_tokens, Int8Linear) and not isinstance(model.head, Int8Linear)
    assert model.decoder.embed_tokens.weight.dtype == torch.float32


@needs_int8_cpu
def test_int8_params_threshold_and_validation():
    model = optkit.build("opt-tiny", linear={"name": "int8", "params": {"threshold": 0.0}})
    assert model.decoder.layers[0].self_attn.q_proj.state.threshold == 0.0
    assert optkit.build("opt-tiny", linear="int8").decoder.layers[0].mlp.fc1.state.threshold == 6.0
    with pytest.raises(SpecValidationError):
        optkit.build("opt-tiny", linear={"name": "int8", "params": {"treshold": 5}})


@needs_int8_cpu
def test_int8_from_pretrained_quantizes_at_load_and_saves_dequantized(tmp_path):
    """Built on meta, assigned with load_state_dict(assign=True): the weights still become int8."""
    ref, _ = tiny_pair("opt-tiny-350m-style", scale=1.0)
    ref.save_pretrained(tmp_path / "fp32")
    model = optkit.from_pretrained(tmp_path / "fp32", linear="int8")
    ids, mask = prompts()
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    q_proj = model.decoder.layers[0].self_attn.q_proj
    assert q_proj.is_quantized and model.decoder.project_in.is_quantized
    assert float((a - b)[mask.bool()].abs().max()) < 0.02
    model.to(torch.float16)  # keeps the int8 rows, follows the dtype elsewhere
    assert q_proj.weight.dtype == torch.int8 and q_proj.float_dtype == torch.float16
    model.to(torch.float32)
    state = model.state_dict()
    assert not any(key.endswith(("SCB", "weight_format")) for key in state)
    weight = state["decoder.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.float32
    assert float((weight - ref.state_dict()["decoder.layers.0.self_attn.q_proj.weight"]).abs().max()) < 2e-3
    model.save_pretrained(tmp_path / "dequantized")
    plain = optkit.from_pretrained(tmp_path / "dequantized")
    with torch.no_grad():
        assert float((plain(ids, attention_mask=mask).logits - b).abs().max()) < 0.02


# == CUDA: the real kernels =================================================================================
CUDA_DTYPES = [torch.float16, torch.bfloat16]


def real_kernel(name: str):
    """The registered kernel of ``name`` on CUDA (sdpa: torch's dispatch to its flash, memory-efficient or math
    kernel, per case), or a skip that names what is missing."""
    if name == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    elif name == "xformers":
        pytest.importorskip("xformers.ops", reason="xformers is not installed")
    reasons = optkit.registry.get("attention", name).unavailable_reasons("cuda", torch.float16)
    if reasons:
        pytest.skip(f"{name} cannot run here: {'; '.join(reasons)}")
    return optkit.registry.get("attention", name).factory(None, None)


def within_eager_error(got: Tensor, low: Tensor, ref: Tensor, dtype: torch.dtype, factor: float = 1.0) -> bool:
    """|backend - fp32 eager| <= 2 |eager in dtype - fp32 eager| + floor(dtype)."""
    return float((got.float() - ref).abs().max()) <= 2 * float((low.float() - ref).abs().max()) + \
        FLOOR[dtype] * factor


def assert_cached_decoding_equals_eager(model, ids: Tensor, mask: Tensor, backend, dtype: torch.dtype) -> None:
    """Prefill 6 tokens, then 4 single-token steps, on a dynamic and a static cache: ``backend``'s logits
    within 4 x the dtype's floor (relative to the largest logit) of eager's."""
    for kind in ("dynamic", "static"):
        steps = {}
        for label, attention in (("eager", "eager"), ("backend", backend)):
            optkit.set_backend(model, attention=attention)
            cache = model.new_cache(ids.shape[0], max_length=16, kind=kind)
            logits = [model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache).logits]
            for t in range(6, 10):
                logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
            steps[label] = torch.cat(logits, 1)
        scale = float(steps["eager"].float().abs().max())
        assert (steps["backend"].float() - steps["eager"].float()).abs().max() <= 4 * FLOOR[dtype] * max(scale, 1.0)


def assert_cuda_kernel_equals_eager(kernel, case, dtype) -> None:
    """Forward and gradients of ``kernel`` within twice eager's own error in ``dtype`` (against fp32 eager)."""
    q, k, v, mask = make_case(case, dtype, "cuda")
    scale = case[2] ** -0.5
    grad_out = torch.randn(q.shape, device="cuda", dtype=dtype)
    results = {}
    for label, fn, cast in (("ref", EagerAttention(), torch.float32), ("low", EagerAttention(), dtype),
                            ("got", kernel, dtype)):
        inputs = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        out = fn(*inputs, mask, scale=scale).output
        out.backward(grad_out.to(cast))
        results[label] = [out] + [t.grad for t in inputs]
    got, low, ref = results["got"], results["low"], results["ref"]
    assert all(torch.isfinite(t).all() for t in got)
    assert within_eager_error(got[0], low[0], ref[0], dtype)
    for ours, lows, refs in zip(got[1:], low[1:], ref[1:]):
        assert within_eager_error(ours, lows, refs, dtype, factor=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["flash", "xformers", "sdpa"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mask_case(head_dims=(64, 80, 128)))
def test_cuda_kernel_equals_eager_forward_and_backward(name, dtype, case):
    assert_cuda_kernel_equals_eager(real_kernel(name), case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_cuda_fully_padded_rows_are_zero_not_nan(name, dtype):
    kernel = real_kernel(name)
    q, k, v = (torch.randn(3, 4, 6, 64, device="cuda", dtype=dtype) * 30 for _ in range(3))
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6, [True] * 6], device="cuda")
    for past in (0, 5):
        mask = AttentionMask(batch_size=3, q_len=6 - past, kv_len=6, q_offset=past, key_padding=padding)
        out = kernel(q[:, :, past:], k, v, mask, scale=1.0).output
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        if past == 0:
            assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_cuda_dropout_in_training(name):
    kernel = real_kernel(name)
    q, k, v = (torch.randn(2, 4, 16, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = AttentionMask(batch_size=2, q_len=16, kv_len=16,
                         key_padding=torch.tensor([[False] * 3 + [True] * 13, [True] * 16], device="cuda"))
    plain = kernel(q, k, v, mask, scale=0.125).output
    try:
        dropped = kernel(q, k, v, mask, scale=0.125, dropout_p=0.3).output
    except BackendUnavailableError as error:  # FlashAttention-4 has no dropout
        assert "no attention dropout" in str(error)
        return
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)
    assert torch.equal(dropped[0, :, :3], torch.zeros_like(dropped[0, :, :3]))


def cuda_model(dtype: torch.dtype, **components: Any):
    spec = optkit.load_spec("opt-tiny", decoder={"hidden_size": 256, "num_heads": 4, "ffn_dim": 512})  # head_dim 64
    torch.manual_seed(0)
    model = optkit.build(spec, dtype=torch.float32, device="cuda", **components).eval()
    with torch.no_grad():
        model.decoder.embed_tokens.weight.mul_(8.0)  # decisive logits: greedy ties are rare
    return model.to(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", ["flash", "xformers", "sdpa"])
def test_cuda_model_logits_and_cached_decoding_equal_eager(name, dtype):
    real_kernel(name)
    assert_model_matches_eager(name, dtype)


def assert_model_matches_eager(attention: Any, dtype: torch.dtype):
    """A model's logits with ``attention`` within 10x the dtype floor of eager's error, then cached decoding on
    dynamic and static caches; returns the model, left on ``attention``."""
    model, reference = cuda_model(dtype), cuda_model(torch.float32)
    ids, mask = prompts(device="cuda")
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask).logits
        low = model(ids, attention_mask=mask).logits
        optkit.set_backend(model, attention=attention)
        got = model(ids, attention_mask=mask).logits
        assert torch.isfinite(got).all()
        assert within_eager_error(got, low, ref, dtype, factor=10.0)
        assert_cached_decoding_equals_eager(model, ids, mask, attention, dtype)
    return model


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_cuda_greedy_tokens_equal_eager(name, record_property):
    real_kernel(name)
    eager_model = cuda_model(torch.float16)
    model = optkit.set_backend(cuda_model(torch.float16), attention=name)
    ids, mask = prompts(device="cuda")
    free, forced, margins = greedy_agreement(eager_model, model, ids, mask, new_tokens=16)
    record_property(f"{name}_greedy_agreement", free)
    assert forced == 1.0 or bool((margins < 0.05).all()), f"{name} changed a token away from a near-tie"
    assert free == 1.0 or forced < 1.0


@pytest.mark.cuda
def test_cuda_auto_picks_the_fastest_usable_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="optkit"):
        model = optkit.build("opt-tiny", attention="auto", dtype=torch.float16, device="cuda")
    usable = [n for n in ("flash", "xformers", "sdpa")
              if not optkit.registry.get("attention", n).unavailable_reasons("cuda", torch.float16)]
    assert model.attention_backend == usable[0]
    assert f"attention=auto picked '{usable[0]}' for cuda/torch.float16" in caplog.text


def needs_int8_cuda():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    reasons = optkit.registry.get("linear", "int8").unavailable_reasons("cuda", torch.float16)
    if reasons:
        pytest.skip(f"int8 cannot run on CUDA here: {'; '.join(reasons)}")


@pytest.mark.cuda
def test_cuda_int8_layer_close_to_fp32():
    needs_int8_cuda()
    dense, layer = int8_layer(6.0, device="cuda")
    assert layer.is_quantized and layer.weight.device.type == "cuda"
    x = torch.randn(4, 7, 256, device="cuda")
    x[..., 5] *= 40.0
    with torch.no_grad():
        assert relative_error(layer(x.half()), dense(x)) < 1e-2


@pytest.mark.cuda
def test_cuda_int8_greedy_tokens_vs_fp16(record_property, tmp_path):
    """Loaded on meta and assigned on CUDA: quantized at load; greedy agreement with the fp16 model reported."""
    needs_int8_cuda()
    spec = optkit.load_spec("opt-tiny", decoder={"hidden_size": 256, "num_heads": 4, "ffn_dim": 1024})
    torch.manual_seed(0)
    fp32 = optkit.build(spec)
    with torch.no_grad():
        fp32.decoder.embed_tokens.weight.mul_(8.0)
    fp32.save_pretrained(tmp_path)
    fp16 = optkit.from_pretrained(tmp_path, dtype=torch.float16, device="cuda")
    int8 = optkit.from_pretrained(tmp_path, dtype=torch.float16, device="cuda", linear="int8")
    q_proj = int8.decoder.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.int8 and q_proj.weight.device.type == "cuda"  # before any forward
    ids, mask = prompts(device="cuda")
    free, forced, margins = greedy_agreement(fp16, int8, ids, mask, new_tokens=16)
    record_property("int8_cuda_greedy_agreement", free)
    print(f"int8 vs fp16 on CUDA: greedy agreement {free:.1%}, teacher-forced {forced:.1%}")
    assert forced >= 0.9


def int8_input_gradient_error(device: str, dtype: torch.dtype) -> float:
    """Relative error of the gradient that flows through an int8 layer to its input (what LoRA over an int8 base
    trains on), against the fp32 layer's, with an outlier column that takes the fp16 path."""
    dense, layer = int8_layer(6.0, device=device)
    x = torch.randn(4, 7, 256, device=device)
    x[..., 5] *= 40.0
    grad_out = torch.randn(4, 7, 128, device=device)
    ours, ref = x.to(dtype).clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(ours).backward(grad_out.to(dtype))
    dense(ref).backward(grad_out)
    assert ours.grad is not None and torch.isfinite(ours.grad).all()
    return relative_error(ours.grad, ref.grad)


@needs_int8_cpu
def test_int8_input_gradient_close_to_fp32_on_cpu():
    assert int8_input_gradient_error("cpu", torch.float32) < 1e-2


@pytest.mark.cuda
def test_cuda_int8_input_gradient_close_to_fp32():
    needs_int8_cuda()
    assert int8_input_gradient_error("cuda", torch.float16) < 2e-2


# == flash on torch's own FlashAttention-2 kernels (implementation "torch") =================================
def fake_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                 return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                                 seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    """``aten::_flash_attention_forward`` (torch 2.13 schema) in eager math, asserting what the kernel needs.

    Dense when ``cum_seq_*`` are None (q/k/v ``(B, T, H, D)``), else varlen (packed ``(total, H, D)``, int32
    offsets, ``max_*`` bounding every sequence); causal is bottom-right (torch's ``flash_attn/mask.h``); returns
    ``(output, softmax_logsumexp, rng_state, unused, debug_attn_mask)`` with the meta kernel's shapes.
    """
    TORCH_OP_CALLS.append(dict(varlen=cum_seq_q is not None, causal=is_causal, scale=scale, dropout_p=dropout_p))
    assert not return_debug_mask and isinstance(scale, float) and isinstance(max_q, int) and isinstance(max_k, int)
    assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    if cum_seq_q is None:
        assert cum_seq_k is None and query.dim() == 4 and (max_q, max_k) == (query.shape[1], key.shape[1])
        allowed = bottom_right(query.shape[1], key.shape[1]) if is_causal else None
        out = torch.stack([reference(query[b], key[b], value[b], allowed, scale, dropout_p)
                           for b in range(query.shape[0])])
        lse = torch.zeros(query.shape[0], query.shape[2], query.shape[1])
    else:
        seg = Segments(torch.empty(0), torch.empty(0), cum_seq_q, cum_seq_k, max_q, max_k, is_causal)
        out = TorchFlash().varlen(query, key, value, seg, scale=scale, dropout_p=dropout_p)  # asserts the offsets
        lse = torch.zeros(query.shape[1], query.shape[0])
    return out, lse, torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64), torch.empty(0)


TORCH_OP_CALLS: list[dict[str, Any]] = []


class CPUTorchKernels(TorchKernels):
    def validate(self, query: Tensor, dropout_p: float) -> None:  # the stand-in runs on CPU in fp32
        pass


def torch_flash_stand_in() -> optkit_flash.FlashAttention:
    return optkit_flash.FlashAttention("torch", backend=CPUTorchKernels(forward=fake_flash_attention_forward))


def test_stand_in_has_the_real_op_schema():
    """The fake binds arguments exactly as this torch's op does, and TorchKernels calls the real op by default."""
    schema = torch.ops.aten._flash_attention_forward.default._schema
    params = inspect.signature(fake_flash_attention_forward).parameters
    assert [a.name for a in schema.arguments] == list(params)
    assert [a.kwarg_only for a in schema.arguments] == [p.kind is inspect.Parameter.KEYWORD_ONLY
                                                        for p in params.values()]
    assert [r.name for r in schema.returns] == ["output", "softmax_logsumexp", "rng_state", "unused",
                                                 "debug_attn_mask"]
    assert TorchKernels().forward is torch.ops.aten._flash_attention_forward


@pytest.mark.parametrize("padded", [False, True])
def test_real_op_accepts_our_calls_and_has_a_backward(padded):
    """The real op's meta kernel (shapes only, no GPU) binds TorchKernels' dense and varlen calls; autograd
    records FlashAttentionBackward0 and its backward runs: training is supported, not just forward."""
    padding = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]]) if padded else None
    mask = AttentionMask(batch_size=2, q_len=2, kv_len=5, q_offset=3, key_padding=padding)
    meta = lambda *shape: torch.randn(*shape, dtype=torch.float16, device="meta", requires_grad=True)  # noqa: E731
    q, k, v = meta(2, 4, 2, 64), meta(2, 4, 5, 64), meta(2, 4, 5, 64)
    plan = plan_for(mask, torch.device("cpu"))
    assert (plan is not None) == padded
    if plan is None:
        out = TorchKernels().dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                   scale=0.125, dropout_p=0.1)
        assert out.shape == (2, 2, 4, 64)
    else:
        seg = plan.calls[0]  # row 0's two real queries against its four real keys
        n_q, n_k = int(seg.cu_seqlens_q[-1]), int(seg.cu_seqlens_k[-1])
        assert (n_q, n_k, seg.causal) == (2, 4, True)
        seg = Segments(seg.q_index, seg.k_index, seg.cu_seqlens_q.to("meta"), seg.cu_seqlens_k.to("meta"),
                       seg.max_seqlen_q, seg.max_seqlen_k, seg.causal)
        rows = lambda t, n: t.transpose(1, 2).reshape(-1, 4, 64)[:n]  # noqa: E731
        out = TorchKernels().varlen(rows(q, n_q), rows(k, n_k), rows(v, n_k), seg, scale=0.125, dropout_p=0.1)
        assert out.shape == (n_q, 4, 64)
    assert type(out.grad_fn).__name__ == "FlashAttentionBackward0"
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mask_case())
def test_torch_kernels_stand_in_plan_equals_eager(case):
    """Padding, cache offsets and static slots through the real plan into torch's op (stand-in): eager's output."""
    q, k, v, mask = make_case(case)
    scale = case[2] ** -0.5
    TORCH_OP_CALLS.clear()
    got = torch_flash_stand_in()(q, k, v, mask, scale=scale).output
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert (got - eager(q, k, v, mask, scale)).abs().max() <= 1e-5
    assert all(call["scale"] == scale and call["dropout_p"] == 0.0 for call in TORCH_OP_CALLS)


def test_torch_kernels_stand_in_calls_and_dropout():
    """Dense causal at a cache offset, varlen for padding (causal + full call), dropout_p passed through."""
    kernel = torch_flash_stand_in()
    padding = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]])
    q, k, v = (torch.randn(2, 3, n, 16) for n in (2, 5, 5))
    for mask, expected in ((AttentionMask(batch_size=2, q_len=2, kv_len=5, q_offset=3), [(False, True)]),
                           (AttentionMask(batch_size=2, q_len=5, kv_len=5, key_padding=padding),
                            [(True, True), (True, False)])):
        TORCH_OP_CALLS.clear()
        query = q if mask.q_len == 2 else torch.randn(2, 3, 5, 16)
        got = kernel(query, k, v, mask, scale=1.0).output
        assert torch.allclose(got, eager(query, k, v, mask, 1.0), atol=1e-5)
        assert [(c["varlen"], c["causal"]) for c in TORCH_OP_CALLS] == expected
    TORCH_OP_CALLS.clear()
    kernel(q, k, v, AttentionMask(batch_size=2, q_len=2, kv_len=5, q_offset=3), scale=1.0, dropout_p=0.25)
    assert TORCH_OP_CALLS[0]["dropout_p"] == 0.25


def test_torch_kernels_refuse_float32_and_cpu():
    with pytest.raises(BackendUnavailableError, match=r"attention 'flash' \(torch .* flash kernels\) runs "
                                                      r"float16/bfloat16 on CUDA; got torch.float32 on cpu"):
        TorchKernels().validate(torch.zeros(1, 1, 1, 8), 0.0)
    TorchKernels().validate(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16), 0.1)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA machine as the availability checks see it; returns a setter for (capability, name)."""
    lib = optkit_flash.library
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lib, "_import_error", lambda kind: None)

    def gpu(capability: tuple[int, int], name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)

    gpu((9, 0), "NVIDIA H200")
    yield gpu
    lib.load.cache_clear()


def test_auto_order_is_flash_attn_2_then_fa4_then_torch(fake_gpu, monkeypatch):
    lib = optkit_flash.library
    every = {"fa2": "2.8.3", "fa4": "4.0.0b36", "torch": "2.11.0+cu130"}
    for present, expected in ((("fa2", "fa4", "torch"), "fa2"), (("fa4", "torch"), "fa4"), (("torch",), "torch"),
                              (("fa2", "fa4"), "fa2"), (("fa4",), "fa4")):
        monkeypatch.setattr(lib, "installed", lambda present=present: {k: every[k] for k in present})
        assert lib.resolve("cuda") == (expected, [])
        assert lib.resolve("cuda", "torch") == (("torch", []) if "torch" in present else (None, [
            "torch 2.13.0+cpu has no CUDA flash kernels of its own (a CPU-only build), so implementation 'torch' "
            "(its FlashAttention-2 kernels, no extra install) cannot serve: use a CUDA build of torch"
            .replace("2.13.0+cpu", torch.__version__)]))
    monkeypatch.setattr(lib, "installed", lambda: {"fa4": every["fa4"], "torch": every["torch"]})
    fake_gpu((8, 0), "NVIDIA A100")  # FA4 needs Hopper: auto falls back to torch's kernels
    assert lib.resolve("cuda") == ("torch", [])
    assert lib.resolve("cuda", "fa4") == (None, ["compute capability 8.0 of NVIDIA A100 is below 9.0"])
    monkeypatch.setattr(lib, "installed", lambda: {"fa2": every["fa2"], "torch": every["torch"]})
    monkeypatch.setattr(lib, "_import_error", lambda kind: "ImportError: undefined symbol" if kind == "fa2" else None)
    assert lib.resolve("cuda") == ("torch", [])  # a flash-attn 2 built for another torch does not block flash
    assert lib.resolve("cuda", "fa2") == (None, ["flash_attn is installed but does not import: ImportError: "
                                                 "undefined symbol"])


def test_auto_attention_takes_flash_only_from_a_flash_library(fake_gpu, monkeypatch):
    """torch's own flash kernels are what sdpa dispatches to, and sdpa keeps CUDA-graph decoding."""
    lib = optkit_flash.library
    flash = optkit.registry.get("attention", "flash")
    monkeypatch.setattr(lib, "installed", lambda: {"torch": "2.11.0+cu130"})
    assert flash.unavailable_reasons("cuda", torch.float16) == []  # attention="flash" runs them
    assert "sdpa already runs" in flash.auto_reasons("cuda", torch.float16)[0]
    assert optkit.registry.select_auto("attention", "cuda", torch.float16).name != "flash"
    monkeypatch.setattr(lib, "installed", lambda: {"fa2": "2.8.3", "torch": "2.11.0+cu130"})
    assert flash.auto_reasons("cuda", torch.float16) == []
    assert optkit.registry.select_auto("attention", "cuda", torch.float16).name == "flash"


def test_no_usable_implementation_names_each(fake_gpu, monkeypatch):
    lib = optkit_flash.library
    monkeypatch.setattr(lib, "installed", lambda: {"fa4": "4.0.0b36", "torch": "2.11.0+cu130"})
    fake_gpu((7, 5), "Tesla T4")
    assert lib.unavailable_reasons("cuda", torch.float16) == [
        "FlashAttention-4: compute capability 7.5 of Tesla T4 is below 9.0",
        "torch's own flash kernels: compute capability 7.5 of Tesla T4 is below 8.0"]
    with pytest.raises(BackendUnavailableError, match=r"implementation 'auto'\) cannot run: FlashAttention-4: "
                                                      r"compute capability 7.5"):
        lib.load("auto")


def test_load_returns_torch_kernels_when_only_torch_has_them(fake_gpu, monkeypatch):
    lib = optkit_flash.library
    monkeypatch.setattr(lib, "installed", lambda: {"torch": "2.11.0+cu130"})
    for implementation in ("auto", "torch"):
        backend = lib.load(implementation)
        assert isinstance(backend, TorchKernels) and backend.forward is torch.ops.aten._flash_attention_forward
        assert optkit_flash.FlashAttention(implementation).backend is backend
    with pytest.raises(BackendUnavailableError, match="flash-attn implementation 'fa2' is not installed "
                                                      r"\(found: torch\)"):
        lib.load("fa2")


def test_flash_reasons_on_a_cpu_only_torch_name_all_three(monkeypatch):
    """This machine's case (forced, so it holds on any build): no flash_attn, no flash kernels in torch, no CUDA."""
    lib = optkit_flash.library
    monkeypatch.setattr(lib, "_package_present", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = lib.unavailable_reasons("cuda", torch.float16)
    assert len(reasons) == 3
    assert reasons[0].startswith("flash_attn is not installed") and "pip install 'optkit[flash]'" in reasons[0] \
        and "pip install flash-attn-4" in reasons[0]  # flash-attn 2 and FlashAttention-4
    assert "no CUDA flash kernels of its own (a CPU-only build)" in reasons[1] and "implementation 'torch'" in \
        reasons[1]
    assert reasons[2].startswith("no CUDA device (this torch is a CPU-only build")
    assert all(len(r) <= 220 for r in reasons)


def test_torch_built_without_flash_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    assert optkit_flash.torch_kernels.missing_reason() == f"torch {torch.__version__} was built without flash " \
                                                          "attention"
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    assert optkit_flash.torch_kernels.missing_reason() is None


def test_implementation_torch_is_a_valid_param():
    assert optkit_flash.FlashParams(implementation="torch").implementation == "torch"
    with pytest.raises(Exception, match="implementation"):
        optkit_flash.FlashParams(implementation="xformers")


# -- CUDA: torch's own kernels for real --------------------------------------------------------------------
def torch_flash_kernel() -> optkit_flash.FlashAttention:
    reasons = optkit_flash.library.unavailable_reasons("cuda", torch.float16, "torch")
    if reasons:
        pytest.skip(f"torch's own flash kernels cannot run here: {'; '.join(reasons)}")
    kernel = optkit_flash.FlashAttention("torch")
    assert isinstance(kernel.backend, TorchKernels)
    return kernel


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_torch_op_causal_is_bottom_right(dtype):
    """The alignment the varlen plans rely on, checked on the kernel itself: dense and varlen, q_len < k_len."""
    torch_flash_kernel()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 64, device="cuda", dtype=dtype, generator=g) for n in (3, 7, 7))
    out = torch.ops.aten._flash_attention_forward(q, k, v, None, None, 3, 7, 0.0, True, False, scale=0.125)[0]
    ref = torch.stack([reference(q[b].float(), k[b].float(), v[b].float(), bottom_right(3, 7, "cuda"), 0.125)
                       for b in range(2)])
    assert float((out.float() - ref).abs().max()) <= 4 * FLOOR[dtype]
    cu_q, cu_k = (torch.tensor([0, 3, 6], dtype=torch.int32, device="cuda"),
                  torch.tensor([0, 7, 14], dtype=torch.int32, device="cuda"))
    packed = torch.ops.aten._flash_attention_forward(q.reshape(6, 4, 64), k.reshape(14, 4, 64), v.reshape(14, 4, 64),
                                                     cu_q, cu_k, 3, 7, 0.0, True, False, scale=0.125)[0]
    assert float((packed.view(2, 3, 4, 64).float() - ref).abs().max()) <= 4 * FLOOR[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mask_case(head_dims=(64, 80, 128)))
def test_cuda_torch_kernels_equal_eager_forward_and_backward(dtype, case):
    assert_cuda_kernel_equals_eager(torch_flash_kernel(), case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_torch_kernels_zero_rows_and_dropout(dtype):
    kernel = torch_flash_kernel()
    q, k, v = (torch.randn(3, 4, 6, 64, device="cuda", dtype=dtype) * 30 for _ in range(3))
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6, [True] * 6], device="cuda")
    for past in (0, 5):
        mask = AttentionMask(batch_size=3, q_len=6 - past, kv_len=6, q_offset=past, key_padding=padding)
        out = kernel(q[:, :, past:], k, v, mask, scale=1.0).output
        assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    mask = AttentionMask(batch_size=3, q_len=6, kv_len=6, key_padding=padding)
    plain = kernel(q, k, v, mask, scale=0.125).output
    dropped = kernel(q, k, v, mask, scale=0.125, dropout_p=0.3).output
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, plain)
    assert torch.equal(dropped[0, :, :4], torch.zeros_like(dropped[0, :, :4]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_torch_kernels_model_logits_and_cached_decoding(dtype):
    torch_flash_kernel()
    model = assert_model_matches_eager({"name": "flash", "params": {"implementation": "torch"}}, dtype)
    assert isinstance(model.decoder.layers[0].self_attn.kernel.backend, TorchKernels)
