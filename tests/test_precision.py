"""Exactness claims measured on the run: DLA's components against the model's own logit, in
float32 (exact to rounding) and in bf16 (not exact: the gap is reported and warned about)."""

from __future__ import annotations

import warnings

import pytest
import torch

import nnattr
from nnattr.recipes import direct_logit_attribution as dla
from nnattr.result import SUM_TOLERANCE, PrecisionWarning, sum_error
from tests.support import tiny

PROMPTS, TARGET, DISTRACTOR = tiny.prompts(3), "w5", "w9"


def model(arch: str, dtype=torch.float32):
    hf = tiny.hf_model(arch)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(10.0)  # logits of a few units, as in tests/test_recipes.py
    return nnattr.load(hf.to(dtype), tiny.tokenizer())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float32_sums_are_exact_and_quiet(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        result = dla.run(model(arch), PROMPTS, TARGET, DISTRACTOR, by="all")
    gap = (result.values.double().sum(1) - torch.tensor(result.per_prompt["logit"]).double()).abs()
    assert result.per_prompt["sum_error"] == pytest.approx(gap.tolist(), abs=1e-6)  # by="all" re-adds its parts
    assert result.meta["sum_error"] == max(result.per_prompt["sum_error"]) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("by", ["component", "head"])
def test_bf16_gaps_are_measured_and_named(arch, by):
    with pytest.warns(PrecisionWarning, match=r"DLA's components miss the model's own value by .* Load the model in "
                                              r"float32"):
        result = dla.run(model(arch, torch.bfloat16), PROMPTS, TARGET, DISTRACTOR, by=by)
    errors = result.per_prompt["sum_error"]
    assert result.meta["sum_error"] == max(errors) > SUM_TOLERANCE
    if by == "component":  # the reported gap is the gap of the values returned
        gap = (result.values.double().sum(1) - torch.tensor(result.per_prompt["logit"]).double()).abs()
        assert errors == pytest.approx(gap.tolist(), abs=1e-6)
    assert result[0].meta["sum_error"] == errors[0]  # each prompt's own


def test_sum_error_kernel():
    parts, whole = torch.tensor([[1.0, 2.0], [10.0, 20.0]]), torch.tensor([3.0, 30.01])
    with pytest.warns(PrecisionWarning, match="on prompt 1 .* 1 of 2 prompts"):
        errors = sum_error(parts, whole, what="the parts")
    assert errors == pytest.approx([0.0, 0.01], abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        sum_error(parts, torch.tensor([3.0, 30.0 + 1e-4]), what="the parts")  # below 1e-4 x 30: quiet
