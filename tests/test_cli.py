"""The ``nnattr`` command: exit codes, messages, files written, and ``nnattr report``."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import pytest

from nnattr.cli import main, recipe_main
from nnattr.embedded import MODELS

EMBEDDED = (MODELS["tiny-ioi"] / "model.safetensors").is_file()
needs_embedded = pytest.mark.skipif(not EMBEDDED, reason="tiny-ioi has no trained weights in this checkout")
PAIR = ["--prompt", "w1 w2 w3 w4 w5", "--corrupted", "w1 w2 w6 w4 w5", "--target", "w7", "--distractor", "w8"]


def test_python_m_nnattr_help(capsys):
    out = subprocess.run([sys.executable, "-m", "nnattr", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("report", "dla", "head-attribution", "logit-lens", "rollout", "attribution-patching"):
        assert command in out.stdout
    assert recipe_main("logit_lens", ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: python -m nnattr.recipes.logit_lens" in out and "--positions" in out


@pytest.mark.parametrize("argv, problem", [
    ([], "required: COMMAND"),
    (["dla", "--by", "nope"], "argument --by: invalid choice: 'nope'"),
    (["rollout", "--target", " Mary"], "unrecognized arguments: --target"),
    (["dla", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["dla", "--prompt", "x", "--prompts-file", "p.txt"], "not allowed with argument"),
    (["dla", "--prompts-file", "/no/such/prompts.txt"], "--prompts-file: no such file"),
    (["dla", "--out", __file__], "is a file; give a folder"),
    (["report", "--prompt", "a", "--prompt", "b", "--corrupted", "c"], "--corrupted: 1 corrupted prompts for 2 prompts"),
    (["attribution-patching", "--prompt", "a"], "--corrupted: this command needs a corrupted prompt"),
])
def test_usage_errors_exit_2_naming_the_problem(argv, problem, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: nnattr" in err and problem in err, err


def test_nnattr_refusals_exit_1_in_one_line(tiny_folder, tmp_path, capsys):
    assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--target", "w3 w4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: target 'w3 w4' is 2 tokens") and "Traceback" not in err
    assert main(["logit-lens", "--model", tiny_folder, "--prompt", "w1 Zorblax"]) == 1
    assert "not in the vocabulary: ['Zorblax']" in capsys.readouterr().err
    assert main(["dla", "--model", str(tmp_path / "missing")]) == 1
    assert "error: no model folder at" in capsys.readouterr().err


def test_recipe_prints_a_table_and_writes_json_and_png(tiny_folder, tmp_path, capsys):
    assert main(["dla", "--model", tiny_folder, "--by", "head", "--top", "3", "--out", str(tmp_path), *PAIR[:2], *PAIR[4:]]) == 0
    out = capsys.readouterr().out
    assert "Direct logit attribution by head" in out and "logit('w7') − logit('w8')" in out
    assert len(re.findall(r"^\s+\d+\s+L\dH\d\s+[+-]", out, flags=re.M)) == 3
    data = json.loads((tmp_path / "direct_logit_attribution.json").read_text())
    assert data["dims"] == ["prompt", "layer", "head"] and data["model"] == tiny_folder
    assert (tmp_path / "direct_logit_attribution.png").stat().st_size > 2000


def test_recipe_main_runs_one_recipe(tiny_folder, capsys):
    assert recipe_main("attention_rollout", ["--model", tiny_folder, "--prompt", "w1 w2 w3", "--view", "flow"]) == 0
    assert "Attention flow" in capsys.readouterr().out


def test_logit_lens_last_position(tiny_folder, tmp_path):
    assert main(["logit-lens", "--model", tiny_folder, "--prompt", "w1 w2 w3", "--positions", "last",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "logit_lens.png").is_file()


def test_prompts_files_and_quiet_progress(tiny_folder, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"clean": f"w1 w{i} w3", "corrupted": f"w1 w{i + 1} w3", "answer": "w5",
                                           "distractor": "w6"}) for i in (10, 20)))
    out = tmp_path / "out"
    assert main(["attribution-patching", "--model", tiny_folder, "--prompts-file", str(pairs), "--nodes", "head",
                 "mlp", "--batch-size", "1", "--out", str(out)]) == 0
    data = json.loads((out / "attribution_patching.json").read_text())
    assert set(data["results"]) == {"head", "mlp"} and len(data["results"]["head"]["labels"]["prompt"]) == 2
    assert {p.name for p in out.glob("*.png")} == {"attribution_patching_head.png", "attribution_patching_mlp.png"}
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, "progress bars must be quiet when stderr is not a terminal"
    text = tmp_path / "prompts.txt"
    text.write_text("w1 w2 w3\n\nw4 w5\n")  # blank lines are skipped; every other line is a prompt
    assert main(["head-attribution", "--model", tiny_folder, "--prompts-file", str(text)]) == 0
    assert "mean over 2 prompts" in capsys.readouterr().out


def test_remote_flag_reaches_the_recipe(monkeypatch, tiny_folder, capsys):
    from nnattr.recipes import direct_logit_attribution

    seen = {}
    real = direct_logit_attribution.run

    @functools.wraps(real)  # the CLI reads the recipe's options from its signature
    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **{**kw, "remote": False})

    monkeypatch.setattr(direct_logit_attribution, "run", spy)
    assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--remote"]) == 0
    assert seen["remote"] is True


def test_ndif_refusals_exit_1_in_one_line(monkeypatch, tiny_folder, capsys):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--remote", "--ndif-host", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_options_come_from_the_recipe_signature(capsys):
    from nnattr.pairs import NODES

    assert main(["attribution-patching", "--nodes", "heads"]) == 2  # choices read from run's Sequence[Node]
    assert "invalid choice: 'heads'" in capsys.readouterr().err and len(NODES) == 7
    assert main(["logit-lens", "--distractor", "w1"]) == 2  # the logit lens has no distractor to ignore
    assert "unrecognized arguments: --distractor" in capsys.readouterr().err


def _check_report(folder) -> dict:
    names = {p.name for p in folder.iterdir()}
    assert {"index.html", "results.json", "dla_component.png", "dla_head.png", "dla_head_position.png",
            "head_attribution.png", "logit_lens.png", "rollout.png"} <= names
    page = (folder / "index.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (folder / src).is_file(), f"index.html links a missing figure {src}"
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {n for n in names if n.endswith(".png")}
    return json.loads((folder / "results.json").read_text())


def test_report_on_a_model_folder(tiny_folder, tmp_path, capsys):
    assert main(["report", "--model", tiny_folder, *PAIR, "--out", str(tmp_path / "r")]) == 0
    data = _check_report(tmp_path / "r")
    assert {k: s["status"] for k, s in data["sections"].items()} == {
        **dict.fromkeys(["dla_component", "dla_head", "head_attribution", "logit_lens", "token_circulation",
                         "token_attribution", "rollout", "patching", "edges"], "ok"),
        "tuned_lens": "unavailable", "features": "unavailable"}  # none ships for this model
    assert "no SAE ships for this model" in data["sections"]["features"]["note"]
    assert data["sections"]["patching"]["validation"]["head"]["n"] > 0
    assert "report written to" in capsys.readouterr().out


def test_report_says_why_patching_is_unavailable(monkeypatch, tmp_path):
    from nnattr import report

    monkeypatch.setattr(report, "PATCHING_MODULES", ("nnattr.not_installed",))
    section = report.Section("patching", "Attribution patching")
    report._patching(section, model=None, prompts=["a"], corrupted=["b"], target=None, distractor=None,
                     out=tmp_path, options={}, top=5)
    assert section.status == "unavailable" and section.note == "not in this installation: nnattr.not_installed"
    page = report.render(report.Report(tmp_path, {"nnattr": "0", "model": "m", "architecture": "a", "prompts": ["a"],
                                                  "corrupted": None, "target": None, "distractor": None,
                                                  "tokens": ["a"], "seconds": 0.0}, [section]))
    assert "This section is unavailable: not in this installation: nnattr.not_installed" in page


@needs_embedded
def test_report_with_no_arguments_runs_on_the_embedded_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    data = _check_report(tmp_path / "nnattr-report")
    assert data["model"] == "tiny-ioi" and data["target"] == " Mary" and data["distractor"] == " John"
    assert all(s["status"] == "ok" for s in data["sections"].values()), data["sections"]
    assert "built-in example" in capsys.readouterr().err


def test_exact_patching_of_the_candidates_an_earlier_command_wrote(tiny_folder, tmp_path, capsys):
    pair = ["--model", tiny_folder, "--clean", "w1 w2 w3 w4 w5", "--corrupted", "w1 w2 w6 w4 w5",
            "--answer", "w7", "--distractor", "w8"]
    assert main(["attribution-patching", *pair, "--nodes", "head", "attn", "--out", str(tmp_path)]) == 0
    written = tmp_path / "attribution_patching.json"
    assert main(["activation-patching", *pair, "--candidates", str(written), "--k", "2", "--out",
                 str(tmp_path / "exact")]) == 0
    data = json.loads((tmp_path / "exact" / "activation_patching.json").read_text())
    assert set(data["results"]) == {"head", "attn"}
    for node, result in data["results"].items():
        assert result["dims"][:2] == ["prompt", "layer"]
        assert sum(x is not None for row in _flat(result["values"]) for x in [row]) == 2  # the top 2, no more
    capsys.readouterr()
    assert main(["activation-patching", *pair, "--candidates", str(tmp_path / "nope.json")]) == 2
    assert "--candidates: no such file" in capsys.readouterr().err


def _flat(x):
    return [v for item in x for v in _flat(item)] if isinstance(x, list) else [x]


def test_float_and_int_options_reach_the_recipe(tiny_folder, tmp_path, capsys):
    assert main(["rollout", "--model", tiny_folder, "--prompt", "w1 w2 w3", "--residual", "0.3", "--out",
                 str(tmp_path)]) == 0
    assert json.loads((tmp_path / "attention_rollout.json").read_text())["meta"]["residual"] == 0.3
    capsys.readouterr()
    assert main(["logit-lens", "--model", tiny_folder, "--prompt", "w1 w2", "--k", "0"]) == 1  # run() refuses it
    assert "k=0" in capsys.readouterr().err
