"""Circuits (nnattr/circuits.py) and their faithfulness (recipes/circuit_faithfulness.py).

The reference (`tests/support/edges_reference.edge_ablated_metric`) runs the clean prompts with forward hooks
that record every writer as the forward computes it and give each reader its own input: that input minus,
for every writer whose edge into it is not kept, the writer's value now minus its corrupted value (or minus
the value, for zero ablation); module paths and head slices come from the family table written from the Hugging
Face sources. No nnsight, no nnattr kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nnattr
from nnattr import circuits
from nnattr.embedded import tasks
from nnattr.plotting import plot_circuit, plot_faithfulness
from nnattr.recipes import circuit_faithfulness as cf
from nnattr.recipes import edge_attribution_patching as eap
from tests.support import edges_reference as er
from tests.support import tiny
from tests.test_edges import ANSWER, CLEAN, CORRUPTED, DISTRACTOR, ids, tokens

torch.set_num_threads(1)


def edges_of(model):
    result = eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    return result, int((~result.values[0].isnan()).sum())


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_edge_is_the_clean_run_and_none_the_corrupted_one(sharp_zoo, arch):
    _, model = sharp_zoo(arch)
    scores, total = edges_of(model)
    every, none = circuits.top_edges(scores, total), circuits.top_edges(scores, 0)
    result = cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=[every, none])
    torch.testing.assert_close(result.values, torch.tensor([[1.0, 0.0]] * len(CLEAN)), atol=2e-5, rtol=0)
    metrics = torch.tensor(result.per_prompt["circuit_metric"])
    torch.testing.assert_close(metrics[:, 0], torch.tensor(result.per_prompt["clean_metric"]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gptj", "falcon_new", "phi3", "gpt_neox", "qwen2_moe",
                                  "gemma2", "olmo2", "gemma3_text"])  # the last three: heads behind a norm
@pytest.mark.parametrize("ablation", ["patch", "zero"])
def test_a_circuit_matches_the_edge_ablated_reference(sharp_zoo, arch, ablation):
    hf, model = sharp_zoo(arch)
    scores, total = edges_of(model)
    kept = [circuits.greedy(scores, total // 4), circuits.top_edges(scores, total // 3)]
    if ablation == "zero" and arch == "gemma3_text":  # a reader with every edge zeroed reads float rounding through
        every = {r for r in scores.labels["reader"]}  # its norm (docs/methods/circuits.md): keep one edge into each
        kept = [c | circuits.Circuit(frozenset(("embed", r) for r in every)) for c in kept]
    result = cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=kept, ablation=ablation)
    names = {e: f"embed{j}" for j, e in enumerate(nnattr.arch.arch_of(model).embeddings)}
    for c, circuit in enumerate(kept):
        keep = {(names.get(w, w), r) for w, r in circuit.edges}
        want = er.edge_ablated_metric(hf, arch, ids(CLEAN), ids(CORRUPTED), tokens(ANSWER), tokens(DISTRACTOR), keep,
                                      zero=ablation == "zero")
        got = torch.tensor(result.per_prompt["circuit_metric"])[:, c]
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)  # float32, sharpened weights
    assert result.meta == {"ablation": ablation, "edges": [len(c) for c in kept], "total": total}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_mean_and_resample_ablation_match_the_reference(sharp_zoo, arch, ablation):
    """Outside the circuit a reader reads the writer's mean over the corrupted prompts, or another pair's
    corrupted value (the draw the result records is the one the reference uses)."""
    hf, model = sharp_zoo(arch)
    scores, total = edges_of(model)
    kept = circuits.top_edges(scores, total // 3)
    result = cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=kept, ablation=ablation, seed=3)
    names = {e: f"embed{j}" for j, e in enumerate(nnattr.arch.arch_of(model).embeddings)}
    keep = {(names.get(w, w), r) for w, r in kept.edges}
    source = "mean" if ablation == "mean" else torch.tensor([1, 0])  # two pairs: each reads the other's
    want = er.edge_ablated_metric(hf, arch, ids(CLEAN), ids(CORRUPTED), tokens(ANSWER), tokens(DISTRACTOR), keep,
                                  source=source)
    torch.testing.assert_close(torch.tensor(result.per_prompt["circuit_metric"])[:, 0], want.float(), atol=1e-4,
                               rtol=1e-4)
    assert result.meta["ablation"] == ablation


def test_curve_normalises_by_the_empty_circuit_where_it_is_not_the_corrupted_run(sharp_zoo):
    _, model = sharp_zoo("gpt2")
    scores, total = edges_of(model)
    c = circuits.curve(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, scores=scores, sizes=[total // 4, total],
                       ablation="zero")
    assert c.meta["edges"] == [0, total // 4, total] and c.labels["circuit"][0] == "empty"
    mean = c.values.float().mean(0)
    assert abs(mean[0]) > 1e-3  # zero-ablating every edge is not the corrupted run
    faithful, share = (mean - mean[0]) / (1 - mean[0]), torch.tensor([0, (total // 4) / total, 1.0])
    assert c.meta["cpr"] == pytest.approx(float(torch.trapezoid(faithful, share)), abs=1e-6)
    assert c.meta["cmd"] == pytest.approx(float(torch.trapezoid((1 - faithful).abs(), share)), abs=1e-6)


def test_top_edges_and_greedy(sharp_zoo):
    _, model = sharp_zoo("llama")
    scores, total = edges_of(model)
    mean = scores.values.nanmean(0)
    top = circuits.top_edges(scores, 5)
    W, R = scores.labels["writer"], scores.labels["reader"]
    fifth = mean.abs().nan_to_num(-1).flatten().sort(descending=True).values[4]
    assert len(top) == 5 and all(abs(mean[W.index(w), R.index(r)]) >= fifth for w, r in top.edges)
    grown = circuits.greedy(scores, 12)
    reached = {"logits"}
    for w, r in sorted(grown.edges, key=lambda e: -abs(mean[W.index(e[0]), R.index(e[1])])):
        reached.add(w)
    assert all(r == "logits" or r.split(" ")[0].replace("KV", "H") in reached or r.endswith("MLP") and r in reached
               or any(h in reached for h in circuits._component(r, 2)) for _, r in grown.edges)  # connected
    assert repr(grown) == "Circuit(greedy 12: 12 of %d)" % total
    with pytest.raises(ValueError, match="the model has"):
        circuits.top_edges(scores, total + 1)
    with pytest.raises(ValueError, match="keep each pair's top 5 only"):
        circuits.top_edges(eap.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, top_k=5), 3)
    with pytest.raises(ValueError, match="give an edge_attribution_patching result"):
        circuits.greedy({"head": scores}, 3)
    both = top | grown
    assert len(both) == len(top.edges | grown.edges) and (top & grown).edges == top.edges & grown.edges
    with pytest.raises(ValueError, match="is not an edge of this model"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR,
               circuit=circuits.Circuit(frozenset({("L1H0", "L0H0 q")}), total))


def test_bad_options_are_refused(sharp_zoo):
    _, model = sharp_zoo("gpt2")
    with pytest.raises(ValueError, match="ablation='mode'"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, edges=3, ablation="mode")
    with pytest.raises(ValueError, match="one batch"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, edges=3, ablation="mean", batch_size=1)
    for one_pair in ("mean", "resample"):
        with pytest.raises(ValueError, match="at least 2 pairs"):
            cf.run(model, CLEAN[:1], CORRUPTED[:1], ANSWER[:1], DISTRACTOR[:1], edges=3, ablation=one_pair)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, edges=3, ablation="mean", batch_size=0)
    with pytest.raises(ValueError, match="seed='x'"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, edges=3, seed="x")
    with pytest.raises(ValueError, match="a circuit's edges are \\(writer, reader\\) name pairs"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=[{"L0H0"}])
    by_hand = cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit={("L1H0", "logits"), ("L0H1", "L1H0 v")})
    assert by_hand.meta["edges"] == [2] and by_hand.meta["total"] == 137  # a set of edges is a circuit
    with pytest.raises(ValueError, match="circuit=\\[\\]"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=[])
    with pytest.raises(ValueError, match="not both"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=circuits.Circuit({("L1H0", "logits")}), edges=3)
    with pytest.raises(ValueError, match="not a share"):
        cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, edges=0.1)
    sized = cf.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)  # the top 1, 2, 5, 10, 20, 50 and 100% by EAP
    assert sized.meta["edges"][-1] == sized.meta["total"] and sized.values[:, -1].tolist() == pytest.approx([1, 1])
    with pytest.raises(ValueError, match="pairs of unequal token lengths"):
        cf.run(model, CLEAN, [c + " w3" for c in CORRUPTED], ANSWER, DISTRACTOR, edges=3)


def test_the_ioi_circuit_of_tiny_ioi():
    """Found on 32 pairs, measured on 32 others: 10% of the edges recover at least 90% of the logit difference,
    and the circuit's heads are the ones docs/embedded_model.md describes (L0H2 into the layer-1 heads, which
    write to the logits)."""
    model = nnattr.load("tiny-ioi")

    def pairs(seed):
        ps = tasks.ioi_pairs(32, seed=seed)
        return [p["clean"] for p in ps], [p["corrupted"] for p in ps], [p["answer"] for p in ps], \
            [p["distractor"] for p in ps]

    scores = eap.run(model, *pairs(2), method="ig", steps=5)
    total = int((~scores.values[0].isnan()).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = circuits.curve(model, *pairs(1), scores=scores, sizes=[total // 10, total])
    assert curve.values.mean(0)[0] >= 0.9 and curve.values.mean(0)[1] == pytest.approx(1.0, abs=1e-4)
    shares, means = [0.0, 0.1 * (total // 10) / (total / 10), 1.0], [0.0, *curve.values.mean(0).tolist()]
    assert curve.meta["cpr"] == pytest.approx(float(torch.trapezoid(torch.tensor(means), torch.tensor(shares))))
    assert curve.meta["cmd"] == pytest.approx(float(torch.trapezoid((1 - torch.tensor(means)).abs(),
                                                                    torch.tensor(shares))))
    circuit = circuits.top_edges(scores, total // 10)
    heads = {w for w, _ in circuit.edges if w.startswith("L")}
    assert {"L0H2", "L1H0", "L1H1", "L1H2", "L1H3"} <= heads
    assert {("L1H0", "logits"), ("L0H2", "L1H0 v")} <= circuit.edges
    plot_circuit(circuit, scores)
    plot_faithfulness(curve)
