"""Issue-14 families (famA): the per-expert split of mixture-of-experts MLPs, learned attention
sinks, and the refusals where a method cannot be exact.

The parity of every recipe with the hooks reference, the DLA sum identity and padding invariance
run for these families in the parametrized tests over ``tiny.ARCHS`` (tests/test_recipes.py,
test_positions.py, test_attention_summary.py, test_token_circulation.py); remote == local in
tests/test_families_remote.py. The per-expert reference here zeroes one expert's output weights
and re-runs the native experts module on its recorded inputs, a different route from the
recipe's (which zeroes the other experts' routing weights).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call

import nnattr
from nnattr.recipes import attention_rollout, direct_logit_attribution as dla, expert_attribution as experts
from tests import test_recipes as base
from tests.support import reference as ref, tiny
from tests.test_recipes import DISTRACTORS, PROMPTS, TARGETS, close, ids, token

zoo = base.zoo  # the sharpened tiny models
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]  # 4 experts, top-2, each
AT = [2, -3, 0]


def expert_reference(hf, input_ids, target, distractor) -> torch.Tensor:
    """``[layer, expert]``: each expert's weighted write at the last position through the frozen
    final norm, as the MoE block minus the block with that expert's output weights zeroed."""
    n, seen = hf.config.num_hidden_layers, {}
    modules = [block.get_submodule("mlp.experts") for block in ref.blocks(hf)]
    hooks = [m.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args)) for i, m in enumerate(modules)]
    try:
        r = ref.read_out(hf, input_ids)
    finally:
        for h in hooks:
            h.remove()
    t, t2 = torch.tensor([target]), torch.tensor([distractor])
    out = []
    with torch.no_grad():
        for i in range(n):
            module, args = modules[i], seen[i]
            full = module(*args)  # [tokens, d_model]
            row = []
            for e in range(module.num_experts):
                params = {k: (p.clone().index_fill_(0, torch.tensor([e]), 0.0) if k.startswith("down_proj") else p)
                          for k, p in module.named_parameters()}
                write = (full - functional_call(module, params, args))[-1:].double()  # [1, d_model]
                row.append(ref.frozen_norm_share(hf, write, r.resid, t, t2)[0])
            out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("arch", MOE)
def test_experts_sum_to_the_mlp_write_and_match_the_reference(zoo, arch):
    hf, model = zoo(arch)
    split = experts.run(model, PROMPTS, TARGETS, DISTRACTORS)
    whole = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    n, e, k = hf.config.num_hidden_layers, 4, hf.config.num_experts_per_tok
    names, dense = split.labels["component"], whole.labels["component"]
    assert split.meta["n_experts"] == e and len(names) == len(dense) + n * e
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        shares, logit = ref.dla_components(hf, x, t, d)
        close(split[i].values.sum(), logit[0])  # every part, the whole logit
        row = dict(zip(names, split[i].values.double()))
        expected = expert_reference(hf, x, t, d)  # [layer, expert]
        for layer in range(n):
            each = torch.stack([row[f"L{layer}E{j}"] for j in range(e)])
            close(each, expected[layer])
            close(each.sum() + row[f"{layer}_mlp_rest"], whole[i].values[dense.index(f"{layer}_mlp_out")])
            assert abs(row[f"{layer}_mlp_rest"]) < 1e-5  # no shared expert here: the experts are the whole write
            routing = torch.tensor(split.per_prompt["routing"][i][layer])  # [expert]
            assert int((routing > 0).sum()) == k and (each[routing == 0] == 0).all()
            close(routing.sum(), torch.tensor(1.0))  # top-k weights renormalised on all three families
        for name in [*dense[:1], *[f"{layer}_attn_out" for layer in range(n)], "bias"]:
            close(row[name], whole[i].values[dense.index(name)])


def block_reference(hf, input_ids, target, distractor) -> torch.Tensor:
    """``[layer, expert + 1]``: each routed expert's, then the shared expert's, write at the last position
    through the frozen final norm, as the whole MoE block minus the block re-run on its recorded input
    with that expert's down projection zeroed (the router reads the input: the routing stays)."""
    seen, mlps = {}, [block.get_submodule("mlp") for block in ref.blocks(hf)]
    hooks = [m.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args)) for i, m in enumerate(mlps)]
    try:
        r = ref.read_out(hf, input_ids)
    finally:
        for h in hooks:
            h.remove()
    t, t2 = torch.tensor([target]), torch.tensor([distractor])
    out = []
    with torch.no_grad():
        for i, module in enumerate(mlps):
            full, row = module(*seen[i]), []
            for e in range(module.experts.num_experts + 1):
                params = dict(module.named_parameters())
                if e < module.experts.num_experts:  # routed expert e: its slice of the stacked down projections
                    down = params["experts.down_proj"]  # [expert, d_model, d_ff]
                    params["experts.down_proj"] = down.clone().index_fill_(0, torch.tensor([e]), 0.0)
                else:  # the shared expert
                    params["shared_expert.down_proj.weight"] = params["shared_expert.down_proj.weight"] * 0
                write = (full - functional_call(module, params, seen[i]))[0, -1:].double()  # [1, d_model]
                row.append(ref.frozen_norm_share(hf, write, r.resid, t, t2)[0])
            out.append(torch.stack(row))
    return torch.stack(out)


