"""Edges between components, and the results of edge attribution patching.

A writer puts a vector into the residual stream: an embedding (``embed``, ``pos_embed``), a head
(``L3H1``: its slice of the output projection), an MLP (``L3 MLP``). A reader takes a copy of the
stream downstream: a head's query (``L4H1 q``), a kv head's key or value (``L4H0 k``, ``L4H0 v``;
``L4KV0 k`` where heads share kv heads), an MLP (``L4 MLP``), the logits (``logits``). An edge
runs from a writer to every reader of a later layer, and from a layer's heads to its own MLP
when the block is sequential. Results are ``[prompt, writer, reader]``, NaN where no edge runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import Arch
from .pairs import Pairs
from .result import Attribution


def writers(a: Arch) -> list[str]:
    """The embeddings, then per layer its heads and its MLP, in the order of the score's writer axis."""
    return [*a.embeddings, *[w for i in range(a.n_layers) for w in [*(f"L{i}H{h}" for h in range(a.n_heads)),
                                                                     f"L{i} MLP"]]]


def readers(a: Arch) -> list[str]:
    """Per layer its query heads, its kv heads' keys, then their values, and its MLP; then the logits."""
    kv = "H" if a.n_kv_heads == a.n_heads else "KV"
    per_layer = lambda i: [*(f"L{i}H{h} q" for h in range(a.n_heads)),  # noqa: E731
                           *(f"L{i}{kv}{h} {s}" for s in "kv" for h in range(a.n_kv_heads)), f"L{i} MLP"]
    return [r for i in range(a.n_layers) for r in per_layer(i)] + ["logits"]


def edge_result(p: Pairs, out: dict, *, method: str, steps: int, top_k: int | None, title: str, units: str,
                recipe: str = "edge_attribution_patching", meta: dict | None = None) -> Attribution:
    """The ``[prompt, writer, reader]`` result of an edge recipe's trace output (`recipes.edge_attribution_patching`,
    `recipes.edge_atp_star`): ``out["scores"]``: the scores, or with ``top_k`` each pair's largest values, at
    ``out["index"]`` ``[pair, k, 2]`` (the rest NaN)."""
    a, metric = p.arch, out["metric"]  # [pair, clean / corrupted]
    p.check_metrics(metric.T, recovery=False)
    labels = {"prompt": list(p.clean.labels), "writer": writers(a), "reader": readers(a)}
    scores = out["scores"]
    if top_k:  # each pair's (values, [k, 2] indices)
        scores = torch.full((len(p), len(labels["writer"]), len(labels["reader"])), float("nan"))
        for i, (values, index) in enumerate(zip(out["scores"], out["index"])):
            scores[i, index[:, 0], index[:, 1]] = values
    meta = {"method": method, **({"steps": steps} if steps else {}), **({"top_k": top_k} if top_k else {}),
            **(meta or {})}
    if not a.head_exact:
        rows = "the mean over the path" if steps else "the corrupted run"
        meta["heads"] = (f"{a.family}'s heads pass a norm after attention: their changes are taken through its scale "
                         f"measured on the rows the gradient is taken at ({rows}) and frozen, so a layer's head edges "
                         f"sum to its attention write's edge only to first order")
    per_prompt = {"clean_metric": metric[:, 0].tolist(), "corrupted_metric": metric[:, 1].tolist()}
    for role in ("target", "distractor"):
        if getattr(p.clean, role) is not None:
            per_prompt["answer" if role == "target" else role] = p.clean.decode(getattr(p.clean, role))
    return Attribution(scores, ("prompt", "writer", "reader"), labels, method=recipe, by="edge",
                       units=units, title=title, meta=meta, per_prompt=per_prompt, tokens=p.corrupted.tokens,
                       metric=p.clean.metric() if p.metric is None else "custom metric")


# ----------------------------------------------------------------------------------------------- circuits


@dataclass(frozen=True)
class Circuit:
    """A set of edges ``(writer, reader)``, named as `writers` and `readers` name them; ``total``: the
    edges the model has, so ``len(circuit) / circuit.total`` is its share."""

    edges: frozenset
    total: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        edges = frozenset(self.edges)
        if not all(isinstance(e, tuple) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in edges):
            raise ValueError("a circuit's edges are (writer, reader) name pairs, e.g. ('L0H2', 'L1H0 v')")
        object.__setattr__(self, "edges", edges)

    def __len__(self) -> int:
        return len(self.edges)

    def __or__(self, other: "Circuit") -> "Circuit":
        return Circuit(self.edges | other.edges, max(self.total, other.total), f"{self.name} | {other.name}")

    def __and__(self, other: "Circuit") -> "Circuit":
        return Circuit(self.edges & other.edges, max(self.total, other.total), f"{self.name} & {other.name}")

    @property
    def nodes(self) -> set[str]:
        """The writers and readers its edges touch."""
        return {w for w, _ in self.edges} | {r for _, r in self.edges}

    def __repr__(self) -> str:
        return f"Circuit({self.name or 'edges'}: {len(self)} of {self.total})"


