"""Recipes as templates: a copy runs its own code, the docs' worked example works, and the files
keep their shape (docstring, trace, run, __main__; few lines; kernels plus three helpers).

The remote side (edited copies against the loopback NDIF server) is in ``tests/test_remote.py``.
"""

from __future__ import annotations

import ast
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nnattr
from nnattr.cli import recipes
from nnattr.recipes import logit_lens
from tests.support import tiny

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("[!_]*.py"))
PAIR = ["--clean", "w1 w2 w3 w4 w5", "--corrupted", "w1 w2 w6 w4 w5", "--answer", "w7", "--distractor", "w8"]


def run_script(path: Path, *args: str) -> str:
    """``python path args`` in a new process: its stdout."""
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=180,
                         cwd=path.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_as_main(path: Path, *args: str, capsys) -> str:
    """The same in this process (``runpy``, as ``__main__``): the file's own code, without paying
    for a second interpreter's imports."""
    argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    assert stop.value.code == 0, err[-3000:]
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_renamed_edited_copy_runs_its_own_code(path, tmp_path, tiny_folder, capsys):
    copy = tmp_path / f"my_{path.stem}_copy.py"
    source = path.read_text()
    title = re.search(r'^TITLE, UNITS[^=]*= "([^"]+)"', source, re.M)
    assert title, "a recipe names its result: TITLE, UNITS = ..."
    copy.write_text(source.replace(f'"{title.group(1)}"', '"My own copy"', 1))  # one line changed
    pairs = "corrupted" in source.split("def run(")[1].split(")")[0]
    args = PAIR if pairs else ["--prompt", "w1 w2 w3 w4"]
    args += ["--sae", "basis"] if "sae" in source.split("def run(")[1].split(")")[0] else []  # none ships for it
    out = run_as_main(copy, "--model", tiny_folder, *args, "--top", "2", capsys=capsys)
    assert "My own copy" in out, out  # the copy ran, not the installed recipe
    assert f"usage: python {copy.name}" in run_as_main(copy, "--help", capsys=capsys)


def _worked_example() -> str:
    doc = (ROOT / "docs" / "recipes.md").read_text()
    return re.search(r"```diff\n(.*?)```", doc, re.S).group(1)


def test_the_worked_example_in_the_docs(tmp_path, tiny_folder):
    diff = _worked_example()
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len([line for line in changed if line.startswith("+")]) <= 15
    shutil.copy(ROOT / "recipes" / "logit_lens.py", tmp_path / "logit_lens.py")
    applied = subprocess.run(["patch", "-s", "-o", "my_lens.py", "logit_lens.py"], input=diff, text=True,
                             capture_output=True, cwd=tmp_path, timeout=30)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    out = run_script(tmp_path / "my_lens.py", "--model", tiny_folder, "--prompt", "w1 w2 w3 w4")  # a new process
    assert "Logit lens at the middle layer" in out and re.search(r"^\s+L1\s+'w\d+' \d", out, re.M), out

    # Imported, it is the middle row of the full lens, top 3.
    sys.path.insert(0, str(tmp_path))
    try:
        import my_lens
    finally:
        sys.path.remove(str(tmp_path))
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())
    prompts = tiny.prompts(3)
    mine = my_lens.run(model, prompts)
    full = logit_lens.run(model, prompts, positions="last", k=3)
    assert mine.dims == ("prompt", "layer") and mine.labels["layer"] == ["L1"]
    torch.testing.assert_close(mine.values[:, 0], full.values[:, 2])  # rows: embed, L0, L1
    for i in range(len(prompts)):
        assert mine.per_prompt["top_tokens"][i][0] == full.per_prompt["top_tokens"][i][2]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_shape(path):
    source = path.read_text()
    tree = ast.parse(source)
    assert ast.get_docstring(tree), "a recipe opens with its docstring"
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions[:2] == ["trace", "run"], "the method comes first, then run"
    assert isinstance(tree.body[-1], ast.If) and "__main__" in ast.unparse(tree.body[-1].test)
    assert len(source.splitlines()) <= 120, "a recipe reads on one or two screens"
    helpers = {a.name if isinstance(n, ast.Import) else n.module
               for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    nnattr_helpers = {h for h in helpers if h.startswith("nnattr") and h != "nnattr.kernels"}
    nnattr_helpers |= {f"nnattr.{a.name}" for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "nnattr"
                       for a in n.names}
    nnattr_helpers.discard("nnattr")
    assert len(nnattr_helpers) <= 3, nnattr_helpers


def test_every_recipe_file_is_a_command():
    assert sorted(m.__name__.rsplit(".", 1)[-1] for m in recipes().values()) == [p.stem for p in RECIPES]
