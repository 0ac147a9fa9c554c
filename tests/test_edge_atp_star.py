"""AtP* on edges (recipes/edge_atp_star.py, nnattr.kernels.qk_edges) against a plain-PyTorch reference.

The reference (`tests/support/edges_reference.atp_star_edges`) reruns the corrupted prompts with each writer's
change added to the input of a later layer's attention pre-norm, lets the model compute the moved queries and keys
itself (rotary embeddings included), and recomputes the softmax in full with ``d m / d A`` from autograd; every
other edge is the slow EAP reference. GradDrop's reference detaches one block's contribution with a forward hook.
No nnsight, no nnattr kernel.
"""

from __future__ import annotations

import pytest
import torch

import nnattr
from nnattr.recipes import edge_atp_star, edge_attribution_patching as eap
from tests.support import edges_reference as er
from tests.support import tiny
from tests.test_edges import ANSWER, CLEAN, CORRUPTED, DISTRACTOR, compare, ids, tokens
from tests.test_patching import build

torch.set_num_threads(1)
QK_NORM = {"qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma3_text"}  # queries, keys not affine in the norm's output
REFUSED = {"falcon": "attention interface", "falcon_new": "attention interface", "gemma2": "soft-caps",
           "gpt_oss": "sinks"}


def reference(arch, **kw):
    hf = build(arch).double() if kw.get("step") and arch != "qwen3_moe" else build(arch)  # (grouped_mm: no float64)
    return er.atp_star_edges(hf, arch, ids(CLEAN), ids(CORRUPTED), tokens(ANSWER), tokens(DISTRACTOR), **kw)


@pytest.mark.parametrize("arch", [a for a in tiny.ARCHS if a not in REFUSED])
def test_matches_the_reference_on_every_family(sharp_zoo, arch, record_property):
    """Exact where queries and keys are affine in the pre-norm's output; QK-norm families move them to first order
    (a forward-mode product), so their reference is a central difference on the norm's output in a float64 model
    (whose norms still compute in float32: the quotient carries float32 rounding, 3e-4 on scores up to 6)."""
    _, model = sharp_zoo(arch)
    result = edge_atp_star.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    if arch in QK_NORM:
        step, tol = (1e-2, 2e-3) if arch == "qwen3_moe" else (1e-3, 3e-4)  # a float32 quotient: a larger step
        assert compare(result, reference(arch, step=step), nnattr.arch.arch_of(model)) < tol
        record_property("approximate", "queries and keys move through the QK-norm to first order (the softmax is "
                                       "exact)" + ("; heads pass the norm after attention at its measured scale"
                                                   if not nnattr.arch.arch_of(model).head_exact else ""))
    else:
        assert compare(result, reference(arch), nnattr.arch.arch_of(model)) < 1e-4  # float32, saturated heads
    assert result.meta["method"] == "atp*" and result.method == "edge_atp_star"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grad_drop_matches_detached_blocks(sharp_zoo, arch):
    _, model = sharp_zoo(arch)
    result = edge_atp_star.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, grad_drop=True)
    n = model.config.num_hidden_layers
    runs = [reference(arch, drop=layer) for layer in range(n)]  # dropping a reader's own layer zeroes its edges:
    want = {edge: sum(run[edge].abs() for run in runs) / (n if edge[1] == "logits" else n - 1)  # the others' mean
            for edge in runs[0]}
    assert compare(result, want, nnattr.arch.arch_of(model)) < 1e-4
    assert result.meta["grad_drop"] is True


def test_other_edges_are_plain_eap_and_small_changes_agree(sharp_zoo):
    """Values, MLPs and logits are plain EAP; queries and keys differ from it only through the softmax."""
    _, model = sharp_zoo("llama")
    star, plain = (recipe.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR) for recipe in (edge_atp_star, eap))
    qk = torch.tensor([r.endswith((" q", " k")) for r in star.labels["reader"]])
    torch.testing.assert_close(star.values[..., ~qk], plain.values[..., ~qk], equal_nan=True, atol=1e-6, rtol=0)
    assert torch.equal(star.values.isnan(), plain.values.isnan())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_padded_batch_equals_each_pair_alone(sharp_zoo, arch):
    """Pairs of different lengths (and a pair whose prompts differ in length) left-padded in one batch."""
    _, model = sharp_zoo(arch)
    clean, corrupted = tiny.prompts(3, lengths=(5, 7, 4)), tiny.prompts(3, seed=4, lengths=(5, 7, 6))
    answer, distractor = ["w5", "w17", "w42"], ["w9", "w3", "w60"]
    for grad_drop in (False, True):
        batch = edge_atp_star.run(model, clean, corrupted, answer, distractor, grad_drop=grad_drop)
        for i in range(3):
            alone = edge_atp_star.run(model, clean[i], corrupted[i], answer[i], distractor[i], grad_drop=grad_drop)
            torch.testing.assert_close(batch.values[i], alone.values[0], atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("arch", REFUSED)
def test_refuses_families_whose_softmax_it_cannot_recompute(sharp_zoo, arch):
    with pytest.raises(ValueError, match=REFUSED[arch]):
        edge_atp_star.run(sharp_zoo(arch)[1], CLEAN, CORRUPTED, ANSWER, DISTRACTOR)


def test_tiny_ioi_resid_false_negative():
    """The report's ``resid_pre_0@-5`` false negative: the pair differs only there, so patching it is the whole
    clean - corrupted difference (46); plain EAP's embedding edges sum to 0.37, AtP*'s QK fix on the edges into
    layer 0's queries recovers about half."""
    model = nnattr.load("tiny-ioi")
    args = ("When Mary and John went to the store , John gave a drink to",
            "When Mary and John went to the store , Mary gave a drink to", " Mary", " John")
    star, plain = edge_atp_star.run(model, *args), eap.run(model, *args)
    i = star.labels["writer"].index("embed")
    total = star.per_prompt["clean_metric"][0] - star.per_prompt["corrupted_metric"][0]
    assert abs(total - 45.98) < 0.01
    assert abs(plain.values[0, i].nansum() - 0.37) < 0.01
    assert 24 < star.values[0, i].nansum() < 25
    j = star.labels["reader"].index("L0H2 q")  # the model's largest edge: 43.5 exact (docs/make_atp_star.py)
    assert abs(plain.values[0, i, j]) < 0.05 and abs(star.values[0, i, j] - 21.29) < 0.01
