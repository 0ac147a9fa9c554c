"""Every picture ``plot`` chooses renders to a PNG, says what it shows, and stays legible."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnattr import Attribution
from nnattr.plotting import describe, plot

L, H = 3, 4
TOKENS = ("<bos>", "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave", "a", "drink", "to")
T = len(TOKENS)
POS = [str(p - T) for p in range(T)]
DLA = dict(method="direct_logit_attribution", units="direct effect (logits)", metric="logit(' Mary') − logit(' John')",
           per_prompt={"target": [" Mary"], "distractor": [" John"], "logit": [1.5]})


def result(values, dims, labels, tokens=(TOKENS,), **fields):
    return Attribution(values, ("prompt",) + dims, {"prompt": ["p"] * values.shape[0], **labels}, tokens=tokens,
                       **fields)


def layer_head(n_layers=L, n_heads=H):
    return {"layer": [f"L{i}" for i in range(n_layers)], "head": [f"H{h}" for h in range(n_heads)]}


def lens(n_layers=L, tokens=TOKENS, n_prompts=1, words=("Mary", "John", "a", "ĠMary", "extraordinarily")):
    g = torch.Generator().manual_seed(0)
    layers = ["embed"] + [f"L{i}" for i in range(n_layers)]
    n = len(tokens)
    top = [[[[words[(i * 7 + j + k) % len(words)] for k in range(5)] for j in range(n)] for i in range(len(layers))]] * n_prompts
    ranks = [[[(i + j) % 3 for j in range(n)] for i in range(len(layers))]] * n_prompts
    return result(torch.rand(n_prompts, len(layers), n, generator=g), ("layer", "position"),
                  {"layer": layers, "position": [str(p - n) for p in range(n)]}, (tuple(tokens),) * n_prompts,
                  method="logit_lens", title="Logit lens", units="probability of the expected token",
                  per_prompt={"top_tokens": top, "target_rank": ranks, "target": [" Mary"] * n_prompts})


def rollout():
    r = torch.rand(1, T, T).tril()
    return result(r / r.sum(-1, keepdim=True), ("query", "key"), {"query": POS, "key": POS},
                  method="attention_rollout", title="Attention rollout", by="rollout", units="rollout weight",
                  meta={"residual": 0.5, "head_fusion": "mean"})


PATCHING = dict(method="attribution_patching", units="estimated effect (metric)", metric="logit(' Mary') − logit(' John')")
CASES = {
    "heads": lambda: result(torch.randn(1, L, H), ("layer", "head"), layer_head(),
                            title="Direct logit attribution by head", by="head", **DLA),
    "heads_mean": lambda: result(torch.randn(2, L, H), ("layer", "head"), layer_head(), (TOKENS, TOKENS[2:]),
                                 method="head_attribution", title="Head attribution (gradient × activation)",
                                 by="head", metric="logit(' Mary')", per_prompt={"target": [" Mary"] * 2}),
    "components": lambda: result(torch.randn(1, 2 + 2 * L + 1), ("component",),
                                 {"component": ["embed", "pos_embed"] + [f"{i}_{p}" for i in range(L)
                                                                          for p in ("attn_out", "mlp_out")] + ["bias"]},
                                 title="Direct logit attribution by component", by="component", **DLA),
    "layers": lambda: result(torch.randn(1, L + 2), ("layer",), {"layer": ["embed"] + [f"L{i}" for i in range(L)] + ["bias"]},
                             title="Direct logit attribution by layer", by="layer", **DLA),
    "lens": lens,
    "lens_mean": lambda: lens(n_prompts=3),
    "rollout": rollout,
    "flow": lambda: result(torch.rand(1, H, T, T), ("head", "query", "key"),
                           {"head": [f"H{h}" for h in range(H)], "query": POS, "key": POS},
                           method="attention_rollout", title="Attention flow (per head, last layer)", by="flow"),
    "head_position": lambda: result(torch.randn(1, L, H, T), ("layer", "head", "position"), {**layer_head(), "position": POS},
                                    title="Direct logit attribution by head and position", by="head_position", **DLA),
    "position": lambda: result(torch.randn(1, T), ("position",), {"position": POS}, method="saliency", title="Saliency"),
    "patching_heads": lambda: result(torch.randn(1, L, H), ("layer", "head"), layer_head(), by="head",
                                     title="Attribution patching (AtP) · head nodes", **PATCHING),
    "patching_mlp": lambda: result(torch.randn(1, L), ("layer",), {"layer": [f"L{i}" for i in range(L)]}, by="mlp",
                                   title="Activation patching · mlp nodes", method="activation_patching",
                                   units="recovered fraction"),
    "patching_resid": lambda: result(torch.randn(1, L, T), ("layer", "position"),
                                     {"layer": [f"L{i}" for i in range(L)], "position": POS}, by="resid",
                                     title="Attribution patching (AtP) · resid nodes", **PATCHING),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_picture_renders_to_png(case, tmp_path):
    backend = matplotlib.get_backend()
    fig = CASES[case]().plot()
    assert isinstance(fig, Figure)
    path = tmp_path / f"{case}.png"
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    assert fig.get_suptitle(), "every figure says what it shows"
    assert matplotlib.get_backend() == backend, "plotting must not switch the user's backend"


def test_picture_is_chosen_by_dimensions():
    heads = CASES["heads"]().plot().axes
    assert heads[0].get_xlabel() == "head" and heads[0].get_ylabel() == "layer"
    assert [t.get_text() for t in heads[0].get_yticklabels()] == ["L0", "L1", "L2"]
    assert len(heads) == 2, "heatmaps carry a colour bar"
    bars = CASES["components"]().plot().axes[0]
    assert len(bars.patches) == 2 + 2 * L + 1
    assert "3_attn_out" not in [t.get_text() for t in bars.get_xticklabels()]
    assert "2_attn_out" in [t.get_text() for t in bars.get_xticklabels()]
    grid = CASES["patching_heads"]().plot().axes[0]  # heads are a layer x head grid, as everywhere
    assert grid.get_images()[0].get_array().shape == (L, H)


def test_signed_values_use_a_diverging_map_centred_at_zero():
    a = result(torch.tensor([[[0.5, 3.0], [1.0, 2.0]]]), ("layer", "head"), layer_head(2, 2),
               method="head_attribution")  # all positive: the centre must still be 0
    image = a.plot().axes[0].get_images()[0]
    assert image.cmap.name == "RdBu_r"
    assert image.norm.vmin == -image.norm.vmax == pytest.approx(-3.0)
    probs = CASES["lens"]().plot().axes[0].get_images()[0]
    assert probs.cmap.name == "Blues" and (probs.norm.vmin, probs.norm.vmax) == (0, 1)


def test_titles_name_method_metric_and_averaging():
    title, unit = describe(CASES["heads"]().single())
    assert "Direct logit attribution by head" in title and "logit(' Mary') − logit(' John')" in title
    assert unit == "direct effect (logits)"
    title, _ = describe(CASES["heads_mean"]().single())
    assert "mean over 2 prompts" in title
    assert "Attribution patching (AtP) · head nodes" in describe(CASES["patching_heads"]().single())[0]


def test_lens_writes_the_top_token_in_each_cell_and_marks_hits():
    ax = CASES["lens"]().plot().axes[0]
    cells = ax.texts
    assert len(cells) == (L + 1) * T
    shown = {t.get_text() for t in cells}
    assert {"Mary", "John", "a"} <= shown and "ĠMary" not in shown, "byte-level space markers are not shown"
    assert all(w in {"Mary", "John", "a"} or (w.startswith("extra") and w.endswith("…")) for w in shown)
    assert any(t.get_fontweight() == "bold" for t in cells) and any(t.get_fontweight() == "normal" for t in cells)
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["<bos>", "When", "Mary"]


def test_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    assert rollout().plot(ax=ax) is fig
    assert ax.get_images() and ax.get_title().startswith("Attention rollout") and not fig.get_suptitle()


def test_unplottable_dimensions_are_refused():
    a = Attribution(torch.zeros(1, 2, 2, 2), ("prompt", "a", "b", "c"),
                    {"prompt": ["p"], "a": ["0", "1"], "b": ["0", "1"], "c": ["0", "1"]}, method="x")
    with pytest.raises(ValueError, match=r"no picture for dimensions \('a', 'b', 'c'\)"):
        plot(a)


def _overlaps(texts, renderer) -> list[tuple[str, str]]:
    """Pairs of visible texts whose boxes overlap by more than a pixel (a sweep along x)."""
    boxes = sorted(((t.get_window_extent(renderer), t.get_text()) for t in texts if t.get_text() and t.get_visible()),
                   key=lambda b: b[0].x0)
    out = []
    for i, (a, name) in enumerate(boxes):
        for b, other in boxes[i + 1:]:
            if b.x0 >= a.x1 - 1:
                break
            if min(a.y1, b.y1) - max(a.y0, b.y0) > 1 and min(a.x1, b.x1) - max(a.x0, b.x0) > 1:
                out.append((name, other))
    return out


@pytest.mark.parametrize("case", ["lens", "heads", "components", "rollout", "head_position"])
def test_no_overlapping_text_at_40_tokens_and_32_layers(case):
    words = ["the", "quick", "brown", "fox", "extraordinarily", ",", "Mary", "interpretability"]
    tokens = tuple(words[i % len(words)] for i in range(40))
    big = {
        "lens": lambda: lens(n_layers=32, tokens=tokens, words=("extraordinarily", "interpretability")),
        "heads": lambda: result(torch.randn(1, 32, 32), ("layer", "head"), layer_head(32, 32),
                                title="Direct logit attribution by head", **DLA),
        "components": lambda: result(torch.randn(1, 67), ("component",),
                                     {"component": ["embed", "pos_embed"] + [f"{i}_{p}" for i in range(32)
                                                                              for p in ("attn_out", "mlp_out")] + ["bias"]},
                                     title="Direct logit attribution by component", **DLA),
        "rollout": lambda: result(torch.rand(1, 40, 40).tril(), ("query", "key"),
                                  {"query": [str(p - 40) for p in range(40)], "key": [str(p - 40) for p in range(40)]},
                                  (tokens,), method="attention_rollout", title="Attention rollout"),
        "head_position": lambda: result(torch.randn(1, 32, 32, 40), ("layer", "head", "position"),
                                        {**layer_head(32, 32), "position": [str(p - 40) for p in range(40)]},
                                        (tokens,), title="Direct logit attribution by head and position", **DLA),
    }[case]()
    fig = big.plot()
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    assert not _overlaps(ax.get_xticklabels(), renderer), "x tick labels overlap"
    assert not _overlaps(ax.get_yticklabels(), renderer), "y tick labels overlap"
    assert not _overlaps(ax.texts, renderer), "cell texts overlap"
