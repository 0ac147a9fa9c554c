"""``nnattr report``: the standard workflow on a prompt or a clean/corrupted pair, as one folder.

Attribution first (cheap: one or two passes each), then patching to confirm (Nanda 2023):
direct logit attribution by component, by head and by head and source position; head
attribution (gradient x activation); logit lens over every position; attention rollout; and
attribution patching with exact activation patching of its top candidates and a validation
of the estimate. The folder holds ``index.html`` (figures linked relatively, tables, what each
section shows), one PNG per figure, and ``results.json`` with every number.

>>> import nnattr
>>> from nnattr.report import build
>>> report = build(nnattr.load("tiny-ioi"), ["When Mary and John went to the store, John gave a drink to"],
...                corrupted=["When Mary and John went to the store, Mary gave a drink to"],
...                target=" Mary", distractor=" John", out="nnattr-report")  # doctest: +SKIP
"""

from __future__ import annotations

import html
import importlib.util
import json
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .batch import Batch

PATCHING_MODULES = ("nnattr.recipes.attribution_patching", "nnattr.recipes.activation_patching", "nnattr.validation")


@dataclass
class Section:
    key: str
    title: str
    text: str = ""  # what the section shows, for a newcomer (HTML)
    figures: list[str] = field(default_factory=list)  # PNG file names in the folder
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)  # (header, rows)
    status: str = "ok"  # ok | unavailable | failed
    note: str = ""
    results: dict = field(default_factory=dict)  # name -> plain data for results.json
    seconds: float = 0.0


@dataclass
class Report:
    out: Path
    header: dict
    sections: list[Section]

    @property
    def failed(self) -> list[Section]:
        return [s for s in self.sections if s.status == "failed"]


def write_report(model, prompts, corrupted=None, target=None, distractor=None, *, model_name: str, out,
                 top: int = 10, batch_size=None, options=None) -> int:
    """``nnattr report``: build the folder, print where it is; exit status 1 if a section failed."""
    report = build(model, prompts, corrupted=corrupted, target=target, distractor=distractor, out=out,
                   model_name=model_name, top=top, batch_size=batch_size, options=options)
    for s in report.sections:
        if s.status != "ok":
            print(f"  {s.title}: {s.status} ({s.note})", file=sys.stderr)
    print(f"report written to {report.out / 'index.html'} ({len(report.sections)} sections)")
    return 1 if report.failed else 0


