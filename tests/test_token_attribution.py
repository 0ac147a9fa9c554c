"""Token attribution (``recipes/token_attribution.py``) against plain autograd on the Hugging Face weights.

The reference here is written from the math, without nnsight or nnattr: the input vector
``x = embed(ids) (+ wpe(positions) on GPT-2)`` is built from the HF modules, the path points are
fed back through ``model(inputs_embeds=point - position_embedding)``, and the gradient comes
from ``torch.autograd.grad``. One prompt at a time, unpadded, so it also checks that a padded
batch equals its prompts run alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nnattr
from nnattr.kernels import ig_path, integrated_gradients, riemann_mean, token_scores
from nnattr.embedded import tasks
from nnattr.recipes import direct_logit_attribution, token_attribution
from nnattr.result import CompletenessWarning
from tests.support import reference, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = tiny.prompts(3)  # 5, 7 and 4 tokens: a left-padded batch
TARGETS, DISTRACTORS = ["w5", "w17", "w42"], ["w9", "w3", "w60"]
IOI = tasks.ioi_prompts(3, seed=1, split="test")
quiet = pytest.mark.filterwarnings("ignore::nnattr.result.CompletenessWarning")  # parity at few steps


class Zoo(dict):
    """``zoo[arch]``: ``(hf_model, nnattr model)`` on the same weights, built on first use."""

    def __missing__(self, arch):
        hf = tiny.hf_model(arch)
        self[arch] = hf, nnattr.load(hf, tiny.tokenizer())
        return self[arch]


@pytest.fixture(scope="module")
def zoo():
    return Zoo()


@pytest.fixture(scope="module")
def ioi():
    model = nnattr.load("tiny-ioi")
    return model._module, model


def position_embedding(hf, length: int) -> torch.Tensor:
    """``[1, pos, d_model]``: what GPT-2 adds to the token embedding; zero for rotary models."""
    wpe = getattr(getattr(hf, "transformer", None), "wpe", None)
    d = hf.get_input_embeddings().weight.shape[1]
    return torch.zeros(1, length, d) if wpe is None else wpe(torch.arange(length))[None]


def plain(hf, ids, *, read=-1, target=None, distractor=None, steps=None, baseline="zero", fill=None):
    """Integrated gradients (right Riemann sum, ``steps`` points) or, with ``steps=None``, gradient
    × input of one unpadded prompt ``ids: [pos]``. Returns ``(scores [pos], f(x), f(b))``."""
    ids = torch.as_tensor(ids)[None]
    with torch.enable_grad():
        pos = position_embedding(hf, ids.shape[1]).detach()
        x = (hf.get_input_embeddings()(ids) + pos).detach()  # [1, pos, d_model]
        if baseline == "zero":  # the token embedding zero, the position embedding kept
            b = pos.expand_as(x).clone()
        else:
            b = (hf.get_input_embeddings()(torch.full_like(ids, fill)) + pos).detach()
        logits = hf(input_ids=ids).logits[0, read].float()
        t = int(logits.argmax()) if target is None else target

        def f(points):  # [rows, pos, d_model] -> [rows]
            out = hf(inputs_embeds=points - pos).logits[:, read].float()
            return out[:, t] - (0 if distractor is None else out[:, distractor])

        alphas = torch.tensor([1.0]) if steps is None else torch.arange(1, steps + 1) / steps
        points = (b + alphas[:, None, None] * (x - b)).requires_grad_(True)  # [steps, pos, d_model]
        grad = torch.autograd.grad(f(points).sum(), points)[0].mean(0)  # [pos, d_model]
        delta = x[0] if steps is None else (x - b)[0]
        return (grad * delta).sum(-1).detach(), float(f(x).detach()), float(f(b).detach())


def ids_of(model, text):
    return model.tokenizer(text)["input_ids"]


def own(values, i, n):
    """Prompt ``i``'s real positions of a batched ``[prompt, position]`` result."""
    return values[i, values.shape[1] - n:]


# ----------------------------------------------------------------------------- against plain autograd


@quiet
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma", "gemma2"])
def test_integrated_gradients_equal_plain_autograd(zoo, arch):
    hf, model = zoo[arch]
    at = [2, -1, 1]
    result = token_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, steps=8, baseline="pad", position=at)
    t, d = (model.tokenizer.convert_tokens_to_ids(w) for w in (TARGETS, DISTRACTORS))
    for i, p in enumerate(PROMPTS):
        ids = ids_of(model, p)
        scores, fx, fb = plain(hf, ids, read=at[i], target=t[i], distractor=d[i], steps=8, baseline="pad", fill=0)
        torch.testing.assert_close(own(result.values, i, len(ids)), scores, atol=1e-4, rtol=0)
        assert result.per_prompt["metric"][i] == pytest.approx(fx, abs=1e-5)
        assert result.per_prompt["baseline_metric"][i] == pytest.approx(fb, abs=1e-5)
        gap = float(scores.sum()) - (fx - fb)
        assert result.per_prompt["completeness_error"][i] == pytest.approx(gap, abs=1e-4)
    assert result.meta["completeness_error"] == max(map(abs, result.per_prompt["completeness_error"]))
    assert result.meta | {"completeness_error": 0} == {"method": "ig", "read_at": [2, 6, 1], "steps": 8,
                                                       "baseline": "pad", "rule": "right Riemann",
                                                       "completeness_error": 0}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_gradient_times_input_equals_plain_autograd(zoo, arch):
    hf, model = zoo[arch]
    result = token_attribution.run(model, PROMPTS, method="grad_x_input")  # the model's top prediction
    for i, p in enumerate(PROMPTS):
        ids = ids_of(model, p)
        scores, fx, _ = plain(hf, ids)
        torch.testing.assert_close(own(result.values, i, len(ids)), scores, atol=1e-5, rtol=0)
        assert result.per_prompt["metric"][i] == pytest.approx(fx, abs=1e-5)
    assert result.dims == ("prompt", "position") and result.by == "grad_x_input"