def test_a_shared_expert_is_its_own_part_and_matches_the_reference(zoo):
    """Qwen2-MoE: routed experts plus a sigmoid-gated shared expert; ``L{i}shared`` is the gated write."""
    hf, model = zoo("qwen2_moe")
    split = experts.run(model, PROMPTS, TARGETS, DISTRACTORS)
    whole = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    n, e, names, dense = 2, 4, split.labels["component"], whole.labels["component"]
    assert names == ["embed", *[x for i in range(n) for x in (f"{i}_attn_out", *[f"L{i}E{j}" for j in range(e)],
                                                              f"L{i}shared", f"{i}_mlp_rest")], "bias"]
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        close(split[i].values.sum(), ref.dla_components(hf, x, t, d)[1][0])
        row = dict(zip(names, split[i].values.double()))
        expected = block_reference(hf, x, t, d)  # [layer, expert + shared]
        for layer in range(n):
            each = torch.stack([row[f"L{layer}E{j}"] for j in range(e)] + [row[f"L{layer}shared"]])
            close(each, expected[layer])
            assert abs(row[f"L{layer}shared"]) > 1e-3 and abs(row[f"{layer}_mlp_rest"]) < 1e-5  # rounding only
            close(each.sum() + row[f"{layer}_mlp_rest"], whole[i].values[dense.index(f"{layer}_mlp_out")])


@pytest.mark.parametrize("change, alias", [({"shared_expert": "shared_experts"}, "mlp.shared_expert"),
                                           ({"shared_expert_gate": "gate_shared"}, "mlp.shared_expert_gate"),
                                           ({"n_experts_key": "num_local_experts"}, "mlp.experts")])
def test_a_moe_spec_from_python_names_a_part_that_does_not_resolve(zoo, change, alias):
    hf, _ = zoo("qwen2_moe")
    spec = dataclasses.replace(nnattr.arch.spec_for(hf.config), family="My-MoE", **change)
    with pytest.raises(nnattr.spec_check.SpecError, match=f"alias '{alias}'") as error:
        nnattr.load(hf, tiny.tokenizer(), spec=spec)
    assert error.value.alias == alias


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_expert_split_padded_and_at_a_position_equals_one_by_one(zoo, arch):
    _, model = zoo(arch)
    batched = experts.run(model, PROMPTS, TARGETS, position=AT, batch_size=2)
    for i, p in enumerate(PROMPTS):
        alone = experts.run(model, p, TARGETS[i], position=AT[i])
        close(batched[i].values, alone[0].values)
        close(torch.tensor(batched.per_prompt["routing"][i]), torch.tensor(alone.per_prompt["routing"][0]))


def test_a_dense_model_gives_plain_dla(zoo):
    _, model = zoo("llama")
    split = experts.run(model, PROMPTS, TARGETS, DISTRACTORS)
    whole = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    assert split.labels == whole.labels and split.meta["n_experts"] == 0 and "routing" not in split.per_prompt
    close(split.values, whole.values, atol=0.0)


def test_attention_sinks_are_dropped_and_rows_renormalised(zoo):
    """GPT-OSS's eager attention returns probabilities over real keys with the sink's column dropped:
    they sum to < 1. Rollout renormalises over real keys (parity with the reference in
    test_recipes.py) and says so; per-position DLA stays exact (the sink has no value vector:
    test_dla_heads_add_up_to_attention)."""
    hf, model = zoo("gpt_oss")
    with torch.no_grad():
        attentions = ref.forward(hf, ids(PROMPTS[1]), output_attentions=True).attentions
    assert max(float(a.sum(-1).max()) for a in attentions) < 1.0  # the sink takes mass from every row
    for view in ("rollout", "flow"):
        result = attention_rollout.run(model, PROMPTS, view=view)
        assert result.meta["attention_sinks"] == nnattr.arch.SINKS
        for i in range(len(PROMPTS)):
            close(result[i].values.sum(-1), torch.ones(result[i].shape[:-1]))
    assert "attention_sinks" not in attention_rollout.run(zoo("mixtral")[1], PROMPTS).meta


@pytest.mark.parametrize("arch", ["olmo2", "olmo3", "gemma3_text"])
def test_post_sublayer_norms_refuse_head_level_methods(zoo, arch):
    _, model = zoo(arch)
    family = nnattr.arch.spec_for(model.config).family
    for by in ("head", "head_position", "all"):
        with pytest.raises(ValueError, match=f"not exact on {family}: each attention output passes through its own "
                                             f"norm.*by='component'"):
            dla.run(model, PROMPTS, by=by)
