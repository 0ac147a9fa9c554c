"""Edge attribution patching (recipes/edge_attribution_patching.py, nnattr/kernels/edges.py).

The reference (`tests/support/edges_reference.py`) gives every reader its own zero perturbation
of the residual stream it reads, added where the model reads it (one head's slice of its
projection, recomputed from ``norm(x + eps)``; the MLP's input; the final norm's input), and
takes one plain-autograd backward; writers come from forward hooks. No nnsight, no nnattr kernel.
Models: every tiny family, matrices scaled as in tests/test_patching.py so logits are O(1).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import nnattr
from nnattr import circuits
from nnattr.recipes import attribution_patching, edge_atp_star, edge_attribution_patching as eap
from tests.support import edges_reference as er
from tests.support import reference as ref
from tests.support import tiny

torch.set_num_threads(1)

CLEAN, CORRUPTED = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
ANSWER, DISTRACTOR = ["w7", "w8"], ["w8", "w9"]
TOL = 1e-5


def ids(prompts) -> torch.Tensor:
    return torch.tensor([tiny.tokenizer().convert_tokens_to_ids(p.split()) for p in prompts])


def tokens(words) -> torch.Tensor:
    return torch.tensor(tiny.tokenizer().convert_tokens_to_ids(list(words)))


def compare(result, want: dict, a) -> float:
    """The largest |nnattr - reference| over every edge the reference scores; every other entry must be NaN."""
    names = {f"embed{j}": e for j, e in enumerate(a.embeddings)}
    W, R = result.labels["writer"], result.labels["reader"]
    seen = torch.zeros(result.values.shape[1:], dtype=torch.bool)
    worst = 0.0
    for (w, r), value in want.items():
        i, j = W.index(names.get(w, w)), R.index(r)
        seen[i, j] = True
        worst = max(worst, (result.values[:, i, j].double() - value).abs().max().item())
    assert torch.isnan(result.values[:, ~seen]).all(), "a score where no edge runs"
    assert not torch.isnan(result.values[:, seen]).any()
    return worst


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_matches_the_slow_reference(sharp_zoo, arch, record_property):
    hf, model = sharp_zoo(arch)
    result = eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    want = er.edge_scores(hf, arch, ids(CLEAN), ids(CORRUPTED), tokens(ANSWER), tokens(DISTRACTOR))
    assert compare(result, want, nnattr.arch.arch_of(model)) < TOL
    assert result.dims == ("prompt", "writer", "reader") and result.meta["method"] == "atp"
    assert ("heads" in result.meta) == (not nnattr.arch.arch_of(model).head_exact)  # post-norm heads: said
    if not nnattr.arch.arch_of(model).head_exact:  # the reference takes the same frozen scale
        record_property("approximate", "edges out of heads pass the norm after attention at its scale measured on "
                                       "the corrupted run (first order); every other edge is exact")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "falcon_new"])
def test_integrated_gradients_match_the_slow_reference(sharp_zoo, arch):
    hf, model = sharp_zoo(arch)
    result = eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, method="ig", steps=3)
    want = er.edge_scores(hf, arch, ids(CLEAN), ids(CORRUPTED), tokens(ANSWER), tokens(DISTRACTOR), steps=3)
    assert compare(result, want, nnattr.arch.arch_of(model)) < TOL
    assert result.meta["steps"] == 3 and "EAP-IG" in result.title


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj", "phi3"])
def test_edges_into_a_reader_sum_to_node_atp_at_its_input(sharp_zoo, arch):
    """sum over writers of score(w -> r) = (x_r clean - x_r corrupted) . d m / d x_r: the writers are
    the whole residual stream the reader reads (biases cancel in the difference)."""
    hf, model = sharp_zoo(arch)
    result = eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    grads = er.reader_gradients(hf, arch, ids(CORRUPTED), None, tokens(ANSWER), tokens(DISTRACTOR))
    nat, read = ref.native(hf), er.READ[arch]
    streams = {}
    for run, prompts in (("clean", CLEAN), ("corrupted", CORRUPTED)):
        inputs = {f"x{i}": f"{nat.blocks}.{i}" for i in range(len(ref.blocks(hf)))}
        inputs["final"] = nat.final_norm
        if not read.parallel:
            inputs.update({f"mid{i}": f"{nat.blocks}.{i}.{read.mlp_norm}" for i in range(len(ref.blocks(hf)))})
        with torch.no_grad(), ref.recording(hf, inputs=inputs) as seen:
            ref.forward(hf, ids(prompts))
        streams[run] = dict(seen)
    for j, reader in enumerate(result.labels["reader"]):
        layer = reader.split()[0][1:].split("H")[0].split("K")[0] if reader != "logits" else None
        where = "final" if layer is None else f"x{layer}" if "MLP" not in reader or read.parallel else f"mid{layer}"
        delta = streams["clean"][where] - streams["corrupted"][where]
        node = (delta.double() * grads[reader].double()).sum((1, 2))
        assert torch.allclose(result.values[:, :, j].nansum(1).double(), node, atol=TOL), reader


def test_a_padded_batch_equals_its_pairs_alone(sharp_zoo):
    hf, model = sharp_zoo("llama")
    clean, corrupted = tiny.prompts(3, lengths=(5, 7, 4)), tiny.prompts(3, seed=4, lengths=(6, 7, 3))
    answer, distractor = ["w7", "w8", "w9"], ["w8", "w9", "w10"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = eap.run(model, clean, corrupted, answer, distractor, method="ig", steps=2)
        for i in range(3):
            alone = eap.run(model, clean[i], corrupted[i], answer[i], distractor[i], method="ig", steps=2)
            torch.testing.assert_close(batch.values[i], alone.values[0], atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("recipe, arch", [(eap, "gpt2"), (edge_atp_star, "llama")], ids=["eap", "atp-star"])
def test_top_k_returns_each_pairs_largest_edges_only(sharp_zoo, recipe, arch):
    _, model = sharp_zoo(arch)
    full = recipe.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    top = recipe.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, top_k=5)
    for i in range(len(CLEAN)):
        kept = ~torch.isnan(top.values[i])
        assert kept.sum() == 5 and top.meta["top_k"] == 5
        torch.testing.assert_close(top.values[i][kept], full.values[i][kept])
        fifth = full.values[i].abs().nan_to_num(-1).flatten().sort(descending=True).values[4]
        assert (full.values[i][kept].abs() >= fifth).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gpt_neox"])
def test_edges_out_of_a_writer_sum_to_its_node_in_attribution_patching(sharp_zoo, arch):
    """sum over readers of score(w -> r) = (w clean - w corrupted) . d m / d w: the stream after a writer
    flows only into later readers, so their gradients sum to the writer's. Checked against
    attribution_patching's head and MLP nodes, computed another way (one gradient per node)."""
    _, model = sharp_zoo(arch)
    edges = eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    nodes = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head", "mlp"))
    out_of = edges.values.nansum(2)  # [pair, writer]
    W, a = edges.labels["writer"], nnattr.arch.arch_of(model)
    for layer in range(a.n_layers):
        heads = [W.index(f"L{layer}H{h}") for h in range(a.n_heads)]
        torch.testing.assert_close(out_of[:, heads], nodes["head"].values[:, layer], atol=TOL, rtol=1e-4)
        torch.testing.assert_close(out_of[:, W.index(f"L{layer} MLP")], nodes["mlp"].values[:, layer],
                                   atol=TOL, rtol=1e-4)


