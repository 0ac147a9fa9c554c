"""Any read position (``position=``) and DLA's one ranked list (``by="all"``).

A causal model's outputs at position ``p`` depend on tokens ``0..p`` only, so reading a prompt at
``p`` must equal reading the prompt cut after ``p`` at its last token. The references are the
plain-PyTorch hooks of ``tests/support/reference.py`` run on the cut prompts, one by one; nnattr
runs the whole left-padded batch with a different position per prompt.
"""

from __future__ import annotations

import pytest
import torch

import nnattr
from nnattr.batch import Batch
from nnattr.cli import main
from nnattr.recipes import direct_logit_attribution as dla
from nnattr.recipes import head_attribution, logit_lens
from tests.support import reference as ref
from tests.support import tiny
from tests import test_recipes as base
from tests.test_recipes import DISTRACTORS, HEAD_EXACT, PROMPTS, TARGETS, close, ids, token

zoo = base.zoo  # the same fixture: sharpened tiny models
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

AT = [2, -3, 0]  # one per prompt: from the start, from the end, the first token


def cut(prompt: str, position: int) -> torch.Tensor:
    """``[1, pos]``: the prompt's ids up to and including ``position``."""
    x = ids(prompt)
    return x[:, : position % x.shape[1] + 1]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_dla_at_a_position_is_dla_of_the_cut_prompt(zoo, arch):
    hf, model = zoo(arch)
    components = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, position=AT)
    layers = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="layer", position=AT)
    for i, p in enumerate(PROMPTS):
        shares, logit = ref.dla_components(hf, cut(p, AT[i]), token(TARGETS[i]), token(DISTRACTORS[i]))
        close(components[i].values, shares[0])
        close(torch.tensor(components.per_prompt["logit"][i]), logit[0])
        close(layers[i].values.sum(), logit[0])
        assert components.per_prompt["position"][i] == AT[i] % ids(p).shape[1]
        assert components.per_prompt["read_token"][i] == components.tokens[i][AT[i]]
    if arch not in HEAD_EXACT:
        return
    heads = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head", position=AT)
    sources = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position", position=AT)
    for i, p in enumerate(PROMPTS):
        x, t, d = cut(p, AT[i]), token(TARGETS[i]), token(DISTRACTORS[i])
        close(heads[i].values, ref.dla_heads(hf, x, t, d)[0])
        seen = x.shape[1]  # keys after the read position get no attention from it
        close(sources[i].values[..., :seen], ref.dla_head_positions(hf, x, t, d)[0])
        assert not sources[i].values[..., seen:].any()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma2"])
def test_head_attribution_and_logit_lens_at_a_position(zoo, arch):
    hf, model = zoo(arch)
    heads = head_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position", position=AT)
    lens = logit_lens.run(model, PROMPTS, position=AT, k=3)
    named = logit_lens.run(model, PROMPTS, TARGETS, position=AT, k=3)
    for i, p in enumerate(PROMPTS):
        x, full = cut(p, AT[i]), ids(p)
        expected = ref.head_attribution(hf, x, token(TARGETS[i]), token(DISTRACTORS[i]))[0]
        close(heads[i].values[..., : x.shape[1]], expected)
        assert not heads[i].values[..., x.shape[1]:].any()  # later positions cannot move the read logit
        last = x.shape[1] == full.shape[1]
        with torch.no_grad():
            top = hf(x).logits[0, -1].argmax()
        nxt = top if last else full[0, x.shape[1]]  # the next prompt token, or the model's top prediction
        prob, rank, top_prob = ref.logit_lens(hf, x, nxt.view(1, 1), k=3)
        close(lens[i].values, prob[:, 0, 0])
        assert lens.per_prompt["target_rank"][i] == rank[:, 0].tolist()
        close(torch.tensor(lens.per_prompt["top_probs"][i]), top_prob[:, 0])
        close(named[i].values, ref.logit_lens(hf, x, torch.tensor([[token(TARGETS[i])]]), k=3)[0][:, 0, 0])


def test_a_shared_position_and_the_default(zoo):
    _, model = zoo("llama")
    shared = dla.run(model, PROMPTS, TARGETS, by="head", position=-2)
    each = dla.run(model, PROMPTS, TARGETS, by="head", position=[-2] * len(PROMPTS))
    close(shared.values, each.values, atol=0.0)
    close(dla.run(model, PROMPTS, TARGETS, position=-1).values, dla.run(model, PROMPTS, TARGETS).values, atol=0.0)
    for recipe in (head_attribution, logit_lens):
        close(recipe.run(model, PROMPTS, TARGETS, position=-1).values,
              recipe.run(model, PROMPTS, TARGETS, **({"positions": "last"} if recipe is logit_lens else {})).values,
              atol=0.0)
    one_by_one = [dla.run(model, p, TARGETS[i], by="all", position=AT[i]) for i, p in enumerate(PROMPTS)]
    batched = dla.run(model, PROMPTS, TARGETS, by="all", position=AT, batch_size=2)  # chunks keep their positions
    for i, single in enumerate(one_by_one):
        close(batched.values[i], single.values[0])