@quiet
def test_tiny_ioi_integrated_gradients_and_gradient_times_input(ioi):
    hf, model = ioi
    prompts, answers, others = ([item[k] for item in IOI] for k in ("prompt", "answer", "distractor"))
    ig = token_attribution.run(model, prompts, answers, others, steps=16)  # zero baseline
    bos = token_attribution.run(model, prompts, answers, others, steps=16, baseline="bos")
    grad = token_attribution.run(model, prompts, answers, others, method="grad_x_input")
    for i, p in enumerate(prompts):
        ids = ids_of(model, p)
        t, d = (model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (answers[i], others[i]))
        for result, kw in ((ig, dict(steps=16)), (bos, dict(steps=16, baseline="bos", fill=ids[0])), (grad, {})):
            scores, fx, fb = plain(hf, ids, target=t, distractor=d, **kw)
            torch.testing.assert_close(own(result.values, i, len(ids)), scores, atol=1e-4, rtol=0)
        assert bos.values[i, -len(ids)] == 0  # the BOS token is its own baseline
    assert ig.tokens[0][0] == "<bos>" and [t.strip() for t in ig.per_prompt["target"]] == [a.strip() for a in answers]


def test_attention_path_is_dla_by_head_and_source_summed(zoo, ioi):
    for hf, model in (zoo["gpt2"], zoo["llama"], ioi):
        prompts = [item["prompt"] for item in IOI] if model is ioi[1] else PROMPTS
        result = token_attribution.run(model, prompts, method="attention")
        dla = direct_logit_attribution.run(model, prompts, by="head_position")
        torch.testing.assert_close(result.values, dla.values.sum((1, 2)), atol=1e-5, rtol=0, equal_nan=True)
        assert result.per_prompt["target"] == dla.per_prompt["target"]
    hf, model = zoo["gpt2"]
    result = token_attribution.run(model, PROMPTS, method="attention")
    for i, p in enumerate(PROMPTS):  # and the plain-hooks reference, prompt by prompt
        ids = torch.tensor([ids_of(model, p)])
        expected = reference.dla_head_positions(hf, ids).sum((1, 2))[0].float()
        torch.testing.assert_close(own(result.values, i, ids.shape[1]), expected, atol=1e-5, rtol=0)


def test_attention_path_refused_where_heads_are_not_exact(zoo):
    with pytest.raises(ValueError, match="not exact on Gemma-2"):
        token_attribution.run(zoo["gemma2"][1], PROMPTS, method="attention")


# ----------------------------------------------------------------------------- completeness


def linear_gpt2():
    """A GPT-2 whose logits are linear in the input embeddings: its one block writes nothing (both
    output projections zero, so the residual stream passes through) and the final norm is the
    identity, so ``f(x) = (W_U[t] - W_U[t']) . x_read``. Integrated gradients is then exact at any
    number of steps: the gradient is the same at every point of the path."""
    hf = tiny.hf_model("gpt2")
    with torch.no_grad():
        for block in hf.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    hf.transformer.ln_f = nn.Identity()
    return hf


def test_completeness_is_exact_where_f_is_linear():
    hf = linear_gpt2()
    model = nnattr.load(hf, tiny.tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        for baseline in ("zero", "pad"):
            result = token_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, steps=1, baseline=baseline)
            assert result.meta["completeness_error"] < 1e-5
    W_U = hf.lm_head.weight.detach()
    for i, p in enumerate(PROMPTS):  # all on the read token: (W_U[t] - W_U[t']) . (x - b) there, 0 elsewhere
        ids = ids_of(model, p)
        t, d = model.tokenizer.convert_tokens_to_ids([TARGETS[i], DISTRACTORS[i]])
        wte, wpe = hf.transformer.wte.weight.detach(), hf.transformer.wpe.weight.detach()
        pad, x = wte[0] + wpe[len(ids) - 1], wte[ids[-1]] + wpe[len(ids) - 1]
        row = own(result.values, i, len(ids))
        assert float(row[-1]) == pytest.approx(float((W_U[t] - W_U[d]) @ (x - pad)), abs=1e-5)
        assert row[:-1].abs().max() < 1e-6


