"""What the command line reads before anything loads: prompts files (plain text or JSON lines,
every line checked), ``--device`` and ``--model`` paths; each refusal one line naming the value."""

from __future__ import annotations

import json

import pytest
import torch

from nnattr import cli
from nnattr.cli import main
from nnattr.embedded.tasks import ioi_pairs, ioi_prompts

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def read(monkeypatch):
    """The inputs a command would run on, without loading a model or running a recipe: ``{}`` until it runs."""
    seen = {}

    def load(args):
        seen["device"] = args.device
        return None

    def run_recipe(args, model, inputs):
        seen.update(inputs)
        return 0

    monkeypatch.setattr(cli, "_load_model", load)
    monkeypatch.setattr(cli, "_run_recipe", run_recipe)
    return seen


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def usage_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: nnattr" in err and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# --- 1. every JSON line is checked ---------------------------------------------------------------


def test_lines_that_give_different_fields_are_refused(tmp_path, read, capsys):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": IOI},
                                              {"prompt": IOI, "answer": " Mary", "distractor": " John"}])
    assert usage_error(["dla", "--prompts-file", path], capsys) == (
        f"nnattr direct-logit-attribution: error: --prompts-file: line 2 of {path} gives 'answer', 'distractor', "
        f"which line 1 does not; every line must give the same fields")
    path = write_lines(tmp_path / "q.jsonl", [{"clean": IOI, "answer": " Mary"}] * 2 + [{"clean": IOI}])
    assert usage_error(["dla", "--prompts-file", path], capsys).endswith(
        f"--prompts-file: line 3 of {path} lacks 'answer', which line 1 gives; every line must give the same fields")
    assert read == {}, "nothing runs"


def test_an_unknown_key_is_refused_with_the_close_one(tmp_path, read, capsys):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": IOI, "answer": " Mary", "distractor": " John"},
                                              {"prompt": IOI, "answer": " Mary", "distracter": " John"}])
    assert usage_error(["dla", "--prompts-file", path], capsys).endswith(
        f"--prompts-file: line 2 of {path} has an unknown key 'distracter'; did you mean 'distractor'? "
        f"known keys: 'clean', 'prompt', 'corrupted', 'answer', 'target', 'distractor'")
    path = write_lines(tmp_path / "q.jsonl", [{"prompt": IOI, "label": 1}])
    assert usage_error(["dla", "--prompts-file", path], capsys).endswith(
        f"line 1 of {path} has an unknown key 'label'; known keys: 'clean', 'prompt', 'corrupted', 'answer', "
        f"'target', 'distractor'")
    path = write_lines(tmp_path / "r.jsonl", [{"prompt": IOI, "answer": " Mary", "target": " Mary"}])
    assert usage_error(["dla", "--prompts-file", path], capsys).endswith(
        f"line 1 of {path} gives both 'answer' and 'target', two names of one field; give one")
    assert read == {}


def test_every_line_is_json_object_with_a_prompt_and_line_numbers_count_blank_lines(tmp_path, read, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"clean": IOI}) + "\n\n" + "[1, 2]\n")
    assert usage_error(["dla", "--prompts-file", str(path)], capsys).endswith(
        f"line 3 of {path} is not a JSON object but list '[1, 2]'; give one object per line")
    path.write_text(json.dumps({"clean": IOI}) + "\n{bad\n")
    assert usage_error(["dla", "--prompts-file", str(path)], capsys).endswith(
        f"line 2 of {path} is not JSON (Expecting property name enclosed in double quotes at column 2); "
        f"a JSON-lines file holds one JSON object per line")
    write_lines(path, [{"clean": IOI, "answer": " Mary"}, {"answer": " Mary"}])
    assert usage_error(["dla", "--prompts-file", str(path)], capsys).endswith(
        f"line 2 of {path} has no 'clean' or 'prompt' field; every line needs one")
    write_lines(path, [{"clean": IOI, "answer": None}])
    assert usage_error(["dla", "--prompts-file", str(path)], capsys).endswith(
        f"line 1 of {path} has no 'answer' text or token id (got null)")
    assert read == {}


