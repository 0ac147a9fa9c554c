"""The status table: family x recipe, written by the architecture tests (docs/status.md).

A pytest plugin (registered in ``tests/conftest.py``). It watches the tests of `MODULES` that take
an ``arch`` parameter (a ``tests/support/tiny.py`` family) and every refusal a test provokes, and
at the end of a run that covered all of them writes ``docs/status.md``:

- **exact**: every test of that family and recipe passed (parity with the plain-hooks reference,
  the sum identities, padding, remote == local);
- **refused**: a passing test saw nnattr refuse the method for the family; the reason is the
  refusal's own message, caught where `nnattr.arch.Arch` raises it (any ``Arch.require_*`` but
  ``require_probabilities``, which is about the attention implementation, not the family);
- **approximate**: a passing test declared a bound with ``record_property("approximate", "...")``;
- **FAILED** / **skipped**: a test of that cell failed or skipped; the family is then not supported.

A family is "supported" only if all of its tests passed. The table is written only when the run
covered every such test: each module of `MODULES` given whole (a file or a folder, not
``file::test``) and nothing deselected (``-k``, ``-m``, ``--deselect``, ``--lf``); otherwise the
terminal summary says why it was not. Rows and columns are sorted and nothing in the file depends
on time or order, so a re-run without changes leaves it byte for byte the same, and the file is only
rewritten when it changes. ``NNATTR_STATUS_FILE`` names another file ("" turns writing off).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = ROOT / "docs" / "status.md"
#: The test modules whose ``arch``-parametrized tests make the table.
MODULES = ("test_recipes.py", "test_positions.py", "test_token_circulation.py", "test_attention_summary.py",
           "test_remote.py", "test_families_remote.py", "test_patching.py", "test_families_recipes.py", "test_edges.py",
           "test_circuits.py", "test_edge_atp_star.py")
COMMAND = "python -m pytest " + " ".join(f"tests/{m}" for m in MODULES)

DLA = {"component": "DLA by component", "head": "DLA by head", "head_position": "DLA by head and position",
       "all": "DLA by all"}
_PARITY = {"dla_component": DLA["component"], "dla_head": DLA["head"], "dla_head_position": DLA["head_position"],
           "logit_lens": "logit lens", "head_attribution": "head attribution",
           "attention_rollout": "attention rollout"}
TOKEN_ATTENTION = "token attribution, attention path"
#: A refusal's method (the text `Arch.require_*` was given) -> its column, where the two differ.
REFUSED_AS = {"Token attribution through attention": TOKEN_ATTENTION}
#: Test function -> the recipe column(s) it checks (a callable reads the test's parameters).
COLUMNS = {
    "test_dla_components_sum_to_the_logit": [DLA["component"]],
    "test_dla_heads_add_up_to_attention": [DLA["head"], DLA["head_position"]],
    "test_parity_with_hooks_reference": lambda p: [_PARITY.get(p.get("method"), str(p.get("method")))],
    "test_logit_lens_last_layer_is_the_model": ["logit lens"],
    "test_dla_at_a_position_is_dla_of_the_cut_prompt": [DLA["component"], DLA["head"], DLA["head_position"]],
    "test_head_attribution_and_logit_lens_at_a_position": ["head attribution", "logit lens"],
    "test_one_ranked_list_sums_to_the_logit": [DLA["all"]],
    "test_one_ranked_list_refused_where_heads_are_not_exact": [DLA["all"]],
    "test_equals_the_hooks_reference_on_every_family": ["token circulation"],
    "test_each_layer_change_splits_into_attention_mlp_and_rescale": ["token circulation"],
    "test_recipe_on_ndif_equals_local": ["remote == local"],
    "test_dla_and_logit_lens_on_ndif_equal_local": ["remote == local"],
    "test_every_field_matches_hugging_face_attentions": ["attention summary"],
    "test_parity_with_plain_torch_hooks": ["attribution patching"],  # AtP and EAP-IG
    "test_matches_the_slow_reference": ["edge attribution patching"],
    "test_every_edge_is_the_clean_run_and_none_the_corrupted_one": ["circuit faithfulness"],
    "test_a_circuit_matches_the_edge_ablated_reference": ["circuit faithfulness"],
    "test_matches_the_reference_on_every_family": ["AtP* on edges"],
    "test_refuses_families_whose_softmax_it_cannot_recompute": ["AtP* on edges"],
    # test_families_recipes.py: the newer recipes against hooks / plain autograd on every family
    "test_attention_views_equal_the_hooks_reference": ["attention views"],
    "test_token_attribution_equals_plain_autograd": ["token attribution"],  # IG and gradient x input
    "test_token_attribution_through_attention_is_dla_by_head_and_source": [TOKEN_ATTENTION],
    "test_activation_patching_equals_patching_by_hooks": ["activation patching"],
    "test_expert_attribution_equals_the_hooks_reference": ["expert attribution"],
    "test_feature_attribution_equals_the_hooks_reference": ["feature attribution"],
    "test_feature_patching_equals_plain_autograd": ["feature patching"],
}
OTHER = "other family checks"
_RANK = {"FAILED": 4, "skipped": 3, "refused": 2, "approximate": 1, "exact": 0}


@dataclass
class Cell:
    outcome: str = "exact"
    notes: set[str] = field(default_factory=set)  # refusal reasons, bounds, failing tests
    tests: int = 0

    def add(self, outcome: str, note: str | None = None) -> None:
        self.tests += 1
        if _RANK[outcome] > _RANK[self.outcome]:
            self.outcome, self.notes = outcome, set()
        if outcome == self.outcome and note:
            self.notes.add(note)


def family_of(arch: str) -> tuple[str, str]:
    """``(family, model_type)`` of a tiny.py family key."""
    from nnattr.arch import spec_for
    from tests.support import tiny

    config = tiny.CONFIGS[arch]()
    return spec_for(config).family, config.model_type


class StatusPlugin:
    def __init__(self, config) -> None:
        self.config = config
        self.target = os.environ.get("NNATTR_STATUS_FILE", str(DEFAULT_FILE))
        self.items: dict[str, tuple[str, str, dict]] = {}  # nodeid -> (module, test, params)
        self.refusals: dict[str, list[tuple[str, str, str]]] = {}  # nodeid -> (family, method, reason)
        self.reports: dict[str, list] = {}
        self.partial: list[str] = []
        self.message = ""

    # ------------------------------------------------------------------ collection

    def pytest_deselected(self, items) -> None:
        hit = sorted({i.nodeid for i in items if _module(i) in MODULES})
        if hit:
            self.partial.append(f"{len(hit)} of its tests were deselected (e.g. {hit[0]})")

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            if _module(item) in MODULES:
                params = dict(getattr(getattr(item, "callspec", None), "params", {}))
                self.items[item.nodeid] = (_module(item), getattr(item, "originalname", item.name), params)
        ran = {m for m, _, _ in self.items.values()}
        missing = [m for m in MODULES if m not in ran]
        if missing:
            self.partial.append(f"{', '.join(missing)} did not run")
        picked = [a for a in self.config.args if "::" in str(a) and Path(str(a).split("::")[0]).name in MODULES]
        if picked:
            self.partial.append(f"single tests were picked ({picked[0]})")

    # ------------------------------------------------------------------ running

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        if item.nodeid not in self.items:
            yield
            return
        seen = self.refusals.setdefault(item.nodeid, [])
        with _watch_refusals(seen):
            yield

    def pytest_runtest_logreport(self, report) -> None:
        if report.nodeid in self.items and (report.when == "call" or report.outcome != "passed"):
            self.reports.setdefault(report.nodeid, []).append(report)

    # ------------------------------------------------------------------ the table

    def table(self) -> str:
        from tests.support import tiny

        families = {arch: family_of(arch) for arch in tiny.ARCHS}
        names_of = {f for f, _ in families.values()}
        cells: dict[tuple[str, str], Cell] = {}
        counted: dict[str, int] = {}
        failing: dict[str, set[str]] = {}
        for nodeid, (module, test, params) in self.items.items():
            reports = self.reports.get(nodeid, [])
            outcome = "exact"
            if any(r.failed for r in reports) or not reports:
                outcome = "FAILED"
            elif any(r.skipped for r in reports):
                outcome = "skipped"
            bounds = [str(v) for r in reports for k, v in r.user_properties if k == "approximate"]
            if outcome == "exact" and bounds:
                outcome = "approximate"
            arch = params.get("arch")
            if arch in families:
                family = families[arch][0]
                columns = COLUMNS.get(test, [OTHER])
                for column in (columns(params) if callable(columns) else columns):
                    cells.setdefault((family, column), Cell()).add(outcome, "; ".join(bounds) or (
                        nodeid if outcome == "FAILED" else _why(reports) if outcome == "skipped" else None))
                counted[family] = counted.get(family, 0) + 1
                if outcome in ("FAILED", "skipped"):
                    failing.setdefault(family, set()).add(nodeid)
            if outcome in ("exact", "approximate"):  # a passing test: the refusals it saw are checked
                for family, method, reason in self.refusals.get(nodeid, []):  # one note for one reason
                    if family not in names_of:  # a spec a test made up (not a tiny.py family): no row of its own
                        continue
                    note = reason.replace(method, "The method", 1).replace(family, "the family")
                    cells.setdefault((family, REFUSED_AS.get(method, method)), Cell()).add("refused", note)
        names = sorted({f for f, _ in families.values()})
        columns = sorted({c for _, c in cells}, key=lambda c: (c == OTHER, c.lower()))
        notes: list[str] = []

        def show(cell: Cell | None) -> str:
            if cell is None:
                return "—"
            marks = []
            for note in sorted(cell.notes):
                if note not in notes:
                    notes.append(note)
                marks.append(f"[{notes.index(note) + 1}]")
            return cell.outcome + (" " + " ".join(marks) if marks else "")

        types = {f: sorted({t for g, t in families.values() if g == f}) for f in names}
        lines = [
            "# Status: every family x recipe, as the tests found it",
            "",
            "Written by the test run below (`tests/support/status.py`); do not edit by hand. A family is",
            "**supported** only if every one of its tests passed in that run. **exact**: the recipe equals the",
            "plain-PyTorch hooks reference (and its sum identities hold) on a tiny random model of the family,",
            "on a left-padded batch, locally and through the loopback NDIF server where a column says so.",
            "**refused**: nnattr refuses the method for the family, with the reason given in the note;",
            "**approximate**: a bound is given in the note; **—**: no test of that cell in this run.",
            "",
            f"    {COMMAND}",
            "",
            "| family | `model_type` | supported | tests | " + " | ".join(columns) + " |",
            "|---|---|---|---:|" + "---|" * len(columns),
        ]
        for f in names:
            ok = "yes" if f not in failing and counted.get(f) else "**no**"
            lines.append(f"| {f} | {', '.join(f'`{t}`' for t in types[f])} | {ok} | {counted.get(f, 0)} | "
                         + " | ".join(show(cells.get((f, c))) for c in columns) + " |")
        if notes:
            lines += ["", "Notes:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
        return "\n".join(lines) + "\n"

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if not self.items:
            return
        unrun = [nodeid for nodeid in self.items if nodeid not in self.reports]
        if unrun:  # the run stopped early (-x, --maxfail, an interrupt): those cells were never tested
            self.partial.append(f"{len(unrun)} of its tests did not run (e.g. {unrun[0]})")
        if self.partial or not self.target:
            self.message = ("docs/status.md not written: " + "; ".join(self.partial) if self.target else "")
            if self.partial:
                self.message += f". Run `{COMMAND}` (or the whole suite) to write it."
            return
        text, path = self.table(), Path(self.target)
        try:
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                self.message = f"status table written: {path}"
            else:
                self.message = f"status table unchanged: {path}"
        except OSError as error:  # a read-only checkout (CI): the run itself is what counts
            self.message = f"status table not written ({error})"

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.message:
            terminalreporter.write_line(self.message)


def _why(reports) -> str | None:
    """A skipped or expected-to-fail test's reason, for the cell's note."""
    for r in reports:
        if getattr(r, "wasxfail", None):
            return f"expected to fail (a known defect): {r.wasxfail.removeprefix('reason: ')}"
        if r.skipped and isinstance(r.longrepr, tuple):
            return f"skipped: {r.longrepr[2].removeprefix('Skipped: ')}"
    return None


def _module(item) -> str:
    return Path(str(getattr(item, "fspath", ""))).name


@contextlib.contextmanager
def _watch_refusals(seen: list):
    """Record ``(family, method, message)`` for every refusal `nnattr.arch.Arch` raises inside."""
    from nnattr.arch import Arch

    names = [n for n in dir(Arch) if n.startswith("require_") and n != "require_probabilities"]
    originals = {n: getattr(Arch, n) for n in names}

    def watched(fn):
        def call(self, method, *args, **kwargs):
            try:
                return fn(self, method, *args, **kwargs)
            except ValueError as error:
                seen.append((self.family, method, str(error)))
                raise

        return call

    for n, fn in originals.items():
        setattr(Arch, n, watched(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(Arch, n, fn)
