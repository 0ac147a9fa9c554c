"""The docs say what the shipped model does: every number the quickstart quotes is recomputed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_quickstart", ROOT / "docs" / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_quotes_the_shipped_model():
    script = _script()
    text = script.PAGE.read_text()
    assert script.check(text) == []
    wrong = text.replace("+24.08 of", "+24.10 of").replace("pip install torch==2.13.0 -e .", "pip install nnattr")
    problems = script.check(wrong)
    assert len(problems) == 2 and "+24.08 of +25.23" in problems[0] and "pip install nnattr" in problems[1]
