"""The AtP* figures of docs/methods/atp_star.md, recomputed from the shipped weights (tiny-ioi).

    python docs/make_atp_star.py

The report's two false negatives are ``resid_pre_0@-5`` (the residual stream at S2, the one position the pair
changes) and the head L0H2. For each, and for every single edge on the README pair, the estimates of plain
attribution patching, AtP* (QK fix) and AtP* + GradDrop are set beside the exact effect of patching the same thing
from the clean run into the corrupted one (activation patching for nodes; for an edge, the corrupted run with that
edge alone reading the clean writer, `recipes.circuit_faithfulness` with the roles swapped).
"""

from __future__ import annotations

import torch

import nnattr
from nnattr import circuits
from nnattr.embedded import tasks
from nnattr.recipes import (activation_patching, atp_star, attribution_patching, circuit_faithfulness,
                            edge_atp_star, edge_attribution_patching)

README = dict(clean="When Mary and John went to the store , John gave a drink to",
              corrupted="When Mary and John went to the store , Mary gave a drink to", answer=" Mary",
              distractor=" John")


def node_estimates(model, pairs: list[dict]) -> dict[str, torch.Tensor]:
    """Per pair: exact, AtP, AtP* (QK fix) and AtP* + GradDrop for resid_pre_0 at S2 (the embedding writer: the
    pairs differ only there) and for L0H2."""
    args = [[p[k] for p in pairs] for k in ("clean", "corrupted", "answer", "distractor")]
    exact = activation_patching.run(model, *args, nodes=("head",))["head"]
    total = torch.tensor(exact.per_prompt["clean_metric"]) - torch.tensor(exact.per_prompt["corrupted_metric"])
    l0h2 = exact.values[:, 0, 2] * total  # the recovered fraction, in metric units
    atp = attribution_patching.run(model, *args, nodes=("head",))["head"].values[:, 0, 2]
    node_star = atp_star.run(model, *args)
    edge = {name: recipe.run(model, *args, **kw) for name, recipe, kw in (
        ("eap", edge_attribution_patching, {}), ("star", edge_atp_star, {}),
        ("gd", edge_atp_star, {"grad_drop": True}))}
    writer = edge["eap"].labels["writer"]
    embed, head = writer.index("embed"), writer.index("L0H2")
    return {"resid exact": total, "resid AtP": edge["eap"].values[:, embed].nansum(-1),
            "resid AtP* edges": edge["star"].values[:, embed].nansum(-1),
            "L0H2 exact": l0h2, "L0H2 AtP": atp, "L0H2 AtP* node": node_star["head"].values[:, 0, 2],
            "L0H2 AtP* edges": edge["star"].values[:, head].nansum(-1)}


def edge_table(model) -> tuple[list[tuple], dict]:
    """Every edge of the README pair: (writer, reader, exact, EAP, AtP*, AtP* + GradDrop)."""
    args = [README[k] for k in ("clean", "corrupted", "answer", "distractor")]
    eap, star = edge_attribution_patching.run(model, *args), edge_atp_star.run(model, *args)
    gd = edge_atp_star.run(model, *args, grad_drop=True)
    W, R = eap.labels["writer"], eap.labels["reader"]
    every = [(w, r) for i, w in enumerate(W) for j, r in enumerate(R) if not eap.values[0, i, j].isnan()]
    alone = [circuits.Circuit(frozenset(every) - {e}) for e in every]  # every edge but one reads the run itself
    swapped = circuit_faithfulness.run(model, README["corrupted"], README["clean"], README["distractor"],
                                       README["answer"], circuit=alone)  # the corrupted prompt; one edge clean
    base = swapped.per_prompt["clean_metric"][0]
    exact = [base - m for m in swapped.per_prompt["circuit_metric"][0]]  # in the clean pair's metric
    rows = [(w, r, x, *(float(res.values[0, W.index(w), R.index(r)]) for res in (eap, star, gd)))
            for (w, r), x in zip(every, exact)]
    return rows, {"edges": len(rows)}