def build(model, prompts, *, corrupted=None, target=None, distractor=None, out="nnattr-report",
          model_name: str | None = None, top: int = 10, batch_size=None, options=None) -> Report:
    """Run every section and write ``index.html``, the PNGs and ``results.json`` to ``out``."""
    from . import __version__
    from .arch import dims

    started = time.perf_counter()
    batch = Batch.of(model, prompts, target, distractor)  # everything is checked before anything runs
    if corrupted is not None:  # prepared once too: every section reuses both batches
        corrupted = Batch.of(model, corrupted)
        if len(corrupted) != len(batch):
            raise ValueError(f"{len(corrupted)} corrupted prompts for {len(batch)} prompts: give one per prompt")
    prompts = list(batch.labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = dict(model=model, prompts=batch, target=None, distractor=None, out=out,
               options={"batch_size": batch_size, **(options or {})}, cache={})
    sections = [
        _section("dla_component", "Direct logit attribution by component", _dla_component, run),
        _section("dla_head", "Direct logit attribution by head", _dla_head, run),
        _section("head_attribution", "Head attribution (gradient × activation)", _head_attribution, run),
        _section("logit_lens", "Logit lens", _logit_lens, run),
        _section("rollout", "Attention rollout", _rollout, run),
        _section("patching", "Attribution patching, confirmed by exact patching", _patching, run,
                 corrupted=corrupted, top=top),
    ]
    d = dims(model)
    header = {
        "nnattr": __version__, "model": model_name or getattr(model.config, "_name_or_path", "model"),
        "architecture": f"{model.config.model_type}: {d.n_layers} layers × {d.n_heads} heads, d_model {d.d_model}",
        "prompts": prompts, "corrupted": None if corrupted is None else list(corrupted.labels),
        "target": target, "distractor": distractor,
        "tokens": list(batch.tokens[0]),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = Report(out, header, sections)
    (out / "results.json").write_text(json.dumps(_plain(report), indent=1))
    (out / "index.html").write_text(render(report), encoding="utf-8")
    return report


def _section(key, title, fn, run, **kw) -> Section:
    section = Section(key, title)
    start = time.perf_counter()
    try:
        fn(section, **run, **kw)
    except Exception as error:  # one failing method must not lose the others: say so, loudly
        from .remote import NDIFError

        if isinstance(error, NDIFError):  # no key, service down, ...: every section would fail alike
            raise
        section.status, section.note = "failed", f"{type(error).__name__}: {error}"
        if not isinstance(error, ValueError):
            traceback.print_exc()
    section.seconds = round(time.perf_counter() - start, 2)
    return section


def _figure(section: Section, out: Path, name: str, attr, **kw) -> None:
    fig = attr.plot(**kw)
    fig.savefig(out / name, dpi=110)
    section.figures.append(name)


def _top_rows(attr, k: int, *columns) -> list[list[str]]:
    single = attr.single()
    join = "".join if single.dims == ("layer", "head") else " ".join  # L3H7, as everywhere else
    return [[join(labels), f"{value:+.3f}", *(c(labels) for c in columns)] for labels, value in single.top(k)]


def _metric_html(attr) -> str:
    return html.escape(attr.metric or "the metric")


def _dla_component(section, *, model, prompts, target, distractor, out, options, **_):
    from .recipes import direct_logit_attribution as dla

    result = dla.run(model, prompts, target, distractor, by="component", **options)
    _figure(section, out, "dla_component.png", result)
    section.tables.append((["component", "direct effect"], _top_rows(result, 6)))
    section.results["dla_component"] = result.to_dict()
    metric = _metric_html(result)
    section.text = (
        f"Each bar is one component's direct write to the residual stream at the last position, read "
        f"through the final norm (its scale measured on this forward pass) and the unembedding, in units "
        f"of <b>{metric}</b>. The bars sum to the model's own value. Red pushes towards the target, blue "
        f"away from it. Only direct effects: a component that works through later layers shows up under "
        f"head attribution and patching instead.")


def _dla_head(section, *, model, prompts, target, distractor, out, options, cache, **_):
    from .recipes import direct_logit_attribution as dla

    heads = cache["dla_head"] = dla.run(model, prompts, target, distractor, by="head", **options)
    _figure(section, out, "dla_head.png", heads)
    section.results["dla_head"] = heads.to_dict()
    section.tables.append((["head", "direct effect"], _top_rows(heads, 8)))
    section.text = (
        f"The attention bars above, split per head (layer × head), in units of <b>{_metric_html(heads)}</b>. "
        f"In IOI, heads that copy the indirect object's name to the output (name movers) are strongly "
        f"positive; heads that copy the other name are negative.")
    try:
        positions = dla.run(model, prompts, target, distractor, by="head_position", **options)
    except ValueError as error:  # e.g. a model without attention probabilities
        section.note = f"per source position unavailable: {error}"
        return
    _figure(section, out, "dla_head_position.png", positions)
    section.results["dla_head_position"] = positions.to_dict()
    section.text += (
        " The strip below splits each head's direct effect by the source token it reads from "
        "(attention weight × value vector): the first row sums all heads, then come the heads with the "
        "largest totals. A head that reads the indirect object's name and raises the metric copies that "
        "name (a name mover); one that reads the repeated subject and raises the metric suppresses the "
        "subject.")


def _head_attribution(section, *, model, prompts, target, distractor, out, options, cache, **_):
    from .recipes import direct_logit_attribution as dla
    from .recipes import head_attribution as ha

    result = ha.run(model, prompts, target, distractor, **options)
    direct = cache.get("dla_head") or dla.run(model, prompts, target, distractor, by="head", **options)
    direct = direct.single()  # [layer, head]

    def dla_of(labels):
        layer, head = direct.labels["layer"].index(labels[0]), direct.labels["head"].index(labels[1])
        return f"{float(direct.values[layer, head]):+.3f}"

    _figure(section, out, "head_attribution.png", result)
    section.results["head_attribution"] = result.to_dict()
    section.tables.append((["head", "gradient × activation", "direct effect (DLA)"], _top_rows(result, 8, dla_of)))
    section.text = (
        f"For each head, the gradient of <b>{_metric_html(result)}</b> with respect to the head's output, "
        f"times that output, summed over positions: a first-order estimate of how much the metric would "
        f"drop if the head were switched off (zeroed). Unlike direct logit attribution it includes effects "
        f"through later layers, so a head that is large here but small in DLA acts through other heads "
        f"(in IOI: S-inhibition and induction heads).")


def _logit_lens(section, *, model, prompts, target, out, options, **_):
    from .recipes import logit_lens as ll

    result = ll.run(model, prompts, target, positions="all", **options)
    _figure(section, out, "logit_lens.png", result)
    section.results["logit_lens"] = result.to_dict()
    one = result.single()
    values = one.values.detach()  # [layer, position]
    top, probs, ranks = (one.meta.get(k) for k in ("top_tokens", "top_probs", "target_rank"))
    if isinstance(top, list):
        rows = [[layer, ", ".join(f"{t.strip()!r} {p:.2f}" for t, p in zip(top[i][-1][:3], probs[i][-1][:3])),
                 f"{float(values[i, -1]):.3f}", str(int(ranks[i][-1]) + 1)]
                for i, layer in enumerate(one.labels["layer"])]
        section.tables.append((["residual after", "top 3 at the last position", "P(target)", "target rank"], rows))
        section.results["prediction"] = [[t, p] for t, p in zip(top[-1][-1], probs[-1][-1])]
    section.text = (
        "Each row decodes the residual stream after one layer with the model's own final norm and "
        "unembedding, as if the model stopped there (nostalgebraist 2020). Each cell shows the top "
        "prediction for the next token after reading up to that position (bold: it is the expected next "
        "token); the colour is the probability of the expected token, which at the last position is the "
        "target. Read the last column from the bottom up to see at which layer the answer appears.")


def _rollout(section, *, model, prompts, out, options, **_):
    from .recipes import attention_rollout as ar

    result = ar.run(model, prompts, **options)
    _figure(section, out, "rollout.png", result)
    section.results["rollout"] = result.to_dict()
    last = result.single()
    rows = sorted(zip(last.labels["key"], last.values[-1].tolist()), key=lambda kv: -kv[1])[:6]
    section.tables.append((["input token", "share of the last token's representation"],
                           [[k, f"{v:.3f}"] for k, v in rows]))
    section.text = (
        "How much each token's final representation traces back to each input token: the head-averaged "
        "attention of every layer, mixed half-and-half with the identity for the residual stream, "
        "multiplied through the layers (Abnar &amp; Zuidema 2020). Rows sum to 1. A rough map of "
        "information flow: it ignores value vectors and MLPs, and mass piles up on the first token (an "
        "attention sink), hence the square-root colour scale.")


def _patching(section, *, model, prompts, corrupted, target, distractor, out, options, top, **_):
    missing = [m for m in PATCHING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        section.status, section.note = "unavailable", f"not in this installation: {', '.join(missing)}"
        return
    if corrupted is None:
        section.status, section.note = "unavailable", "needs a corrupted prompt per prompt (--corrupted)"
        return
    result = patching(model, prompts, corrupted, target, distractor, top=top, options=options)
    estimate, exact, comparison = result["estimate"], result["exact"], result["comparison"]
    _figure(section, out, "patching_heads.png", estimate["head"])
    _figure(section, out, "patching_resid.png", estimate["resid"])
    import matplotlib.pyplot as plt

    fig = comparison.plot()
    fig.savefig(out / "patching_validation.png", dpi=110)
    plt.close(fig)
    section.figures.append("patching_validation.png")
    from .validation import entry_labels, metric_effect

    rows = []  # the candidates that were patched, by estimated size
    for node_type in ("head", "attn", "mlp"):
        est = metric_effect(estimate[node_type]).nanmean(0).flatten()  # [entry]
        eff = metric_effect(exact[node_type]).nanmean(0).flatten()
        recovered = exact[node_type].values.float().nanmean(0).flatten()
        for i, label in enumerate(entry_labels(estimate[node_type])):
            if not recovered[i].isnan():
                row = [label, f"{float(est[i]):+.3f}", f"{float(eff[i]):+.3f}", f"{float(recovered[i]):+.2f}"]
                rows.append((abs(float(est[i])), row))
    rows = [r for _, r in sorted(rows, key=lambda r: -r[0])]
    section.tables.append((["node", "attribution patching", "exact patching", "recovered fraction"], rows[:top]))
    section.tables.append((["node type", "nodes", "Pearson", "Spearman", "top-k agreement"],
                           [[t, str(a.n), f"{a.pearson:.3f}", f"{a.spearman:.3f}", f"{a.top_k:.2f} (k={a.k})"]
                            for t, a in comparison.agreements.items()]))
    section.results.update(
        estimate={t: a.to_dict() for t, a in estimate.items()}, exact={t: a.to_dict() for t, a in exact.items()},
        validation=comparison.to_dict(), warnings=comparison.warnings)
    meta = estimate["head"].per_prompt
    section.text = (
        f"Attribution patching estimates, for every node at once (two forward passes and one backward), how "
        f"much <b>{_metric_html(estimate['head'])}</b> on the corrupted prompt would move towards the clean "
        f"prompt's value if that node's clean activation were patched in (Nanda 2023). Clean value "
        f"{_mean(meta['clean_metric']):+.3f}, corrupted {_mean(meta['corrupted_metric']):+.3f}. Exact activation "
        f"patching then re-runs the corrupted prompt with each of the top {top} candidates per node type "
        f"patched in, one at a time; the recovered fraction is (patched − corrupted) / (clean − corrupted). "
        f"The scatter plot and correlations say how far the cheap estimate can be trusted on this model.")
    notes = list(comparison.warnings)
    if result["align"]:
        notes.insert(0, "Some pairs have different token counts: positions are aligned at the last token.")
    section.note = " ".join(notes)


def patching(model, clean, corrupted, target, distractor, *, top: int = 10, options=None) -> dict:
    """Attribution patching, exact patching of its top ``top`` candidates per node type, and
    their comparison: ``{"estimate", "exact", "comparison"}`` (the report's patching workflow)."""
    from .recipes import activation_patching, attribution_patching
    from .validation import compare

    options = dict(options or {})
    equal = Batch.of(model, clean).lengths == Batch.of(model, corrupted).lengths
    align = None if equal else "right"  # per-position nodes of unequal pairs: aligned at the last token
    estimate = attribution_patching.run(model, clean, corrupted, target, distractor, align=align, **options)
    exact = activation_patching.run(model, clean, corrupted, target, distractor, candidates=estimate, k=top,
                                    align=align, **options)  # batch_size: pairs per session, as for the estimate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings are kept in the comparison and shown in the report
        comparison = compare(estimate, exact, k=top)
    return {"estimate": estimate, "exact": exact, "comparison": comparison, "align": align}


def _mean(values) -> float:
    return sum(values) / len(values)


def _plain(report: Report) -> dict:
    return {**report.header, "sections": {s.key: {"title": s.title, "status": s.status, "note": s.note,
                                                  "seconds": s.seconds, **s.results} for s in report.sections}}


def render(report: Report) -> str:
    """The report page: self-contained HTML, figures linked relatively."""
    h, e = report.header, html.escape

    def listed(prompts):
        items = "".join(f"<li><code>{e(p)}</code></li>" for p in prompts[:5])
        more = f"<li>… and {len(prompts) - 5} more (figures show the mean)</li>" if len(prompts) > 5 else ""
        return f"<ul class=plain>{items}{more}</ul>"

    facts = [("model", f"{e(h['model'])} <span class=dim>({e(h['architecture'])})</span>"),
             ("prompt" + "s" * (len(h["prompts"]) > 1), listed(h["prompts"]))]
    if h["corrupted"]:
        facts.append(("corrupted", listed(h["corrupted"])))
    answers = (f"<code>{e(repr(h[k]))}</code>" for k in ("target", "distractor"))
    facts.append(("target / distractor", " / ".join(answers)))
    facts.append(("tokens", " ".join(f"<span class=tok>{e(t)}</span>" for t in h["tokens"])))
    lens = next((s for s in report.sections if s.key == "logit_lens"), None)
    if lens is not None and "prediction" in lens.results:
        guesses = (f"<code>{e(t.strip())}</code> {p:.2f}" for t, p in lens.results["prediction"])
        facts.append(("model predicts", ", ".join(guesses)))
    timing = ", ".join(f"{e(s.key)} {s.seconds:.1f} s" for s in report.sections)
    return _PAGE.format(
        title=e(f"nnattr report: {h['model']}"), style=_STYLE,
        facts="".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts),
        toc="".join(f'<li><a href="#{s.key}">{e(s.title)}</a>{_badge(s)}</li>' for s in report.sections),
        body="".join(_render_section(s) for s in report.sections),
        footer=f"nnattr {e(h['nnattr'])} · {h['seconds']:.1f} s ({timing}) · every number is in "
               f"<a href=results.json>results.json</a>")


def _badge(s: Section) -> str:
    return "" if s.status == "ok" else f' <span class="badge {s.status}">{s.status}</span>'


def _render_section(s: Section) -> str:
    e = html.escape
    parts = [f'<section id="{s.key}"><h2>{e(s.title)}{_badge(s)}</h2>']
    if s.status != "ok":
        why = "could not run" if s.status == "failed" else "is unavailable"
        parts.append(f'<p class="note {s.status}">This section {why}: {e(s.note)}</p>')
    else:
        parts.append(f"<p>{s.text}</p>")
        if s.note:
            parts.append(f'<p class="note">{e(s.note)}</p>')
    parts.append("<div class=row>")  # figures and tables side by side where they fit
    parts += [f'<figure><a href="{e(f)}"><img src="{e(f)}" alt="{e(s.title)}: {e(f)}"></a></figure>'
              for f in s.figures]
    for head, rows in s.tables:
        cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + f"</tr>{cells}</table>")
    return "".join(parts) + "</div></section>"


_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em }
h1 { font-size: 1.6em; margin-bottom: .2em }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em }
th, td { padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top }
table.facts th { color: #555; font-weight: 600; white-space: nowrap }
code { font: .92em ui-monospace, Menlo, Consolas, monospace; background: #f4f4f6; padding: .05em .3em;
       border-radius: 3px }
.tok { display: inline-block; font: .85em ui-monospace, Menlo, monospace; background: #eef3fb;
       border: 1px solid #cbd8ee; border-radius: 3px; padding: 0 .3em; margin: .1em .05em }
.row { display: flex; flex-wrap: wrap; gap: .5em 2em; align-items: flex-start }
figure { margin: .5em 0; max-width: 100% }
img { max-width: 100%; height: auto; box-sizing: border-box; border: 1px solid #eee }
.dim { color: #666 }
ul.plain { list-style: none; padding: 0; margin: 0 }
nav ol { columns: 2 }
.note { background: #fff8e5; border-left: 4px solid #f0b400; padding: .5em .8em }
.note.unavailable { background: #f3f3f3; border-color: #999 }
.note.failed { background: #fdecea; border-color: #d93025 }
.badge { font-size: .7em; padding: .1em .5em; border-radius: 1em; vertical-align: middle; background: #999;
         color: #fff }
.badge.failed { background: #d93025 }
footer { margin-top: 3em; color: #666; font-size: .85em }
"""

_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<meta name=viewport content="width=device-width, initial-scale=1"><style>{style}</style></head><body>
<h1>nnattr report</h1><table class=facts>{facts}</table><nav><ol>{toc}</ol></nav>{body}
<footer>{footer}</footer></body></html>
"""

__all__ = ["build", "write_report", "patching", "render", "Report", "Section"]