def test_aliases_ids_and_the_embedded_generators_output_are_read(tmp_path, read):
    path = write_lines(tmp_path / "p.jsonl", [{"clean": "a", "corrupted": "b", "answer": " Mary", "distractor": 7},
                                              {"prompt": "c", "corrupted": "d", "target": 5, "distractor": " John"}])
    assert main(["attribution-patching", "--prompts-file", path]) == 0
    assert read["prompts"] == ["a", "c"] and read["corrupted"] == ["b", "d"]
    assert read["target"] == [" Mary", 5] and read["distractor"] == [7, " John"]
    pairs = ioi_pairs(3, seed=0)  # the docs' example: its order and template keys are ignored
    assert main(["attribution-patching", "--prompts-file", write_lines(tmp_path / "pairs.jsonl", pairs)]) == 0
    assert read["prompts"] == [p["clean"] for p in pairs] and read["target"] == [p["answer"] for p in pairs]
    prompts = ioi_prompts(3, seed=0)
    assert main(["dla", "--prompts-file", write_lines(tmp_path / "prompts.jsonl", prompts)]) == 0
    assert read["prompts"] == [p["prompt"] for p in prompts] and read["corrupted"] is None
    assert read["distractor"] == [p["distractor"] for p in prompts]


# --- 2. JSON lines by content; '#' lines are prompts ---------------------------------------------


def test_json_lines_are_read_whatever_the_suffix(tiny_folder, tmp_path, capsys):
    rows = [{"clean": f"w1 w{i} w3", "corrupted": f"w1 w{i + 1} w3", "answer": "w5", "distractor": "w6"}
            for i in (10, 20)]
    for name in ("pairs.json", "pairs.txt", "pairs"):
        path = write_lines(tmp_path / name, rows)
        assert main(["attribution-patching", "--model", tiny_folder, "--prompts-file", path, "--nodes", "attn"]) == 0
        assert "logit('w5') − logit('w6')" in capsys.readouterr().out


def test_plain_text_lines_starting_with_hash_are_prompts(tmp_path, read):
    path = tmp_path / "prompts.txt"
    path.write_text("# of items\n\nw1 w2\n  {not json\n")
    assert main(["dla", "--prompts-file", str(path)]) == 0
    assert read["prompts"] == ["# of items", "w1 w2", "  {not json"] and read["target"] is None
    path = tmp_path / "prompts.json"  # a .json name promises JSON lines
    path.write_text("w1 w2\n")
    assert main(["dla", "--prompts-file", str(path)]) == 2


def test_the_help_says_how_a_prompts_file_is_read(capsys):
    assert main(["dla", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'#' included" in help_text and "whatever its suffix when its first line is a JSON object" in help_text


# --- 3. --device checked before loading ----------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device: 'gpu' is not a device; give cpu, cuda, cuda:N, mps or auto"),
    ("cuda:x", "--device: 'cuda:x' is not a device; give cpu, cuda, cuda:N, mps or auto"),
    ("meta", "--device meta: the meta device holds no weights, so nothing can run on it; available here: cpu"),
    ("cuda", "--device cuda: no cuda device here"),
    ("cuda:1", "--device cuda:1: no cuda device here"),
    ("mps", "--device mps: no mps device here; available here: cpu"),
])
def test_a_device_this_machine_lacks_is_a_usage_error(device, message, no_gpu, read, capsys):
    line = usage_error(["dla", "--prompt", "w1", "--device", device], capsys)
    assert line.startswith(f"nnattr direct-logit-attribution: error: {message}"), line
    assert line.endswith("available here: cpu") or "is not a device" in line, line
    assert read == {}, "refused before loading"


def test_a_cuda_index_past_the_devices_is_a_usage_error(monkeypatch, read, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usage_error(["dla", "--prompt", "w1", "--device", "cuda:2"], capsys).endswith(
        "--device cuda:2: there are 2 cuda devices here (cuda:0, cuda:1)")
    for device in ("cuda", "cuda:1"):
        assert main(["dla", "--prompt", "w1", "--device", device]) == 0 and read["device"] == device


def test_cpu_and_auto_load_as_before(tiny_folder, no_gpu, capsys):
    for device in ("cpu", "auto"):
        assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--device", device]) == 0
        assert "Direct logit attribution" in capsys.readouterr().out


# --- 4. messages that name what the path is --------------------------------------------------------


def test_a_model_path_that_is_a_file_is_named_a_file(tmp_path, monkeypatch, capsys):
    file = tmp_path / "config.json"
    file.write_text("{}")
    monkeypatch.chdir(tmp_path)
    for given in (str(file), "./config.json", "config.json"):  # absolute, relative, bare: one message
        assert main(["dla", "--model", given, "--prompt", "w1"]) == 1
        err = capsys.readouterr().err
        assert f"error: could not load model {given!r}: is a file, not a folder. A local model is a folder" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_prompts_file_that_is_a_folder_is_named_a_folder(tmp_path, read, capsys):
    assert usage_error(["dla", "--prompts-file", str(tmp_path)], capsys).endswith(
        f"--prompts-file: {tmp_path} is a folder; give a file (one prompt per line, or JSON lines)")
