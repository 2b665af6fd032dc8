"""The typed contracts in optkit.interfaces: documented, implemented where the core relies on them,
and no module of optkit imports another in a cycle (function-level imports included)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import typing

import pytest
import torch

import optkit
from optkit import interfaces
from optkit.interfaces import (
    HeadMatmul,
    KVCache,
    Offloadable,
    PlacementUnit,
    StackableLinear,
    TensorParallel,
    WrappableLinear,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOKS = (ROOT / "docs" / "hooks.md").read_text()
OPTIONAL = [interfaces.HeadMatmul, interfaces.StackableLinear, interfaces.TensorParallel, interfaces.PlacementUnit,
            interfaces.Offloadable, interfaces.WrappableLinear, interfaces.MergeableLinear, interfaces.LinearAdapter]


@pytest.mark.parametrize("contract", OPTIONAL, ids=lambda c: c.__name__)
def test_every_optional_contract_is_documented_member_by_member(contract):
    members = [name for name, value in vars(contract).items()
               if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))]
    members += [name for name in getattr(contract, "__annotations__", {}) if not name.startswith("_")]
    assert members, f"{contract.__name__} declares nothing"
    for name in members:
        assert f"{contract.__name__}.{name}" in HOOKS, f"docs/hooks.md lacks {contract.__name__}.{name}"


def test_an_opt_layer_declares_how_it_shards_every_weight():
    model = optkit.build("opt-tiny")
    layer = model.decoder.layers[0]
    assert isinstance(layer, PlacementUnit) and isinstance(layer, Offloadable)
    planned: set[str] = set()
    for part_name in ("self_attn", "mlp"):
        part = getattr(layer, part_name)
        assert isinstance(part, TensorParallel), f"{type(part).__name__} declares no tp_plan"
        for sub, style in part.tp_plan().items():
            assert style in typing.get_args(interfaces.ShardStyle)
            module = part.get_submodule(sub) if sub else part
            planned |= {f"{part_name}.{sub}.{n}" for n, _ in module.named_parameters()}
    weights = {n for n, p in layer.named_parameters() if p.dim() == 2}
    assert weights <= planned, f"unplanned weights: {sorted(weights - planned)}"
    assert isinstance(model.decoder.embed_tokens, TensorParallel)
    assert model.decoder.embed_tokens.tp_plan() == {"": "vocab"}


def test_shard_local_divides_the_heads_or_says_why_not():
    attention = optkit.build("opt-tiny").decoder.layers[0].self_attn
    heads = attention.num_heads
    attention.shard_local(2)
    assert attention.num_heads == heads // 2
    with pytest.raises(optkit.InputError, match="cannot be split evenly over 3 ranks"):
        attention.shard_local(3)


def test_linears_satisfy_what_adapters_and_heads_rely_on():
    plain = optkit.build("opt-tiny").decoder.layers[0].self_attn.q_proj
    assert isinstance(plain, WrappableLinear) and not isinstance(plain, StackableLinear)
    fast = optkit.build("opt-tiny", linear="onednn")
    assert isinstance(fast.decoder.layers[0].self_attn.q_proj, StackableLinear)
    assert fast.head._matmul is not None  # the oneDNN factory lends the tied head its kernel (HeadMatmul)
    assert optkit.build("opt-tiny").head._matmul is None
    assert fast.head.tied and not optkit.build("opt-tiny", head={"name": "causal_lm", "params": {
        "tie_word_embeddings": False}}).head.tied


def test_only_caches_that_implement_reset_say_so():
    model = optkit.build("opt-tiny")
    assert type(model.new_cache(1, max_length=4, kind="static")).can_reset()
    dynamic = model.new_cache(1, kind="dynamic")
    assert not type(dynamic).can_reset()
    with pytest.raises(NotImplementedError, match="cannot be reset"):
        dynamic.reset()
    assert KVCache.can_reset() is False
    assert not isinstance(object(), HeadMatmul)


def test_position_range_is_declared_by_the_interface():
    model = optkit.build("opt-tiny")
    assert model.decoder.embed_positions.position_range == (-1, model.decoder.max_positions - 1)
    assert interfaces.PositionalEmbedding.position_range.fget(object()) is None  # unbounded by default
    with pytest.raises(optkit.InputError, match="position_ids contain"):
        model(torch.tensor([[5, 6]]), position_ids=torch.tensor([[0, model.decoder.max_positions]]))


# -- no import cycles ---------------------------------------------------------------------------------------
def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in (ROOT / "optkit").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _lazy_source(modules: dict[str, pathlib.Path], package: str, name: str) -> str | None:
    """Where a package's lazily exported ``name`` really comes from (its ``_LAZY`` table)."""
    if package not in modules:
        return None
    for node in ast.walk(ast.parse(modules[package].read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            table = ast.literal_eval(node.value)
            return table.get(name)
    return None


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """optkit modules this file imports anywhere (function bodies too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}

    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    targets = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == "optkit"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "optkit":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                lazy = _lazy_source(modules, node.module, alias.name)
                targets.add(full if full in modules else lazy or known(node.module))
    return targets


def test_no_import_cycles_between_optkit_modules():
    modules = _modules()
    edges = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(modules):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# -- checkpoint formats come through the plugin hook ------------------------------------------------------------
def test_a_plugin_registers_a_checkpoint_format_and_duplicates_name_both_providers():
    from dataclasses import replace

    from optkit.formats import format_for_config, format_for_spec
    from optkit.formats.opt import OPT
    from optkit.registration import Provider
    from optkit.testing import fresh_registry

    registry = fresh_registry()
    assert format_for_config({"model_type": "opt"}, registry=registry) is OPT
    assert format_for_spec(optkit.load_spec("opt-tiny"), registry=registry) is OPT
    mine = replace(OPT, model_type="acme-opt", family="acme", head_prefixes=("lm_head", "classifier"))
    with registry.providing(Provider("acme", "acme-formats", "1.0")):
        registry.register_format(mine)
    assert format_for_config({"model_type": "acme-opt"}, registry=registry) is mine
    assert "acme-opt" not in {f.model_type for f in optkit.registry.formats()}  # only in this registry
    with registry.providing(Provider("other", "other-formats", "2.0")):
        with pytest.raises(optkit.DuplicateComponentError, match=r"acme-opt.*acme-formats 1.0.*other-formats 2.0"):
            registry.register_format(replace(mine))
    with pytest.raises(optkit.CheckpointError, match="model_type is 'gpt2'; optkit loads 'acme-opt', 'open-llama', 'opt'"):
        format_for_config({"model_type": "gpt2"}, registry=registry)
    with pytest.raises(optkit.OptkitError, match="CheckpointFormat"):
        registry.register_format({"model_type": "x"})


def test_capabilities_a_kernel_does_not_declare_are_refused_where_they_matter():
    from optkit.testing import fresh_registry

    registry = fresh_registry()
    eager = registry.get("attention", "eager")
    registry.register("attention", "bare", eager.factory,
                      capabilities=optkit.Capabilities(padding=False, kv_cache=False, backward=False, dropout=False))
    model = optkit.build("opt-tiny", attention="bare", registry=registry).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(ids)  # plain prefill: nothing it lacks is needed
        with pytest.raises(optkit.BackendUnavailableError, match="does not support padding.*can: eager"):
            model(ids, attention_mask=torch.tensor([[0, 1, 1]]))
        with pytest.raises(optkit.BackendUnavailableError, match="does not support kv_cache"):
            model(ids, use_cache=True)
    model.train()
    with pytest.raises(optkit.BackendUnavailableError, match="does not support backward"):
        model(ids)
    optkit.set_backend(model, attention="eager")
    model(ids).logits.sum().backward()  # the swap brings the capabilities with it