def test_labels_name_writers_and_readers():
    a = nnattr.arch.arch_of(tiny.CONFIGS["llama"]())  # 4 heads, 2 kv heads
    assert circuits.writers(a)[:6] == ["embed", "L0H0", "L0H1", "L0H2", "L0H3", "L0 MLP"]
    assert circuits.readers(a)[:9] == ["L0H0 q", "L0H1 q", "L0H2 q", "L0H3 q", "L0KV0 k", "L0KV1 k", "L0KV0 v",
                                       "L0KV1 v", "L0 MLP"]
    assert circuits.readers(a)[-1] == "logits"


def test_bad_options_are_refused(sharp_zoo):
    _, model = sharp_zoo("gpt2")
    with pytest.raises(ValueError, match="method='atp', steps=3"):
        eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, steps=3)
    with pytest.raises(ValueError, match="top_k"):
        eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, top_k=0)


def test_a_spec_that_does_not_say_where_readers_read_is_refused():
    hf = tiny.hf_model("llama")
    spec = dataclasses.replace(nnattr.spec_for(hf), family="My Llama", attn_norm=None, q_proj=None)
    model = nnattr.load(hf, tiny.tokenizer(), spec=spec)
    with pytest.raises(ValueError, match="the spec names no attn_norm or q_proj. Add it to the ArchSpec"):
        eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)


def test_kernels_doctests():
    import doctest

    from nnattr.kernels import edges

    assert doctest.testmod(edges).failed == 0


def test_matches_the_slow_reference_on_the_trained_embedded_model():
    """The same reference on a trained model (tiny-ioi, a GPT-2) and real IOI pairs, one pair at a time."""
    from nnattr.embedded import tasks

    model = nnattr.load("tiny-ioi")
    tok = model.tokenizer
    for pair in tasks.ioi_pairs(3, seed=5):
        result = eap.run(model, pair["clean"], pair["corrupted"], pair["answer"], pair["distractor"])
        clean, corrupted = (tok(pair[k], return_tensors="pt")["input_ids"] for k in ("clean", "corrupted"))
        answer, distractor = (torch.tensor(tok(pair[k])["input_ids"]) for k in ("answer", "distractor"))
        want = er.edge_scores(model._module, "gpt2", clean, corrupted, answer, distractor)
        assert compare(result, want, nnattr.arch.arch_of(model)) < 1e-4  # scores up to about 10