def test_too_few_steps_warn_and_report_the_gap(zoo):
    model = zoo["llama"][1]
    with pytest.warns(CompletenessWarning, match=r"raise steps \(e\.g\. to 8\)"):
        coarse = token_attribution.run(model, PROMPTS, TARGETS, steps=2)
    error = torch.tensor(coarse.per_prompt["completeness_error"])
    gap = torch.tensor(coarse.per_prompt["metric"]) - torch.tensor(coarse.per_prompt["baseline_metric"])
    torch.testing.assert_close(error.double(), coarse.values.nansum(-1).double() - gap.double(), atol=1e-5, rtol=0)
    assert (error.abs() > 0.05 * gap.abs()).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)  # a random tiny model: still over 5% at 64 steps
        fine = token_attribution.run(model, PROMPTS, TARGETS, steps=64, baseline="pad")
    assert fine.meta["completeness_error"] < coarse.meta["completeness_error"]


def test_kernels_on_known_functions():
    # f(x) = sum(w * x) is linear: every point's gradient is w, so IG = (x - b) * w exactly.
    x, b, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(3, 4)
    path = ig_path(x, b, steps=5)
    assert path.shape == (12, 3, 4) and torch.equal(path[:2], b) and torch.equal(path[-2:], x)
    torch.testing.assert_close(path.view(6, 2, 3, 4)[2], b + 0.4 * (x - b))  # step-major, a = k / steps
    scores = integrated_gradients(w.expand(12, 3, 4), x, b, steps=5)
    torch.testing.assert_close(scores, ((x - b) * w).sum(-1))
    # f(x) = sum(x^2): the right Riemann sum of 2 (b + a (x - b)) . (x - b) is (f(x) - f(b)) + |x - b|^2 / steps.
    scores = integrated_gradients(2 * path, x, b, steps=5)
    exact = (x.pow(2) - b.pow(2)).sum(-1) + (x - b).pow(2).sum(-1) / 5
    torch.testing.assert_close(scores, exact)
    assert torch.equal(riemann_mean(torch.arange(3.0)[:, None].repeat(1, 2), steps=2), torch.tensor([[1.5, 1.5]]))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert token_scores(torch.ones(2, 3, 4), torch.full((2, 3, 4), float("inf")), mask)[0, 0] == 0  # padding: 0


# ----------------------------------------------------------------------------- batches, padding, positions


@quiet
def test_a_batch_equals_its_prompts_one_by_one(zoo):
    model = zoo["mistral"][1]
    for method, kw in (("ig", dict(steps=4, baseline="bos")), ("grad_x_input", {}), ("attention", {})):
        batched = token_attribution.run(model, PROMPTS, TARGETS, method=method, batch_size=2, **kw)
        for i, p in enumerate(PROMPTS):
            alone = token_attribution.run(model, p, TARGETS[i], method=method, **kw)
            n = len(alone.tokens[0])
            torch.testing.assert_close(own(batched.values, i, n), alone.values[0], atol=1e-5, rtol=0)
            assert batched.values[i, : batched.values.shape[1] - n].isnan().all()  # padding: no attribution
        assert batched.labels["position"] == [str(p - 7) for p in range(7)]
        assert batched[1].labels["position"][:2] == ["0:w14", "1:w17"] or batched[1].labels["position"][0][:2] == "0:"


# ----------------------------------------------------------------------------- bad input, the command line


@pytest.mark.parametrize("kwargs, problem", [
    (dict(steps=0), r"steps=0: give a whole number of at least 1"),
    (dict(steps=2.5), r"steps=2\.5: give a whole number"),
    (dict(steps=True), r"steps=True"),
    (dict(baseline="mean"), r"baseline='mean'; expected 'zero' \(zero embeddings\), 'pad' or 'bos'"),
    (dict(method="lime"), r"method='lime'; expected 'ig'"),
    (dict(method="grad_x_input", steps=8), r"options of integrated gradients; pass method='ig'"),
    (dict(method="attention", baseline="pad"), r"options of integrated gradients"),
])
def test_bad_options_are_named(zoo, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        token_attribution.run(zoo["gpt2"][1], PROMPTS, **kwargs)


def test_the_command_line(tiny_folder, tmp_path, capsys):
    from nnattr.cli import main

    for extra in (["--method", "ig", "--steps", "4", "--baseline", "pad"], ["--method", "attention"]):
        assert main(["token-attribution", "--model", tiny_folder, "--prompt", "w1 w2 w3 w4", "--target", "w7",
                     *extra, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "Token attribution" in out, out
    assert sorted(p.suffix for p in tmp_path.iterdir()) >= [".json", ".png"]
    assert main(["token-attribution", "--model", tiny_folder, "--prompt", "w1 w2", "--steps", "0"]) != 0
    assert "steps" in capsys.readouterr().err


def test_plots(zoo):
    result = token_attribution.run(zoo["gpt2"][1], PROMPTS, method="grad_x_input")
    many, one = result.plot(), result[1].plot()  # prompt × position with each cell's token; one prompt's strip
    texts = {t.get_text() for t in many.axes[0].texts}
    assert set(PROMPTS[1].split()) <= texts and "Token attribution" in many.texts[0].get_text()
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == PROMPTS[1].split()
