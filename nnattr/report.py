"""``nnattr report``: the standard workflow on a prompt or a clean/corrupted pair, as one folder.

Attribution first (cheap: one or two passes each), then patching to confirm (Nanda 2023):
direct logit attribution by component, by head and by head and source position; head
attribution (gradient x activation); logit lens over every position; attention rollout; and
attribution patching with exact activation patching of its top candidates and a validation
of the estimate. The folder holds ``index.html`` (figures linked relatively, tables, what each
section shows), one PNG per figure, and ``results.json`` with every number.

Progress: on a terminal and in a notebook, a bar names the section running (and, in the
recipes, the chunks of a batch run in several); when stderr is piped or captured (CI logs,
pytest) nothing is drawn. ``nnattr report`` ends with one line: where the report is, and
the sections that failed, if any (exit status 1).

>>> import nnattr
>>> from nnattr.report import build
>>> report = build(nnattr.load("tiny-ioi"), ["When Mary and John went to the store, John gave a drink to"],
...                corrupted=["When Mary and John went to the store, Mary gave a drink to"],
...                target=" Mary", distractor=" John", out="nnattr-report")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import html
import importlib.util
import json
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from .batch import Batch
from .plotting import entry_label, number
from .result import POSITION_DIMS
from .runner import show_progress

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
    page, n = report.out / "index.html", len(report.sections)
    if report.failed:
        names = ", ".join(s.key for s in report.failed)
        print(f"report written to {page}, but {len(report.failed)} of {n} sections failed: {names}")
        return 1
    missing = [s.key for s in report.sections if s.status != "ok"]
    print(f"report written to {page} ({n} sections" + (f"; unavailable: {', '.join(missing)})" if missing else ")"))
    return 0


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
    plan = [
        ("dla_component", "Direct logit attribution by component", _dla_component, {}),
        ("dla_head", "Direct logit attribution by head", _dla_head, {}),
        ("head_attribution", "Head attribution (gradient × activation)", _head_attribution, {}),
        ("logit_lens", "Logit lens", _logit_lens, {}),
        ("tuned_lens", "Tuned lens", _tuned_lens, {}),
        ("token_circulation", "Token circulation", _token_circulation, {}),
        ("token_attribution", "Token attribution", _token_attribution, {}),
        ("rollout", "Attention rollout", _rollout, {}),
        ("features", "SAE feature attribution", _features, {"corrupted": corrupted}),
        ("patching", "Attribution patching, confirmed by exact patching", _patching,
         {"corrupted": corrupted, "top": top}),
        ("edges", "Edge attribution patching", _edges, {"corrupted": corrupted}),
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), desc=f"[1/{len(plan)}] {plan[0][1]}", unit="section", leave=False,
               disable=not show_progress())
    run = dict(model=model, prompts=batch, target=None, distractor=None, out=out,
               options={"batch_size": batch_size, **(options or {})}, cache={}, progress=bar)
    sections = []
    for i, (key, title, fn, kw) in enumerate(plan, 1):
        bar.set_description(f"[{i}/{len(plan)}] {title}")
        sections.append(_section(key, title, fn, run, **kw))
        bar.update()
    bar.close()
    d = dims(model)
    header = {
        "nnattr": __version__, "model": model_name or getattr(model.config, "_name_or_path", "model"),
        "architecture": f"{model.config.model_type}: {d.n_layers} layers × {d.n_heads} heads, d_model {d.d_model}",
        "prompts": prompts, "corrupted": None if corrupted is None else list(corrupted.labels),
        "target": target, "distractor": distractor,
        "metric": next((r["metric"] for s in sections for r in s.results.values()  # as the results say it
                        if isinstance(r, dict) and r.get("metric") and r.get("method") != "logit_lens"), None),
        "tokens": [list(t) for t in batch.tokens],  # per prompt
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
    single = attr.single()  # L3H7 and 3 significant figures, as in the command's tables
    return [[entry_label(single, labels), number(value), *(c(labels) for c in columns)]
            for labels, value in single.top(k)]


def _aligned(attr):
    """The mean over prompts with positions counted from each prompt's last token, saying so:
    each position is labelled by its offset and the token there when every prompt has the same
    one (else how many tokens it mixes), with ``n=`` the prompts that reach back that far when
    fewer than all. The same as ``attr.single()`` for one prompt."""
    if len(attr) == 1:
        return attr.single()
    mean, width, n = attr.mean(align="end"), max(attr.lengths), len(attr)
    names = []
    for j in range(width):
        seen = [t[j - width + len(t)] for t in attr.tokens if len(t) >= width - j]  # [prompts that have it]
        kinds = set(seen)
        word = (next(iter(kinds)).strip() or repr(next(iter(kinds)))) if len(kinds) == 1 else f"[{len(kinds)} tokens]"
        names.append(f"{j - width} {word}" + (f" n={len(seen)}" if len(seen) < n else ""))
    return replace(mean, labels={d: names if d in POSITION_DIMS else mean.labels[d] for d in mean.dims})


def _aligned_text(n: int, figure: str = "the figure") -> str:
    """What an `_aligned` figure shows, in words ("" for one prompt)."""
    return "" if n == 1 else (
        f" With {n} prompts {figure} shows their mean, positions counted back from each prompt's last token "
        f"(the labels -1, -2, ...), so a column averages different tokens wherever the prompts differ: its label "
        f"names the token only where all {n} share it, else says how many different tokens it mixes "
        f"(<code>[3 tokens]</code>), and <code>n=</code> counts the prompts long enough to reach it when not all are.")


def _tally(words, shown: int = 4) -> str:
    """``"' Mary' ×120, ' John' ×80"``: the most common first, then ``… and 3 more (5 prompts)``."""
    counts = collections.Counter(words).most_common()
    text = ", ".join(f"{w!r} ×{c}" for w, c in counts[:shown])
    rest = counts[shown:]
    return text + (f", … and {len(rest)} more ({sum(c for _, c in rest)} prompts)" if rest else "")


def _metric_html(attr) -> str:
    return html.escape(attr.metric or "the metric")


def _dla_component(section, *, model, prompts, target, distractor, out, options, **_):
    from .recipes import direct_logit_attribution as dla

    result = dla.run(model, prompts, target, distractor, by="component", **options)
    _figure(section, out, "dla_component.png", result)
    section.tables.append((["component", result.units], _top_rows(result, 6)))
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
    section.tables.append((["head", heads.units], _top_rows(heads, 8)))
    section.text = (
        f"The attention bars above, split per head (layer × head), in units of <b>{_metric_html(heads)}</b>. "
        f"In IOI, heads that copy the indirect object's name to the output (name movers) are strongly "
        f"positive; heads that copy the other name are negative.")
    try:
        positions = dla.run(model, prompts, target, distractor, by="head_position", **options)
    except ValueError as error:  # e.g. a model without attention probabilities
        section.note = f"per source position unavailable: {error}"
        return
    n = len(positions)
    if n > 1:  # one prompt with its own tokens, then the mean, which says how it aligns prompts
        first = replace(positions[0], title=f"{positions.title}: prompt 1 of {n}")
        _figure(section, out, "dla_head_position_prompt1.png", first)
    _figure(section, out, "dla_head_position.png", _aligned(positions))
    section.results["dla_head_position"] = positions.to_dict()
    section.text += (
        " The strip below splits each head's direct effect by the source token it reads from "
        "(attention weight × value vector): the first row sums all heads, then come the heads with the "
        "largest totals. A head that reads the indirect object's name and raises the metric copies that "
        "name (a name mover); one that reads the repeated subject and raises the metric suppresses the "
        "subject.")
    if n > 1:
        section.text += " The first strip is prompt 1 alone, over its own tokens." + _aligned_text(n, "the second")


def _head_attribution(section, *, model, prompts, target, distractor, out, options, cache, **_):
    from .recipes import direct_logit_attribution as dla
    from .recipes import head_attribution as ha

    result = ha.run(model, prompts, target, distractor, **options)
    direct = cache.get("dla_head") or dla.run(model, prompts, target, distractor, by="head", **options)
    direct = direct.single()  # [layer, head]

    def dla_of(labels):
        layer, head = direct.labels["layer"].index(labels[0]), direct.labels["head"].index(labels[1])
        return number(direct.values[layer, head])

    _figure(section, out, "head_attribution.png", result)
    section.results["head_attribution"] = result.to_dict()
    section.tables.append((["head", f"gradient × activation: {result.units}", f"DLA: {direct.units}"],
                           _top_rows(result, 8, dla_of)))
    section.text = (
        f"For each head, the gradient of <b>{_metric_html(result)}</b> with respect to the head's output, "
        f"times that output, summed over positions: a first-order estimate of how much the metric would "
        f"drop if the head were switched off (zeroed). Unlike direct logit attribution it includes effects "
        f"through later layers, so a head that is large here but small in DLA acts through other heads "
        f"(in IOI: S-inhibition and induction heads).")


def _logit_lens(section, *, model, prompts, target, out, options, **_):
    from .recipes import logit_lens as ll

    result = ll.run(model, prompts, target, positions="all", **options)
    _figure(section, out, "logit_lens.png", _aligned(result))
    section.results["logit_lens"] = result.to_dict()
    one = result.single()
    values = one.values.detach()  # [layer, position]
    top, probs, ranks = (one.meta.get(k) for k in ("top_tokens", "top_probs", "target_rank"))
    if isinstance(top, list):
        rows = [[layer, ", ".join(f"{t.strip()!r} {number(p, signed=False)}" for t, p in zip(top[i][-1][:3],
                                                                                          probs[i][-1][:3])),
                 number(values[i, -1], signed=False), str(int(ranks[i][-1]))]
                for i, layer in enumerate(one.labels["layer"])]
        section.tables.append((["residual after", "top 3 at the last position (probability)", "P(target)",
                                "target rank (0 = top)"], rows))
        section.results["prediction"] = [[t, p] for t, p in zip(top[-1][-1], probs[-1][-1])]
    else:  # several prompts: at each one's last token, where the target is
        top, ranks, n = result.per_prompt["top_tokens"], result.per_prompt["target_rank"], len(result)
        rows = [[layer, number(values[i, -1], signed=False),
                 f"{sum(r[i][-1] == 0 for r in ranks)} of {n}", _tally([t[i][-1][0].strip() for t in top], 3)]
                for i, layer in enumerate(one.labels["layer"])]
        section.tables.append((["residual after", f"P(target), mean over {n} prompts", "target on top",
                                "top prediction (prompts)"], rows))
    section.text = (
        "Each row decodes the residual stream after one layer with the model's own final norm and "
        "unembedding, as if the model stopped there (nostalgebraist 2020). " + (
            "Each cell shows the top prediction for the next token after reading up to that position (bold: it "
            "is the expected next token); the colour is the probability of the expected token, which at the last "
            "position is the target. Read the last column from the bottom up to see at which layer the answer "
            "appears." if len(result) == 1 else
            "The colour is the probability of the expected next token (at the last position, the target). The "
            "table reads each prompt at its own last token: per layer, the target's mean probability, in how "
            "many prompts it is the top prediction, and the top predictions." + _aligned_text(len(result))))


def _tuned_lens(section, *, model, prompts, out, options, **_):
    from .embedded.train_lens import HELDOUT_SEED, HELDOUT_TEXTS, texts
    from .lens import kl_by_layer, kl_plot, resolve
    from .recipes import logit_lens as ll

    try:
        lens = resolve(model, "tuned")  # the lens shipped in the model's folder (tiny-ioi has one)
    except (ValueError, FileNotFoundError) as error:
        section.status, section.note = "unavailable", str(error).split(";")[0]
        return
    result = ll.run(model, prompts, positions="all", lens=lens, **options)
    _figure(section, out, "tuned_lens.png", _aligned(result))
    section.results["tuned_lens"] = result.to_dict()
    shipped = lens.base_model == "tiny-ioi"  # its held-out texts are known: the table docs/methods/tuned_lens.md gives
    heldout = texts(HELDOUT_TEXTS, seed=HELDOUT_SEED, split="test") if shipped else list(prompts.labels)
    logit, tuned = kl_by_layer(model, heldout), kl_by_layer(model, heldout, lens)
    fig = kl_plot({"logit lens": logit, "tuned lens": tuned})
    fig.savefig(out / "tuned_lens_kl.png", dpi=110)
    section.figures.append("tuned_lens_kl.png")
    layers = result.labels["layer"]
    section.tables.append((["residual after", "logit lens: KL to the output (nats)", "tuned lens: KL (nats)"],
                           [[layer, f"{a:.3f}", f"{b:.3f}"] for layer, a, b in zip(layers, logit.tolist(),
                                                                                    tuned.tolist())]))
    section.results["kl_by_layer"] = {"layers": layers, "logit_lens": logit.tolist(), "tuned_lens": tuned.tolist(),
                                      "texts": len(heldout), "held_out": shipped}
    section.text = (
        "The tuned lens (Belrose et al. 2023) decodes each layer's residual like the logit lens, after a learned "
        "affine translator (h + A h + b, one per layer, trained to match the model's final distribution). The "
        "first figure is the lens above read through it; the second compares the two lenses' KL divergence from "
        "the model's output distribution, per layer, averaged over the real tokens of " + (
            f"{len(heldout)} held-out texts (IOI and induction, never seen in the lens's training)" if shipped else
            "the report's prompts") + ": lower is closer to what the model finally predicts.")


def _token_circulation(section, *, model, prompts, out, options, **_):
    from .recipes import token_circulation as tc

    result = tc.run(model, prompts, **options)
    _figure(section, out, "token_circulation.png", _aligned(result))
    section.results["token_circulation"] = result.to_dict()
    n, at_last = len(result), lambda key: [[row[-1] for row in p] for p in result.per_prompt[key]]  # noqa: E731
    ranks, parts = at_last("rank"), [at_last(key) for key in ("attn", "mlp", "rescale")]  # [prompt][layer]
    rows = []
    for i, layer in enumerate(result.labels["layer"]):  # each prompt at its own last token (right-aligned)
        split = [number(_mean([p[i - 1] for p in part])) if i else "" for part in parts]
        top = str(ranks[0][i]) if n == 1 else f"{sum(r[i] == 0 for r in ranks)} of {n}"
        rows.append([layer, number(_mean(result.values[:, i, -1].tolist())), top, *split])
    mean = "" if n == 1 else f", mean over {n} prompts"
    section.tables.append((["residual after", f"lens {result.metric or 'logit of the target'}{mean}",
                            "target rank (0 = top)" if n == 1 else "target on top", "attention", "MLP", "rescale"],
                           rows))
    section.text = (
        "Where the target token lives: every layer's residual, at every position, decoded with the model's own "
        "final norm and unembedding (the logit lens), and the target's logit there; the cell text is its rank. "
        "The table reads the last token: each layer's change of that logit splits exactly into the attention "
        "write and the MLP write on the target's direction through the final norm (at the scale of the residual "
        "after the layer, as DLA does at the last layer) and the rescale, the norm's change of scale applied to "
        "what was already there. The first row where the rank reaches 0 is where the model starts pointing at "
        "the target." + _aligned_text(n))


def _token_attribution(section, *, model, prompts, out, options, **_):
    from .recipes import token_attribution as ta

    ig = ta.run(model, prompts, baseline="pad", **options)
    try:
        direct = _aligned(ta.run(model, prompts, method="attention", **options))
    except ValueError as error:  # heads that are not exact (Gemma-2), or no attention probabilities
        direct, section.note = None, f"direct path unavailable: {error}"
    _figure(section, out, "token_attribution.png", ig)
    section.results["token_attribution"] = ig.to_dict()
    one = _aligned(ig)  # one prompt, or the mean aligned at the last token
    rows = [[entry_label(one, labels), number(value)] +
            ([] if direct is None else [number(direct.values[direct.labels["position"].index(labels[0])])])
            for labels, value in one.top(8)]
    section.tables.append((["input token", f"integrated gradients (pad baseline): {ig.units}"] +
                           ([] if direct is None else ["direct path through attention"]), rows))
    err, steps = ig.meta["completeness_error"], ig.meta["steps"]
    section.text = (
        f"Each input token's contribution to <b>{_metric_html(ig)}</b>: integrated gradients (Sundararajan et al. "
        f"2017) over the vector entering the residual stream, from a baseline with every token replaced by the pad "
        f"token ({steps} steps, one batch). The contributions sum to the metric minus its value on the baseline up to "
        f"{number(err, signed=False)} (the completeness error). The last column keeps only the direct path through "
        f"the heads' value reads: it leaves out MLPs and every path through later layers." + _aligned_text(len(ig)))


def _rollout(section, *, model, prompts, out, options, **_):
    from .recipes import attention_rollout as ar

    result = ar.run(model, prompts, **options)
    last = _aligned(result)  # [query, key]: one prompt, or the mean aligned at the last token
    _figure(section, out, "rollout.png", last)
    section.results["rollout"] = result.to_dict()
    rows = sorted(zip(last.labels["key"], last.values[-1].tolist()), key=lambda kv: -kv[1])[:6]
    mean = f", mean over {len(result)} prompts" if len(result) > 1 else ""
    section.tables.append((["input token", f"share of the last token's representation ({result.units}{mean})"],
                           [[k, number(v, signed=False)] for k, v in rows]))
    section.text = (
        "How much each token's final representation traces back to each input token: the head-averaged "
        "attention of every layer, mixed half-and-half with the identity for the residual stream, "
        "multiplied through the layers (Abnar &amp; Zuidema 2020). Rows sum to 1. A rough map of "
        "information flow: it ignores value vectors and MLPs, and mass piles up on the first token (an "
        "attention sink), hence the square-root colour scale." + _aligned_text(len(result)))


def _features(section, *, model, prompts, corrupted, out, options, **_):
    from .features import resolve
    from .recipes import feature_attribution, feature_patching

    try:
        (sae,) = resolve(model, None)  # the SAE shipped with the model (tiny-ioi has one)
    except ValueError as error:
        section.status, section.note = "unavailable", str(error).split(":")[0]
        return
    result = feature_attribution.run(model, prompts, sae=sae, top_k=10, **options)
    _figure(section, out, "features.png", result)
    section.results["feature_attribution"] = result.to_dict()
    section.tables.append((["feature", result.units], _top_rows(result, 8)))
    section.text = (
        f"The residual stream entering layer {sae.layer}, encoded by the shipped sparse autoencoder "
        f"({sae.d_sae} features), splits <b>{_metric_html(result)}</b> exactly: each feature's activation times "
        f"its decoder direction through the final norm (frozen scale), plus b_dec, the SAE's error and the rest "
        f"(later layers and biases); they miss the model's value by {number(result.meta['sum_error'], signed=False)}.")
    if corrupted is not None:
        patched = feature_patching.run(model, prompts, corrupted, sae=sae, top_k=10, **options)
        _figure(section, out, "feature_patching.png", patched)
        section.results["feature_patching"] = patched.to_dict()
        section.tables.append((["feature", f"feature patching: {patched.units}"], _top_rows(patched, 8)))
        section.text += (
            " Feature patching estimates, to first order, how much moving each feature from its corrupted value to "
            "its clean one moves the corrupted prompt's metric (Marks et al. 2024).")


def _edges(section, *, model, prompts, corrupted, out, options, **_):
    if corrupted is None:
        section.status, section.note = "unavailable", "needs a corrupted prompt per prompt (--corrupted)"
        return
    from .recipes import edge_attribution_patching as eap

    result = eap.run(model, prompts, corrupted, **options)
    mean = result.mean() if len(result) > 1 else result[0]  # [writer, reader]
    _figure(section, out, "edges.png", mean)
    section.results["edges"] = result.to_dict()
    section.tables.append((["writer", "reader", f"{result.units}" + (f", mean over {len(result)} pairs"
                                                                     if len(result) > 1 else "")],
                           [[w, r, number(v)] for (w, r), v in mean.top(10)]))
    section.text = (
        f"Which connections carry <b>{_metric_html(result)}</b>: every edge from a writer (an embedding, a head, an "
        f"MLP) to a reader downstream (a head's query, a kv head's key or value, an MLP, the logits), estimated "
        f"as the writer's clean − corrupted change dotted with the gradient of the metric at the reader's own copy "
        f"of the residual stream (Syed et al. 2023), on the corrupted run. The edges out of a head sum to its "
        f"attribution-patching score above, and the edges into a reader to attribution patching at that reader's "
        f"input. Blank cells: no edge (a writer never reaches a reader of its own or an earlier layer).")
    from .recipes import edge_atp_star

    try:  # AtP*'s QK fix on the same edges: where saturated attention hides an edge from EAP
        star = edge_atp_star.run(model, prompts, corrupted, **options)
    except ValueError as error:  # a family whose softmax it cannot recompute (Falcon, sinks, soft-capped scores)
        section.text += f" AtP* on edges is not available here: {error}"
        return
    fixed = (star.mean() if len(star) > 1 else star[0]).values  # [writer, reader]
    gap = (fixed - mean.values).abs().nan_to_num(0).flatten()
    W, R = result.labels["writer"], result.labels["reader"]
    rows = [[W[i // len(R)], R[i % len(R)], number(mean.values.flatten()[i]), number(fixed.flatten()[i])]
            for i in gap.topk(min(5, len(gap))).indices.tolist() if gap[i] > 1e-3 * gap.max().clamp(min=1e-12)]
    section.results["edges_atp_star"] = star.to_dict()
    section.tables.append((["writer", "reader", "EAP", "AtP* (QK fix)"], rows))
    section.text += (
        " The last table lists the edges whose estimate changes most under AtP*'s QK fix (Kramár et al. 2024), which "
        "recomputes the softmax of the query or key an edge moves instead of following its gradient: where a head's "
        "attention is saturated the gradient is nearly zero and EAP misses the edge (a false negative). Exact "
        "patching of single edges decides between them (docs/methods/atp_star.md).")


def _patching(section, *, model, prompts, corrupted, target, distractor, out, options, top, progress=None, **_):
    missing = [m for m in PATCHING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        section.status, section.note = "unavailable", f"not in this installation: {', '.join(missing)}"
        return
    if corrupted is None:
        section.status, section.note = "unavailable", "needs a corrupted prompt per prompt (--corrupted)"
        return
    result = patching(model, prompts, corrupted, target, distractor, top=top, options=options, progress=progress)
    estimate, exact, comparison = result["estimate"], result["exact"], result["comparison"]
    _figure(section, out, "patching_heads.png", estimate["head"])
    _figure(section, out, "patching_resid.png", _aligned(estimate["resid"]))
    import matplotlib.pyplot as plt

    fig = comparison.plot()
    fig.savefig(out / "patching_validation.png", dpi=110)
    plt.close(fig)
    section.figures.append("patching_validation.png")
    from .validation import TOP_K, entry_labels, metric_effect, top_k_text

    rows = []  # the candidates that were patched, by estimated size
    for node_type in ("head", "attn", "mlp"):
        est = metric_effect(estimate[node_type]).nanmean(0).flatten()  # [entry]
        eff = metric_effect(exact[node_type]).nanmean(0).flatten()
        recovered = exact[node_type].values.float().nanmean(0).flatten()
        for i, label in enumerate(entry_labels(estimate[node_type])):
            if not recovered[i].isnan():
                row = [label, number(est[i]), number(eff[i]), number(recovered[i])]
                rows.append((abs(float(est[i])), row))
    rows = [r for _, r in sorted(rows, key=lambda r: -r[0])]
    section.tables.append((["node", "attribution patching (metric units)", "exact patching (metric units)",
                            "recovered fraction"], rows[:top]))
    section.tables.append((["node type", "patched exactly", "Pearson", "Spearman", TOP_K],
                           [[t, f"all {a.n}" if a.n == a.total else f"{a.n} of {a.total}",
                             number(a.pearson, signed=False), number(a.spearman, signed=False), top_k_text(a)]
                            for t, a in comparison.agreements.items()]))
    section.results.update(
        estimate={t: a.to_dict() for t, a in estimate.items()}, exact={t: a.to_dict() for t, a in exact.items()},
        validation=comparison.to_dict(), warnings=comparison.warnings)
    meta = estimate["head"].per_prompt
    every = result["every"]
    some = [t for t in comparison.agreements if t not in every]
    covered = " and ".join(part for part in (
        f"every node of type {', '.join(every)}" if every else "",
        f"the estimate's top {top} of type {', '.join(some)}" if some else "") if part)
    pairs = len(meta["clean_metric"])
    section.text = (
        f"Attribution patching estimates, for every node at once (two forward passes and one backward), how "
        f"much <b>{_metric_html(estimate['head'])}</b> on the corrupted prompt would move towards the clean "
        f"prompt's value if that node's clean activation were patched in (Nanda 2023). Clean value "
        f"{number(_mean(meta['clean_metric']))}, corrupted {number(_mean(meta['corrupted_metric']))}"
        + (f" (means over {pairs} pairs). " if pairs > 1 else ". ") +
        f"Exact activation patching then re-runs the corrupted prompt with one node at a time patched in: "
        f"{covered} (a node type of at most {2 * top} nodes is patched whole); the recovered fraction is "
        f"(patched − corrupted) / (clean − corrupted). The scatter plot, the correlations and the top-k "
        f"agreement say how far the cheap estimate can be trusted on this model."
        + _aligned_text(pairs, "the residual-stream figure"))
    notes = list(comparison.warnings)
    if result["align"]:
        notes.insert(0, "Some pairs have different token counts: positions are aligned at the last token.")
    section.note = " ".join(notes)


def patching(model, clean, corrupted, target, distractor, *, top: int = 10, options=None, progress=None) -> dict:
    """Attribution patching, exact patching, and their comparison: ``{"estimate", "exact",
    "comparison", "align", "every"}`` (the report's patching workflow). Exact patching covers every
    node of a node type with at most ``2 * top`` nodes (at most twice the cost of its candidates;
    the top-k agreement then ranks them all; ``every`` lists those types), and the estimate's top
    ``top`` of larger ones.
    ``progress``: a tqdm bar whose postfix names the step running."""
    from .recipes import activation_patching, attribution_patching
    from .validation import compare

    say = progress.set_postfix_str if progress is not None else lambda text: None
    options = dict(options or {})
    equal = Batch.of(model, clean).lengths == Batch.of(model, corrupted).lengths
    align = None if equal else "right"  # per-position nodes of unequal pairs: aligned at the last token
    say("attribution patching")
    estimate = attribution_patching.run(model, clean, corrupted, target, distractor, align=align, **options)
    every = [t for t, a in estimate.items() if a.values[0].numel() <= 2 * top]  # nodes per pair
    some = [t for t in estimate if t not in every]
    exact = {}
    if every:
        say(f"exact patching: all {', '.join(every)}")
        exact.update(activation_patching.run(model, clean, corrupted, target, distractor, nodes=every, align=align,
                                             **options))  # batch_size: pairs per session, as for the estimate
    if some:
        say(f"exact patching: top {top} {', '.join(some)}")
        exact.update(activation_patching.run(model, clean, corrupted, target, distractor, nodes=some, align=align,
                                             candidates={t: estimate[t] for t in some}, k=top, **options))
    exact = {t: exact[t] for t in estimate}
    say("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings are kept in the comparison and shown in the report
        comparison = compare(estimate, exact, k=top)
    return {"estimate": estimate, "exact": exact, "comparison": comparison, "align": align, "every": every}


def _mean(values) -> float:
    return sum(values) / len(values)


def _plain(report: Report) -> dict:
    return {**report.header, "sections": {s.key: {"title": s.title, "status": s.status, "note": s.note,
                                                  "seconds": s.seconds, **s.results} for s in report.sections}}


def render(report: Report) -> str:
    """The report page: self-contained HTML, figures linked relatively."""
    h, e = report.header, html.escape
    n = len(h["prompts"])

    def listed(prompts):
        items = "".join(f"<li><code>{e(p)}</code></li>" for p in prompts[:5])
        more = f"<li>… and {len(prompts) - 5} more (all in results.json)</li>" if len(prompts) > 5 else ""
        return f"<ul class=plain>{items}{more}</ul>"

    def answers(given, default):  # one token for all, or a tally of one per prompt: never 400 names
        if given is None:
            return default
        if isinstance(given, (str, int)):
            return f"<code>{e(repr(given))}</code>" + (f" for all {n} prompts" if n > 1 else "")
        given = list(given)
        if len(set(given)) == 1:
            return f"<code>{e(repr(given[0]))}</code> for all {n} prompts"
        return f"one per prompt: {e(_tally(given))}"

    facts = [("model", f"{e(h['model'])} <span class=dim>({e(h['architecture'])})</span>"),
             ("prompt" if n == 1 else f"prompts ({n})", listed(h["prompts"]))]
    if h["corrupted"]:
        facts.append(("corrupted", listed(h["corrupted"])))
    facts.append(("target" + "s" * isinstance(h["target"], (list, tuple)),
                  answers(h["target"], "the model's top prediction, per prompt")))
    facts.append(("distractor" + "s" * isinstance(h["distractor"], (list, tuple)), answers(h["distractor"], "none")))
    if h.get("metric"):
        facts.append(("metric", f"<code>{e(h['metric'])}</code>"))
    shown = h["tokens"][:3]
    strips = "".join("<div>" + " ".join(f"<span class=tok>{e(t)}</span>" for t in tokens) + "</div>"
                     for tokens in shown)
    facts.append(("tokens" if n == 1 else f"tokens, prompts 1–{len(shown)} of {n}" if n > len(shown)
                  else "tokens, per prompt", strips))
    lens = next((s for s in report.sections if s.key == "logit_lens"), None)
    if lens is not None and "prediction" in lens.results:
        guesses = (f"<code>{e(t.strip())}</code> {number(p, signed=False)}" for t, p in lens.results["prediction"])
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
