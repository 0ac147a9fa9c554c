"""What ``nnattr report`` and the command's tables say: metric labels, summaries, alignment,
the top-k agreement, one number and label format, exit status, and progress."""

from __future__ import annotations

import io
import json
import math
import re
import sys

import pytest
import torch

from nnattr import Attribution, report, runner
from nnattr.cli import main
from nnattr.embedded import MODELS
from nnattr.plotting import entry_label, number
from nnattr.validation import compare

EMBEDDED = (MODELS["tiny-ioi"] / "model.safetensors").is_file()
needs_embedded = pytest.mark.skipif(not EMBEDDED, reason="tiny-ioi has no trained weights in this checkout")
PAIR = ["--prompt", "w1 w2 w3 w4 w5", "--corrupted", "w1 w2 w6 w4 w5", "--target", "w7", "--distractor", "w8"]
PER_PROMPT = "logit(target) − logit(distractor)"


def three_significant(text: str) -> bool:
    """``+24.1``, ``-0.0397``, ``1.00``, ``+1.23e-05`` or ``0``: three significant figures."""
    text = text.lstrip("+-")
    if text == "0":
        return True
    mantissa = text.split("e")[0]
    return len(mantissa.replace(".", "").lstrip("0")) == 3


# ----------------------------------------------------------------------------- the report on tiny-ioi


@pytest.fixture(scope="module")
def ioi(tmp_path_factory):
    """The report on three IOI pairs of two lengths, each with its own answers; every figure it
    draws is kept as ``{file: (attribution, figure)}``."""
    import nnattr
    from nnattr.embedded.tasks import ioi_pairs

    pairs = ioi_pairs(3, seed=0)
    drawn = {}
    real = report._figure

    def keep(section, out, name, attr, **kw):
        real(section, out, name, attr, **kw)
        drawn[name] = (attr, attr.plot(**kw))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_figure", keep)
        built = report.build(nnattr.load("tiny-ioi"), [p["clean"] for p in pairs],
                             corrupted=[p["corrupted"] for p in pairs], target=[p["answer"] for p in pairs],
                             distractor=[p["distractor"] for p in pairs], out=tmp_path_factory.mktemp("report"))
    assert not built.failed, [(s.key, s.note) for s in built.failed]
    return built, drawn, pairs


def tables(built) -> dict[str, list]:
    return {s.key: s.tables for s in built.sections}


@needs_embedded
def test_per_prompt_answers_give_the_metric_of_the_result(ioi):
    built, drawn, pairs = ioi
    assert built.header["metric"] == PER_PROMPT
    page = (built.out / "index.html").read_text()
    assert f"<th>metric</th><td><code>{PER_PROMPT}</code>" in page
    for name, (attr, fig) in drawn.items():
        title = fig.get_suptitle()
        if attr.metric and attr.method != "logit_lens":  # rollout has no metric, the lens its probability
            assert attr.metric == PER_PROMPT and PER_PROMPT in title, (name, title)
        assert not any(f"logit({p['answer']!r})" in title for p in pairs), (name, title)  # never prompt 1's answer
    for key in ("dla_component", "dla_head", "head_attribution", "patching"):
        text = next(s.text for s in built.sections if s.key == key)
        assert f"<b>{PER_PROMPT}</b>" in text, key


@needs_embedded
def test_tokens_are_shown_per_prompt(ioi):
    built, _, pairs = ioi
    page = (built.out / "index.html").read_text()
    assert "<th>tokens, per prompt</th>" in page
    for p in pairs:  # each prompt's own tokens, the distinctive ones at least
        assert f"<span class=tok>{p['clean'].split()[3].strip(',')}</span>" in page
    assert built.header["tokens"][0][:2] == ["<bos>", pairs[0]["clean"].split()[0]]
    assert len(built.header["tokens"]) == 3


def test_long_answer_lists_are_summarised(tmp_path):
    n = 200
    header = {"nnattr": "0", "model": "m", "architecture": "a", "prompts": [f"p{i}" for i in range(n)],
              "corrupted": None, "target": [" Mary"] * 120 + [" John"] * 80, "distractor": " Tom",
              "metric": PER_PROMPT, "tokens": [["<bos>", f"p{i}"] for i in range(n)], "seconds": 0.0}
    page = report.render(report.Report(tmp_path, header, []))
    assert "one per prompt: &#x27; Mary&#x27; ×120, &#x27; John&#x27; ×80" in page
    assert page.count("Mary") == 1, "a summary, not 200 names"
    assert "&#x27; Tom&#x27;</code> for all 200 prompts" in page
    assert "<th>tokens, prompts 1–3 of 200</th>" in page and page.count("class=tok") == 6
    assert "… and 195 more" in page
    many = [f" n{i % 30}" for i in range(n)]
    assert report._tally(many).endswith("… and 26 more (172 prompts)")  # 4 names shown, 7 prompts each