def l0h2_path(model) -> dict[str, float]:
    """Where L0H2's gap lives, on the README pair, with plain PyTorch hooks on the GPT-2 inside: its write's change
    into layer 1's values (all heads together) exact, with layer 1's LayerNorm linearised (the rest exact), with only
    that LayerNorm exact (the rest linear: the gradient at the values), and all linear (EAP); L0H2's attention
    from S2 on the corrupted run; the norms of its write's change and of the stream at S2."""
    hf, tok = model._module, model.tokenizer
    c, k = (tok(README[x], return_tensors="pt")["input_ids"] for x in ("clean", "corrupted"))
    a, d = (tok(README[x])["input_ids"][-1] for x in ("answer", "distractor"))
    h0, h1, D = hf.transformer.h[0], hf.transformer.h[1], hf.config.n_embd
    dh, seen = D // hf.config.n_head, {}
    hooks = [h0.attn.c_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("z", []).append(args[0])),
             h1.ln_1.register_forward_pre_hook(lambda m, args: seen.setdefault("x", []).append(args[0])),
             h1.attn.c_attn.register_forward_hook(lambda m, args, out: seen.setdefault("qkv", []).append(out))]
    with torch.no_grad():
        hf(c)
    logits = hf(k, output_attentions=True)
    for hook in hooks:
        hook.remove()
    seen["qkv"][1].retain_grad()
    metric = lambda out: (out.logits[0, -1, a] - out.logits[0, -1, d]).item()  # noqa: E731
    (logits.logits[0, -1, a] - logits.logits[0, -1, d]).backward()
    head = slice(2 * dh, 3 * dh)  # L0H2's slice of the output projection
    delta = ((seen["z"][0] - seen["z"][1])[..., head] @ h0.attn.c_proj.weight[head]).detach()
    x = seen["x"][1].detach()
    values = lambda x: (h1.ln_1(x) @ h1.attn.c_attn.weight + h1.attn.c_attn.bias)[..., 2 * D:]  # noqa: E731
    exact_v = (values(x + delta) - values(x)).detach()
    linear_v = torch.func.jvp(values, (x,), (delta,))[1].detach()

    def patched(dv):
        hook = h1.attn.c_attn.register_forward_hook(lambda m, args, out: torch.cat([out[..., :2 * D],
                                                                                    out[..., 2 * D:] + dv], -1))
        with torch.no_grad():
            out = metric(hf(k))
        hook.remove()
        return out - metric(logits)

    grad_v = seen["qkv"][1].grad[..., 2 * D:]
    s2 = c.shape[1] - 5
    return {"exact": patched(exact_v), "norm linear, rest exact": patched(linear_v),
            "norm exact, rest linear": float((grad_v * exact_v).sum()), "EAP": float((grad_v * linear_v).sum()),
            "L0H2 attention from S2": float(logits.attentions[0][0, 2, s2].detach().max()),
            "|write change| at S2": float(delta[0, s2].norm()), "|stream| at S2": float(x[0, s2].norm())}


def recall(rows, column: int, k: int) -> int:
    """How many of the exact top-k edges (by magnitude) the estimate in ``column`` puts in its own top k."""
    top = lambda c: {r[:2] for r in sorted(rows, key=lambda r: -abs(r[c]))[:k]}  # noqa: E731
    return len(top(2) & top(column))


def main() -> None:
    model = nnattr.load("tiny-ioi")
    pairs = [README] + tasks.ioi_pairs(19, seed=0)
    est = node_estimates(model, pairs)
    print("| node | exact | AtP | AtP* (node, QK fix) | AtP* on edges (QK fix), summed |")
    print("|---|---|---|---|---|")
    for label, pick in (("README pair", slice(0, 1)), (f"mean over {len(pairs)} IOI pairs", slice(None))):
        mean = {k: float(v[pick].mean()) for k, v in est.items()}
        print(f"| `resid_pre_0@S2`, {label} | {mean['resid exact']:.1f} | {mean['resid AtP']:.2f} | (heads only) | "
              f"**{mean['resid AtP* edges']:.1f}** |")
        print(f"| L0H2, {label} | {mean['L0H2 exact']:.1f} | {mean['L0H2 AtP']:.1f} | {mean['L0H2 AtP* node']:.1f} "
              f"| {mean['L0H2 AtP* edges']:.1f} |")
    rows, info = edge_table(model)
    print(f"\nREADME pair, all {info['edges']} edges, one patched at a time:")
    print("| edge | exact | EAP | AtP* | AtP* + GradDrop |")
    print("|---|---|---|---|---|")
    for w, r, x, e, s, g in sorted(rows, key=lambda r: -abs(r[2]))[:8]:
        print(f"| {w} → {r} | {x:.2f} | {e:.2f} | {s:.2f} | {g:.2f} |")
    print("\nL0H2 -> layer 1's values, README pair:", {k: round(v, 4) for k, v in l0h2_path(model).items()})
    print("\n| top-k by exact effect, found in the estimate's top k | EAP | AtP* | AtP* + GradDrop |")
    print("|---|---|---|---|")
    for k in (5, 10, 20):
        print(f"| k = {k} | {recall(rows, 3, k)} | {recall(rows, 4, k)} | {recall(rows, 5, k)} |")


if __name__ == "__main__":
    main()