def _layer(label: str, last: int) -> int:
    """A writer's or reader's layer: the embeddings -1, the logits ``last`` (after every layer)."""
    if label == "logits":
        return last
    return -1 if not label.startswith("L") else int(label[1:].split("H")[0].split("K")[0].split(" ")[0])


def _kv_group(readers_: list[str]) -> int:
    """Query heads per kv head, from a result's reader labels."""
    return max(1, sum(r.endswith(" q") for r in readers_) // max(1, sum(r.endswith(" k") for r in readers_)))


def upstream(a: Arch) -> torch.Tensor:
    """``[writer, reader]`` bool: where an edge runs (the pattern of an edge attribution's non-NaN entries)."""
    W, R = writers(a), readers(a)
    lw = torch.tensor([_layer(w, a.n_layers) for w in W])[:, None]
    lr = torch.tensor([_layer(r, a.n_layers) for r in R])[None, :]
    heads = torch.tensor(["MLP" not in w and w.startswith("L") for w in W])[:, None]
    mlp_reader = torch.tensor([r.endswith("MLP") for r in R])[None, :]
    return (lw < lr) | ((lw == lr) & heads & mlp_reader & (not a.parallel))


def _mean_scores(scores: Attribution) -> tuple[torch.Tensor, list[str], list[str]]:
    if not isinstance(scores, Attribution) or scores.dims[-2:] != ("writer", "reader"):
        raise ValueError(f"scores: give an edge_attribution_patching result (dims prompt, writer, reader), not "
                         f"{getattr(scores, 'dims', type(scores).__name__)}")
    if scores.meta.get("top_k"):
        raise ValueError(f"these edge scores keep each pair's top {scores.meta['top_k']} only, so the other edges' "
                         f"means are unknown: run the edge recipe without top_k to build circuits")
    values = scores.values.nanmean(0) if scores.values.ndim == 3 else scores.values
    return values, scores.labels["writer"], scores.labels["reader"]


def top_edges(scores: Attribution, n: int, *, absolute: bool = True) -> Circuit:
    """The ``n`` edges with the largest score (by magnitude), averaged over the pairs."""
    values, W, R = _mean_scores(scores)
    key = (values.abs() if absolute else values).nan_to_num(-float("inf")).flatten()
    total = int((~values.isnan()).sum())
    if not 0 <= n <= total:
        raise ValueError(f"n={n}: the model has {total} edges")
    order = key.argsort(descending=True)[:n].tolist()
    return Circuit(frozenset((W[i // len(R)], R[i % len(R)]) for i in order), total, f"top {n}")


def _component(reader: str, a_kv_group: int) -> list[str]:
    """The writers a reader belongs to: a head's query or key/value (every head sharing that kv head), an MLP."""
    if reader == "logits" or reader.endswith("MLP"):
        return [reader]
    name, _ = reader.split(" ")
    layer, rest = name[1:].split("KV") if "KV" in name else name[1:].split("H")
    head = int(rest)
    heads = range(head * a_kv_group, (head + 1) * a_kv_group) if "KV" in name else [head]
    return [f"L{layer}H{h}" for h in heads]


def greedy(scores: Attribution, n: int, *, absolute: bool = True) -> Circuit:
    """``n`` edges built up from the logits: each step adds the largest-scoring edge (by magnitude,
    averaged over the pairs) into a component already in the circuit, so the circuit stays connected."""
    values, W, R = _mean_scores(scores)
    group = _kv_group(R)
    key = (values.abs() if absolute else values).nan_to_num(-float("inf"))
    reached, edges = {"logits"}, set()
    total = int((~values.isnan()).sum())
    readers_of = [set(_component(r, group)) for r in R]
    while len(edges) < n:
        open_ = torch.tensor([bool(c & reached) for c in readers_of])  # readers of components in the circuit
        masked = key.masked_fill(~open_[None, :], -float("inf"))
        for w, r in edges:
            masked[W.index(w), R.index(r)] = -float("inf")
        best = int(masked.flatten().argmax())
        if masked.flatten()[best] == -float("inf"):
            break  # nothing more is connected
        w, r = W[best // len(R)], R[best % len(R)]
        edges.add((w, r))
        reached.add(w)
    return Circuit(frozenset(edges), total, f"greedy {len(edges)}")


def ablated(a: Arch, circuits: list[Circuit]) -> torch.Tensor:
    """``[circuit, reader, writer]`` float: 1 where the writer reaches the reader but the edge is not in the circuit."""
    W, R, runs = writers(a), readers(a), upstream(a).T  # [reader, writer]
    out = runs.float()[None].repeat(len(circuits), 1, 1)
    for c, circuit in enumerate(circuits):
        for w, r in circuit.edges:
            if w not in W or r not in R or not runs[R.index(r), W.index(w)]:
                raise ValueError(f"edge {w!r} -> {r!r} of {circuit!r} is not an edge of this model (writers: "
                                 f"{W[0]!r} ... {W[-1]!r}; readers: {R[0]!r} ... {R[-1]!r})")
            out[c, R.index(r), W.index(w)] = 0.0
    return out


def ablation_order(p: Pairs, ablation: str, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Which corrupted prompt each pair's ablated values come from (`recipes.circuit_faithfulness`): its own
    (``"patch"``; ``"zero"`` and ``"mean"`` ignore it), or another pair's drawn with ``seed`` (``"resample"``). Refuses
    an unknown ablation, pairs whose positions do not line up for it, and a ``batch_size`` that would split the
    pairs a mean or a resample is taken over."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"seed={seed!r}, batch_size={batch_size!r}: give ints, seed >= 0 and batch_size >= 1 (or "
                         f"None: every pair at once)")
    if ablation not in ("patch", "zero", "mean", "resample"):
        raise ValueError(f"ablation={ablation!r}; expected 'patch' (the corrupted run's values), 'zero', 'mean' (over "
                         f"the corrupted prompts) or 'resample' (another pair's corrupted values)")
    if p.clean.lengths != p.corrupted.lengths:  # the ablated values are the corrupted run's, position by position
        raise ValueError(f"pairs of unequal token lengths {p.clean.lengths} / {p.corrupted.lengths}: give pairs "
                         f"of equal length (a writer's corrupted value replaces it at the same position)")
    if ablation in ("mean", "resample") and len(set(p.corrupted.lengths)) > 1:
        raise ValueError(f"{ablation} ablation takes values from other pairs position by position, so every pair "
                         f"needs the same token length (here {sorted(set(p.corrupted.lengths))}): give pairs of one "
                         f"template, or ablation='patch'")
    if ablation in ("mean", "resample") and batch_size is not None and batch_size < len(p):
        raise ValueError(f"{ablation} ablation takes values across the pairs, so they run as one batch: leave "
                         f"batch_size out (given {batch_size} for {len(p)} pairs), or give fewer pairs")
    if ablation in ("mean", "resample") and len(p) < 2:
        raise ValueError(f"{ablation} ablation takes values across pairs (the mean of one is its own corrupted run, "
                         f"as 'patch'): give at least 2 pairs")
    if ablation != "resample":
        return torch.arange(len(p))
    from .kernels import resample_draws

    return resample_draws(len(p), len(p), 1, ablation="resample", seed=seed, own=True)[:, 0]


def faithfulness_result(p: Pairs, out: dict, todo: list[Circuit], *, ablation: str, units: str, title: str,
                        drawn: tuple[torch.Tensor, int] | None = None) -> Attribution:
    """``[prompt, circuit]``: the recovered fraction; ``per_prompt``: the clean, corrupted and circuit metrics (and
    with ``drawn = (order, seed)``, resample ablation's draws: the pair each pair took its values from)."""
    base = out["base"]  # [pair, clean / corrupted]
    p.check_metrics(base.T, recovery=True)
    recovered = (out["circuit"] - base[:, 1:]) / (base[:, :1] - base[:, 1:])
    names = [c.name or f"circuit {i}" for i, c in enumerate(todo)]
    return Attribution(recovered, ("prompt", "circuit"), {"prompt": list(p.clean.labels), "circuit": names},
                       method="circuit_faithfulness", by="circuit", units=units, title=title, tokens=p.clean.tokens,
                       metric=p.clean.metric() if p.metric is None else "custom metric",
                       meta={"ablation": ablation, "edges": [len(c) for c in todo],
                             "total": int(upstream(p.arch).sum()), **({} if drawn is None else {"seed": drawn[1]})},
                       per_prompt={"clean_metric": base[:, 0].tolist(), "corrupted_metric": base[:, 1].tolist(),
                                   "circuit_metric": out["circuit"].tolist(),
                                   **({} if drawn is None else {"drawn": drawn[0].tolist()})})


def columns(a: Arch) -> list[torch.Tensor]:
    """The output columns of each attention reader's projection (query heads, then kv heads' keys, then values):
    ``[torch.Tensor [head, d_head]] * 3``, in the output of ``q_proj``, ``k_proj`` and ``v_proj`` (the fused module's
    output for a fused layout)."""
    from .kernels import split_qkv

    h, kv, d = a.n_heads, a.n_kv_heads, a.d_head
    widths = (h * d, kv * d, kv * d) if a.value_layout == "separate" else ((h + 2 * kv) * d,) * 3
    return [x[0] for x in split_qkv(*(torch.arange(w)[None] for w in widths), **a.qkv_shape)]


def curve(model, clean, corrupted, answer=None, distractor=None, *, scores: Attribution, sizes=None, build=None,
          ablation: str = "patch", **options) -> Attribution:
    """Faithfulness against circuit size (MIB's curve): circuits of ``sizes`` edges built from ``scores``
    (``build``: `top_edges`, the default, or `greedy`), each scored by `recipes.circuit_faithfulness` on
    these pairs, all circuits in one forward. Returns ``[prompt, circuit]``; ``meta["edges"]`` the sizes.
    Use pairs other than those the scores came from, to measure the circuit rather than the fit."""
    from .recipes import circuit_faithfulness

    total = int((~_mean_scores(scores)[0].isnan()).sum())
    sizes = sizes or sorted({max(1, round(total * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)} | {total})
    todo = [(build or top_edges)(scores, n) for n in sizes]
    if ablation != "patch":  # with nothing kept the model is not the corrupted run: measure it (MIB's normalisation)
        todo = [Circuit(frozenset(), total, "empty")] + todo
    result = circuit_faithfulness.run(model, clean, corrupted, answer, distractor, circuit=todo, ablation=ablation,
                                      **options)
    result.meta.update(areas(result))
    return result


def areas(result: Attribution) -> dict[str, float]:
    """MIB's summaries of a faithfulness curve (`curve`): ``cpr``, the area under the mean faithfulness against the
    share of edges kept (trapezoids over the sizes), and ``cmd``, the area under its distance from 1. Faithfulness
    is the recovered fraction normalised by the empty circuit's, ``(f - f_empty) / (1 - f_empty)``: with
    ``"patch"`` ablation the empty circuit is the corrupted run (0); with the others `curve` measures it (size 0).
    A circuit that keeps everything at every size has cpr 1 and cmd 0."""
    edges, mean = list(result.meta["edges"]), result.values.float().nanmean(0)
    if 0 in edges:  # measured
        empty = mean[edges.index(0)]
    else:  # patch: 0 by definition
        empty, edges, mean = torch.zeros(()), [0] + edges, torch.cat([torch.zeros(1), mean])
    share = torch.tensor([n / result.meta["total"] for n in edges])
    faithful = (mean - empty) / (1 - empty)
    order = share.argsort()
    share, faithful = share[order], faithful[order]
    return {"cpr": float(torch.trapezoid(faithful, share)), "cmd": float(torch.trapezoid((1 - faithful).abs(), share))}


def by_edge_attribution(model, clean, corrupted, answer, distractor, sizes=None, **options) -> list[Circuit]:
    """Circuits of the top ``sizes`` edges (one size or several; default: 1, 2, 5, 10, 20, 50 and 100% of the
    model's edges) by edge attribution patching with integrated gradients (5 steps) on these pairs."""
    from .recipes import edge_attribution_patching

    if sizes is not None and not (isinstance(sizes, int) or isinstance(sizes, (list, tuple)) and all(
            isinstance(n, int) for n in sizes)):
        raise ValueError(f"edges={sizes!r}: give a number of edges, or several (e.g. [10, 30]), not a share")
    scores = edge_attribution_patching.run(model, clean, corrupted, answer, distractor, method="ig", **options)
    total = int((~_mean_scores(scores)[0].isnan()).sum())
    sizes = sizes or sorted({max(1, round(total * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)} | {total})
    return [top_edges(scores, n) for n in ([sizes] if isinstance(sizes, int) else sizes)]


def to_test(model, clean, corrupted, answer, distractor, *, circuit=None, edges=None, **options) -> list[Circuit]:
    """The circuits `recipes.circuit_faithfulness` tests: ``circuit`` (see `as_circuits`), or the top ``edges`` by
    EAP-IG on these pairs (`by_edge_attribution`; default sizes with neither)."""
    if circuit is not None and edges is not None:
        raise ValueError("give circuit= or edges= (circuits built by edge attribution patching), not both")
    if circuit is not None:
        return as_circuits(circuit)
    return by_edge_attribution(model, clean, corrupted, answer, distractor, edges, **options)


def as_circuits(circuit) -> list[Circuit]:
    """One circuit, a set of (writer, reader) edges, or a list of either, as a list of circuits."""
    if isinstance(circuit, Circuit):
        return [circuit]
    if isinstance(circuit, (set, frozenset)):
        return [Circuit(frozenset(circuit))]
    items = list(circuit)
    if not items:
        raise ValueError("circuit=[]: give a circuit (nnattr.circuits.top_edges, greedy, or a set of edges), or "
                         "leave it out and give edges=")
    return [c if isinstance(c, Circuit) else Circuit(frozenset(c), name=f"circuit {i}") for i, c in enumerate(items)]