@pytest.mark.parametrize("arch", HEAD_EXACT)
def test_one_ranked_list_sums_to_the_logit(zoo, arch):
    hf, model = zoo(arch)
    everything = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="all")
    components = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    heads = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head")
    labels = everything.labels["component"]
    n_layers, n_heads = heads.shape[1], heads.shape[2]
    assert everything.dims == ("prompt", "component")
    assert len(labels) == len(components.labels["component"]) + n_layers * n_heads
    assert labels[-1] == "bias" and f"L{n_layers - 1}H{n_heads - 1}" in labels and "L0 attn bias" in labels
    bias = ref.o_proj_bias_shares
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        _, logit = ref.dla_components(hf, x, t, d)
        close(everything[i].values.sum(), logit[0])  # one list, the whole logit
        row = dict(zip(labels, everything[i].values.tolist()))
        for layer in range(n_layers):
            for h in range(n_heads):
                assert row[f"L{layer}H{h}"] == heads[i].values[layer, h].item()
            close(torch.tensor(row[f"L{layer} attn bias"]), bias(hf, x, t, d)[0, layer])  # o_proj's bias, or 0
            assert row[f"L{layer} MLP"] == components[i].values[components.labels["component"].index(
                f"{layer}_mlp_out")].item()
        for name in [*model_embeddings(components), "bias"]:
            assert row[name] == components[i].values[components.labels["component"].index(name)].item()
    top = everything.single().top(3)
    assert len(top) == 3 and all(len(names) == 1 for names, _ in top)  # one call ranks layers, parts and heads


def model_embeddings(components) -> list[str]:
    names = components.labels["component"]
    return names[: names.index("0_attn_out")]


@pytest.mark.parametrize("arch", [a for a in tiny.ARCHS if a not in HEAD_EXACT])
def test_one_ranked_list_refused_where_heads_are_not_exact(zoo, arch):
    _, model = zoo(arch)
    with pytest.raises(ValueError, match=f"not exact on {nnattr.arch.arch_of(model).family}"):
        dla.run(model, PROMPTS, by="all")


@pytest.mark.parametrize("position, problem", [
    (7, r"position 7 for prompt 0, which has \d+ tokens: give an int from -\d+"),
    (-40, "position -40 for prompt 0"),
    ([1, 2], "give one int for every prompt, or a list of 3 ints"),
    (True, "position True"),
    (1.0, "position 1.0"),
    ("2", "give one int for every prompt"),
])
def test_bad_positions_are_named(zoo, position, problem):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=problem):
        dla.run(model, PROMPTS, position=position)


def test_positions_from_the_command_line(tiny_folder, capsys):
    two = ["--prompt", "w1 w2 w3 w4 w5", "--prompt", "w6 w7 w8"]
    assert main(["dla", "--model", tiny_folder, *two, "--by", "all", "--position", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "by head, MLP and bias" in out and "read at token 2 ·" in out and "L0 attn bias" in out
    assert main(["logit-lens", "--model", tiny_folder, *two, "--position", "1", "-1"]) == 0
    assert main(["head-attribution", "--model", tiny_folder, *two, "--position", "1", "2", "3"]) == 1
    assert "a list of 2 ints" in capsys.readouterr().err


def test_batch_read_positions(zoo):
    _, model = zoo("gpt2")
    batch = Batch.of(model, ["w1 w2 w3", "w4 w5"])
    assert batch.positions == tuple(n - 1 for n in batch.lengths)
    at = batch.at([0, -2])
    assert at.positions == (0, batch.lengths[1] - 2) and at[1:].positions == (batch.lengths[1] - 2,)
    assert at.columns.tolist() == [batch.width - batch.lengths[0], batch.width - 2]
    assert at.read_tokens == (batch.tokens[0][0], batch.tokens[1][-2])
    assert Batch.of(model, at).positions == at.positions  # a prepared Batch keeps them
    assert batch.at(None).positions == batch.positions


def test_the_ranked_list_plots_its_top_and_the_rest(zoo):
    _, model = zoo("llama")
    everything = dla.run(model, PROMPTS[0], TARGETS[0], by="all", position=2)
    fig = everything.plot(top=5)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    n = everything.values.numel()
    assert len(names) == 6 and names[-1] == f"the other {n - 5}"
    widths = [bar.get_width() for bar in ax.patches]
    close(torch.tensor(sum(widths)), everything.values.sum(), atol=1e-4)  # the bars still add up to the logit
    assert "read at token 2" in fig._suptitle.get_text()
