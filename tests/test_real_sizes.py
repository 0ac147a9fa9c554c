"""docs/remote.md's real-size tables (Llama-3.1-8B/70B/405B, GPT-J-6B, OLMo-3-7B on the meta device).

`tests/support/real_sizes.py` computes result sizes from shapes; here every formula is checked
against the tensors a tiny model's run really returns (three families, an odd prompt length), the
doc's result table is regenerated and compared, and the measured columns (request bytes, held
memory with the measured autograd graph) are re-measured on Llama-3.1-8B's real configuration.
Regenerate the section with ``PYTHONPATH=. python tests/support/real_sizes.py``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import nnattr
from nnattr import runner
from nnattr.arch import arch_of
from tests.support import real_sizes as rs
from tests.support import tiny

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.filterwarnings("ignore::nnattr.result.CompletenessWarning")]  # 2 IG steps: sizes only
DOC = Path(__file__).resolve().parents[1] / "docs" / "remote.md"
FAMILIES = [a for a in ("llama", "gptj", "olmo3", "gpt2") if a in tiny.ARCHS][:3]


def section() -> str:
    text = DOC.read_text()
    return text[text.index("<!-- real-sizes:begin -->"):text.index("<!-- real-sizes:end -->")]


def table(title: str) -> dict[str, dict[str, str]]:
    """``{recipe: {model: cell}}`` of one of the section's tables."""
    part = section().split(f"**{title}")[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("|")]
    return {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[2:]}


def megabytes(cell: str) -> float:
    number, unit = re.match(r"([\d,.]+) (MB|kB)", cell).groups()
    return float(number.replace(",", "")) * (1 if unit == "MB" else 1e-3)


def nbytes(out) -> int:
    """Bytes of the tensors a trace returned: a dict of them, or a list (activation patching)."""
    return sum(t.numel() * t.element_size() for t in (out.values() if isinstance(out, dict) else out))


@pytest.mark.parametrize("arch", FAMILIES)
def test_result_formulas_are_what_a_run_returns(arch, monkeypatch):
    model = nnattr.load(tiny.hf_model(arch), tiny.tokenizer())
    returned = []
    chunks = runner.chunks

    def spy(*args, **kwargs):  # every trace's output, as the runner receives it (run and chunks alike)
        for start, chunk, out in chunks(*args, **kwargs):
            returned.append(out)
            yield start, chunk, out

    monkeypatch.setattr(runner, "chunks", spy)
    ids = torch.randint(3, tiny.VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    for case, (recipe, kwargs) in rs._recipes().items():
        returned.clear()
        try:
            with warnings.catch_warnings():  # random tiny pairs: a small clean - corrupted gap is fine for sizes
                warnings.simplefilter("ignore")
                rs.run_case(case, model, ids, **({"steps": 2} if kwargs.get("method") == "ig" else {}))
        except ValueError as refusal:  # a head-level method on a family with post-sub-layer norms
            assert "not exact on" in str(refusal)
            continue
        assert len(returned) == 1, case  # one pair / prompt: one request
        assert nbytes(returned[0]) == rs.result_bytes(case, arch_of(model), pos=11), case


def test_the_sae_travels_with_the_request():
    """`request_bytes` measures the SAE recipes with a meta SAE (no data) and adds `sae_bytes`: a real SAE's
    request is the meta one's plus its float32 weights, less what zstd saves on them (random weights here)."""
    from nnattr.features import SAE
    from nnattr.remote import Deferred

    model = nnattr.load(tiny.hf_model("llama"), tiny.tokenizer())
    ids = torch.randint(3, tiny.VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    real = rs.sae(model, ids)
    meta = SAE(**{k: getattr(real, k).to("meta") for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, layer=real.layer)
    weights = rs.sae_bytes(arch_of(model))
    assert weights == sum(getattr(real, k).numel() * 4 for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    for case in [c for c in rs._recipes() if "SAE" in c]:
        sizes = []
        for sae in (real, meta):
            capture = rs._Capture()
            with pytest.raises(Deferred):
                rs.run_case(case, model, ids, backend=capture, sae=sae)
            sizes += capture.sizes
        assert 0.85 * weights < sizes[0] - sizes[1] <= weights, (case, sizes, weights)


def test_the_docs_result_table_is_current():
    archs = {name: arch_of(config()) for name, config in rs.MODELS.items()}
    documented = table("Result")
    assert set(documented) == set(rs._recipes())
    for case, cells in documented.items():
        for name, arch in archs.items():
            assert cells[name] == ("refused" if rs.refused(case, arch) else rs.result_cell(case, arch)), (case, name)
    big = archs["Llama-3.1-405B"]
    over = sorted(c for c in rs._recipes() if rs.result_bytes(c, big) > rs.MB)
    listed = section().split("Over 1 MB at 405B")[1]
    for case in over:  # each has its reduction option (or the reason it has none) in the doc
        assert f"`{case}`" in listed, case
        assert rs.reductions(big)[case] in listed, case
    assert set(rs.reductions(big)) == set(over)  # no stale reduction of a case no longer over 1 MB


def test_request_and_held_memory_measured_on_llama_8b():
    name = "Llama-3.1-8B"
    requests, held = table("Request"), table("Held")
    graph = rs.graph_bytes(name)
    assert f"{name} {rs.size(graph)}" in section()
    arch = arch_of(rs.MODELS[name]())
    for case in rs._recipes():
        measured = rs.request_bytes(name, case) / rs.MB
        assert measured == pytest.approx(megabytes(requests[case][name]), rel=0.25, abs=2e-3), case  # recipes evolve
        assert rs.size(rs.held_bytes(case, arch, graph)) == held[case][name], case