@needs_embedded
def test_head_position_strip_is_one_prompt_or_an_aligned_mean_that_says_so(ioi):
    built, drawn, pairs = ioi
    one, fig = drawn["dla_head_position_prompt1.png"]
    assert "prompt 1 of 3" in fig.get_suptitle()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == list(built.header["tokens"][0]), "prompt 1 over its own tokens"
    mean, fig = drawn["dla_head_position.png"]
    assert "mean over 3 prompts (positions counted from the last token)" in fig.get_suptitle()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    lengths = sorted({len(t) for t in built.header["tokens"]})
    assert lengths[0] < lengths[-1], "the pairs must have two lengths for this test"
    assert ticks[-1] == "-1 to", "a column all prompts share names its token"
    assert ticks[0].endswith(" n=1") and ticks[0].startswith(f"-{lengths[-1]} "), "counts where prompts run out"
    assert any(re.fullmatch(r"-\d+ \[\d tokens\]", t) for t in ticks), "mixed columns say so"
    text = next(s.text for s in built.sections if s.key == "dla_head")
    assert "positions counted back from each prompt's last token" in text
    rollout = next(s for s in built.sections if s.key == "rollout")
    assert all(re.fullmatch(r"-\d+ .+", row[0]) for row in rollout.tables[0][1]), "offsets with their tokens"


@needs_embedded
def test_top_k_agreement_is_defined_and_not_trivially_one(ioi):
    built, _, _ = ioi
    header, rows = tables(built)["patching"][1]
    assert header[-1].startswith("top-k agreement: the share of the exact top k")
    assert header[1] == "patched exactly"
    for node_type, patched, *_, agreement in rows:
        n = int(re.match(r"(?:all )?(\d+)", patched).group(1))
        found = re.search(r"\((\d+) of the top (\d+)\)", agreement)
        assert found, agreement
        assert int(found.group(2)) <= n // 2, (node_type, patched, agreement)
    validation = json.loads((built.out / "results.json").read_text())["sections"]["patching"]["validation"]
    assert validation["head"]["n"] == validation["head"]["total"] == 12, "a small node type is patched whole"
    assert validation["resid"]["n"] == 10 < validation["resid"]["total"], "a large one: the top 10 candidates"


def _patching_result(method: str, values, n_covered=None) -> Attribution:
    values = torch.tensor([values])
    if n_covered is not None:  # exact patching of the candidates only: NaN elsewhere
        values[0, n_covered:] = float("nan")
    return Attribution(values, ("prompt", "layer"), {"prompt": ["p"], "layer": [f"L{i}" for i in range(10)]},
                       method=method, by="attn", per_prompt={"clean_metric": [1.0], "corrupted_metric": [0.0]})


def test_top_k_agreement_over_the_candidates_alone_is_never_trivial():
    estimate = _patching_result("attribution_patching", [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    candidates = _patching_result("activation_patching", [0.1, 0.2, 0.3, 0.4, 5, 4, 3, 2, 1, 0], n_covered=4)
    got = compare({"attn": estimate}, {"attn": candidates}, k=4, warn=False)["attn"]
    assert (got.n, got.total, got.k) == (4, 10, 2), "k of the 4 patched is at most 2"
    assert got.top_k == 0.0, "the estimate's top 2 are the exact bottom 2 of the candidates"
    every = compare({"attn": estimate}, {"attn": _patching_result("activation_patching", list(range(10, 0, -1)))},
                    k=3, warn=False)["attn"]
    assert (every.n, every.k, every.top_k) == (10, 3, 1.0)
    assert "entries: the nodes patched exactly" in compare({"attn": estimate}, {"attn": candidates}, warn=False).table()


# ----------------------------------------------------------------------------- one format


def test_number_format_is_three_significant_figures():
    assert [number(v) for v in (24.08, 7.647, -0.8941, 0.7304, 1.0, 9.996, -0.002624, 0.0)] == \
        ["+24.1", "+7.65", "-0.894", "+0.730", "+1.00", "+10.0", "-0.00262", "0"]
    assert number(0.99961, signed=False) == "1.00" and number(1.234e-5) == "+1.23e-05" and number(math.nan) == "nan"


def test_one_label_format():
    def result(dims, labels, **fields):
        values = torch.zeros(1, *[len(v) for v in labels])
        return Attribution(values, ("prompt", *dims), {"prompt": ["p"], **dict(zip(dims, labels))}, **fields)

    heads = result(("layer", "head", "position"), (["L1"], ["H0"], ["-2"]), method="direct_logit_attribution")
    assert entry_label(heads, ("L1", "H0", "-2")) == "L1H0@-2"
    attn = result(("layer",), (["L1"],), method="activation_patching", by="attn_pos")
    assert entry_label(attn, ("L1",)) == "L1 attn"
    fields = result(("layer", "field"), (["L1"], ["rollout_entropy"]), method="attention_summary")
    assert entry_label(fields, ("L1", "rollout_entropy")) == "L1 rollout_entropy"
    key = result(("key",), (["3:John"],), method="attention_rollout")
    assert entry_label(key, ("3:John",)) == "3:John"


@needs_embedded
def test_report_tables_use_one_number_and_label_format(ioi):
    built, _, _ = ioi
    found = tables(built)
    units = {"dla_head": ["direct effect (logits)"],  # the unit in the header
             "head_attribution": ["gradient × activation: first-order effect (logits)", "DLA: direct effect (logits)"],
             "patching": ["attribution patching (metric units)", "exact patching (metric units)", "recovered fraction"]}
    for key, expected in units.items():
        header, rows = found[key][0]
        assert header[1:] == expected
        assert all(re.fullmatch(r"L\dH\d|L\d (attn|mlp)", row[0]) for row in rows), (key, rows)
        assert all(three_significant(cell) for row in rows for cell in row[1:]), (key, rows)
    header, rows = found["patching"][1]
    assert all(three_significant(row[c]) for row in rows for c in (2, 3)), rows


def test_command_tables_use_one_number_and_label_format(tiny_folder, capsys):
    assert main(["dla", "--model", tiny_folder, "--by", "head_position", "--top", "5", *PAIR[:2], *PAIR[4:]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["#", "layer", "head", "position", "direct", "effect", "(logits)"]
    rows = [line.split() for line in out[2:]]
    assert len(rows) == 5 and all(re.fullmatch(r"L\dH\d@\d+:w\d+", r[1]) for r in rows), rows
    assert all(three_significant(r[2]) for r in rows), rows


def test_recovered_fractions_are_headed_as_such(tiny_folder, capsys):
    assert main(["activation-patching", "--model", tiny_folder, *PAIR, "--nodes", "head", "attn"]) == 0
    out = capsys.readouterr().out
    assert out.count("recovered fraction of the metric logit('w7') − logit('w8')") == 2
    assert "metric: logit" not in out
    assert re.search(r"#\s+layer\s+recovered fraction\n\s+1\s+L\d attn\s+[+-]", out), out


# ----------------------------------------------------------------------------- exit status and progress


def _stub_sections(monkeypatch, failing=()):
    """Every section a no-op (fast), except those in ``failing``, which raise."""
    def stub(key, error):
        def run(section, **_):
            if error:
                raise error
        return run

    for key in ("dla_component", "dla_head", "head_attribution", "logit_lens", "tuned_lens", "token_circulation",
                "token_attribution", "rollout", "features", "patching", "edges"):
        monkeypatch.setattr(report, f"_{key}", stub(key, dict(failing).get(key)))


def test_a_failed_section_is_named_in_the_last_line_and_exits_1(monkeypatch, tiny_folder, tmp_path, capsys):
    _stub_sections(monkeypatch, failing=[("dla_head", RuntimeError("boom")), ("rollout", ValueError("no"))])
    assert main(["report", "--model", tiny_folder, *PAIR, "--out", str(tmp_path / "r")]) == 1
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert last.endswith("but 2 of 11 sections failed: dla_head, rollout"), last
    assert "Attention rollout: failed (ValueError: no)" in err
    _stub_sections(monkeypatch)
    assert main(["report", "--model", tiny_folder, *PAIR, "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("index.html (11 sections)")

    def unavailable(section, **_):
        section.status, section.note = "unavailable", "needs a corrupted prompt per prompt (--corrupted)"

    monkeypatch.setattr(report, "_patching", unavailable)
    assert main(["report", "--model", tiny_folder, *PAIR, "--out", str(tmp_path / "r")]) == 0, "not a failure"
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(11 sections; unavailable: patching)")


class KernelStream(io.StringIO):
    """Stands in for a Jupyter kernel's stderr (``ipykernel.iostream.OutStream``): no TTY."""


KernelStream.__module__ = "ipykernel.iostream"


def test_progress_in_a_notebook_and_quiet_under_pytest(monkeypatch, tiny_folder, tmp_path, capsys):
    import nnattr

    model = nnattr.load(tiny_folder)
    _stub_sections(monkeypatch)
    assert not runner.show_progress(), "pytest captures stderr: no TTY, no notebook"
    report.build(model, ["w1 w2"], out=tmp_path / "quiet")
    list(runner.chunks(lambda start, chunk, backend: chunk, list(range(3)), batch_size=1, desc="Trace"))
    assert capsys.readouterr().err == ""
    stream = KernelStream()
    monkeypatch.setattr(sys, "stderr", stream)
    assert runner.show_progress()
    report.build(model, ["w1 w2"], out=tmp_path / "notebook")
    list(runner.chunks(lambda start, chunk, backend: chunk, list(range(3)), batch_size=1, desc="Trace"))
    shown = stream.getvalue()
    assert "[1/11] Direct logit attribution by component" in shown and "[10/11] Attribution patching" in shown
    assert "Trace" in shown and "prompt" in shown
