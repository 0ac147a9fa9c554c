"""Attribution patching and exact activation patching against the plain-PyTorch floor and
TransformerLens, side by side on identical weights (issue 12).

GPT-2-small size (12 layers x 12 heads, d_model 768, vocabulary 50257), random weights built from
the config, frozen as on a hosted model. Contenders, interleaved in one process, median of
``--repeat`` rounds:

- ``nnattr``: ``recipes/attribution_patching`` (nodes resid, attn, mlp, head) and
  ``recipes/activation_patching`` (every head);
- ``floor``: plain PyTorch hooks, no nnsight: a clean forward without gradients caching the four
  sites, then a corrupted forward and ``torch.autograd.grad`` to the captured activations only
  (``floor_last``: the same computing only the last position's logits, which is what nnattr does
  for the default metric);
- ``tl``: TransformerLens (when importable), the Attribution_Patching_Demo recipe made fair: the
  clean run through ``run_with_cache`` without gradients (the demo also runs a clean backward it
  does not need), the corrupted run with forward and backward hooks on ``hook_z``,
  ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out``; exact patching with
  ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``.

Every contender's scores are checked against nnattr's before anything is timed.

    PYTHONPATH=. python tests/benchmarks/bench_patching_peers.py                    # AtP at T=64 and 256, exact
    PYTHONPATH=. python tests/benchmarks/bench_patching_peers.py --tokens 64 --skip-exact --repeat 3
    PYTHONPATH=. python tests/benchmarks/bench_patching_peers.py --scaling          # time and peak memory grid

The script re-runs itself with glibc's heap trimming off (``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``; ``--system-malloc`` keeps the default): otherwise freed activations
go back to the system and are faulted in again, by heuristics that swing either contender by up
to 25% from run to run.

Install TransformerLens with the ``bench`` extra (``pip install -e .[bench]``, torch pinned to the
CPU wheel first); without it the floor alone is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

import nnattr
from nnattr.recipes import activation_patching, attribution_patching
from tests.support import tiny

NODES = ("resid", "attn", "mlp", "head")

try:
    import transformer_lens as tl
except ImportError:  # optional peer
    tl = None


def gpt2_small(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)


def workload(batch: int, tokens: int):
    """``batch`` clean/corrupted pairs of ``tokens`` tokens, the answer and distractor ids."""
    tok = tiny.tokenizer()
    clean = tiny.prompts(batch, lengths=(tokens,))
    corrupted = tiny.prompts(batch, seed=1, lengths=(tokens,))
    answer, distractor = ["w5"] * batch, ["w9"] * batch
    ids = lambda prompts: tok(prompts, return_tensors="pt")["input_ids"]  # noqa: E731 (equal lengths: no padding)
    return tok, clean, corrupted, answer, distractor, ids(clean), ids(corrupted), \
        torch.tensor(tok.convert_tokens_to_ids(answer)), torch.tensor(tok.convert_tokens_to_ids(distractor))


# ----------------------------------------------------------------------------- plain PyTorch floor


def floor_atp(hf, clean_ids, corrupted_ids, answer, distractor, *, last_only: bool = False) -> dict:
    """AtP of every resid, attn, mlp and head node with hooks and autograd: ``{site: scores}``."""
    blocks, n_heads = hf.transformer.h, hf.config.n_head
    kw = {"logits_to_keep": 1} if last_only else {}

    def capture(store):
        hooks = []
        for block in blocks:
            hooks.append(block.register_forward_pre_hook(lambda m, a: store["resid"].append(a[0])))
            hooks.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a: store["head"].append(a[0])))
            hooks.append(block.attn.register_forward_hook(lambda m, a, o: store["attn"].append(o[0])))
            hooks.append(block.mlp.register_forward_hook(lambda m, a, o: store["mlp"].append(o)))
        return hooks

    def metric(logits):
        last = logits[:, -1].float()
        rows = torch.arange(len(last))
        return last[rows, answer] - last[rows, distractor]

    clean, corrupted = {s: [] for s in NODES}, {s: [] for s in NODES}
    hooks = capture(clean)
    try:
        with torch.no_grad():
            clean_metric = metric(hf(clean_ids, **kw).logits)
    finally:
        for h in hooks:
            h.remove()
    hooks = capture(corrupted) + [hf.transformer.wte.register_forward_hook(lambda m, a, o: o.requires_grad_(True))]
    try:
        value = metric(hf(corrupted_ids, **kw).logits)
    finally:
        for h in hooks:
            h.remove()
    captured = [a for s in NODES for a in corrupted[s]]
    grads = iter(torch.autograd.grad(value.sum(), captured))
    out = {"metric": torch.stack([clean_metric, value.detach()], 1)}
    for s in NODES:
        scores = []
        for c, a in zip(clean[s], corrupted[s]):
            product = next(grads) * (c - a)  # [batch, pos, width]
            if s == "head":
                scores.append(product.unflatten(-1, (n_heads, -1)).sum((1, 3)))  # [batch, head]
            else:
                scores.append(product.sum(-1) if s == "resid" else product.sum((1, 2)))
        out[s] = torch.stack(scores, 1)
    return out


# ----------------------------------------------------------------------------- TransformerLens


def hooked_copy(hf):
    """A HookedTransformer with ``hf``'s weights, computing the same function (no folding)."""
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, default_prepend_bos=False,
    )
    hooked = tl.HookedTransformer(cfg)
    hooked.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.eval().requires_grad_(False)


TL_SITES = {"resid": "hook_resid_pre", "head": "attn.hook_z", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


def tl_atp(hooked, clean_ids, corrupted_ids, answer, distractor) -> dict:
    """The Attribution_Patching_Demo recipe, clean run without gradients."""
    names = {f"blocks.{i}.{h}" for i in range(hooked.cfg.n_layers) for h in TL_SITES.values()}
    rows = torch.arange(len(clean_ids))
    metric = lambda logits: logits[rows, -1, answer] - logits[rows, -1, distractor]  # noqa: E731
    with torch.no_grad():
        clean_logits, clean_cache = hooked.run_with_cache(clean_ids, names_filter=lambda n: n in names)
    acts, grads = {}, {}

    def keep(act, hook):
        acts[hook.name] = act.detach()

    def keep_grad(grad, hook):
        grads[hook.name] = grad.detach()

    hooked.reset_hooks()
    for name in names:
        hooked.add_hook(name, keep, "fwd")
        hooked.add_hook(name, keep_grad, "bwd")
    hooked.add_hook("hook_embed", lambda act, hook: act.requires_grad_(True), "fwd")
    try:
        value = metric(hooked(corrupted_ids))
        value.sum().backward()
    finally:
        hooked.reset_hooks()
    out = {"metric": torch.stack([metric(clean_logits), value.detach()], 1)}
    for site, hook in TL_SITES.items():
        scores = []
        for i in range(hooked.cfg.n_layers):
            name = f"blocks.{i}.{hook}"
            product = grads[name] * (clean_cache[name] - acts[name])
            scores.append(product.sum((1, 3)) if site == "head" else
                          product.sum(-1) if site == "resid" else product.sum((1, 2)))
        out[site] = torch.stack(scores, 1)
    return out


def tl_exact_heads(hooked, clean_ids, corrupted_ids, answer, distractor) -> torch.Tensor:
    """Every head patched from the clean run, all positions: ``[layer, head]`` of the mean metric."""
    from transformer_lens import patching

    rows = torch.arange(len(clean_ids))
    with torch.no_grad():
        _, clean_cache = hooked.run_with_cache(clean_ids, names_filter=lambda n: n.endswith("hook_z"))
        return patching.get_act_patch_attn_head_out_all_pos(
            hooked, corrupted_ids, clean_cache,
            lambda logits: (logits[rows, -1, answer] - logits[rows, -1, distractor]).mean())


# ----------------------------------------------------------------------------- timing


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(repeat: int, fns: dict) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of ``repeat`` interleaved rounds (a shared machine's load hits all
    alike), after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {clock: {name: statistics.median(t[c] for t in ts) for name, ts in times.items()}
            for c, clock in enumerate(("wall", "cpu"))}


def summary(t: dict, unit: str, ratios: list[tuple[str, str]]) -> dict:
    """Seconds, multiples of ``unit`` and the ``a / b`` ratios, on both clocks."""
    return {clock: {"seconds": {k: round(v, 3) for k, v in c.items()},
                    "forward_equivalents": {k: round(v / c[unit], 2) for k, v in c.items()},
                    **{f"{a} / {b}": round(c[a] / c[b], 3) for a, b in ratios if a in c and b in c}}
            for clock, c in t.items()}


def check(name, got: dict, want: dict, tol: float = 1e-3) -> None:
    for site in NODES:
        torch.testing.assert_close(got[site].float(), want[site].float(), atol=tol, rtol=tol, msg=f"{name}: {site}")


def atp_case(hf, model, hooked, batch: int, tokens: int, repeat: int) -> dict:
    _, clean, corrupted, answer, distractor, clean_ids, corrupted_ids, a, d = workload(batch, tokens)

    def ours():
        r = attribution_patching.run(model, clean, corrupted, answer, distractor, nodes=NODES)
        return {"metric": None, **{s: r[s].values for s in NODES}}

    def forward():  # one plain forward of the clean and corrupted rows: the unit
        with torch.no_grad():
            hf(torch.cat([clean_ids, corrupted_ids]))

    fns = {
        "forward": forward,
        "nnattr": ours,
        "floor": lambda: floor_atp(hf, clean_ids, corrupted_ids, a, d),
        "floor_last": lambda: floor_atp(hf, clean_ids, corrupted_ids, a, d, last_only=True),
    }
    if hooked is not None:
        fns["tl"] = lambda: tl_atp(hooked, clean_ids, corrupted_ids, a, d)
    reference = ours()
    for name in ("floor", "floor_last", "tl"):
        if name in fns:
            check(name, fns[name](), reference)
    t = medians(repeat, fns)
    return {"batch": batch, "tokens": tokens, "repeat": repeat,
            **summary(t, "forward", [("nnattr", "floor"), ("nnattr", "floor_last"), ("nnattr", "tl")])}


def exact_case(hf, model, hooked, batch: int, tokens: int, repeat: int) -> dict:
    _, clean, corrupted, answer, distractor, clean_ids, corrupted_ids, a, d = workload(batch, tokens)
    L, H = hf.config.n_layer, hf.config.n_head

    def ours():
        return activation_patching.run(model, clean, corrupted, answer, distractor, nodes=("head",), rows=batch * H)

    def forward():  # one plain forward of the corrupted rows: the unit of the bound
        with torch.no_grad():
            hf(corrupted_ids)

    fns = {"forward": forward, "nnattr": ours}
    if hooked is not None:
        fns["tl"] = lambda: tl_exact_heads(hooked, clean_ids, corrupted_ids, a, d)
        r = ours()["head"]  # TL reports the patched metric (batch mean); recover it from nnattr's recovery
        clean_m, corrupted_m = (torch.tensor(r.per_prompt[k]) for k in ("clean_metric", "corrupted_metric"))
        patched = (r.values * (clean_m - corrupted_m)[:, None, None] + corrupted_m[:, None, None]).mean(0)
        torch.testing.assert_close(fns["tl"]().float(), patched, atol=1e-3, rtol=1e-3)
    t = medians(repeat, fns)
    bound = sum(H * (L - layer) / L for layer in range(L)) + 2  # batch forwards: restarted rows, clean, corrupted
    return {"batch": batch, "tokens": tokens, "repeat": repeat, "bound (forward equivalents)": bound,
            **summary(t, "forward", [("nnattr", "tl")])}


# ----------------------------------------------------------------------------- scaling


def one(method: str, batch: int, tokens: int) -> dict:
    """One run in this (fresh) process: wall time and peak resident memory above the loaded model."""
    hf = gpt2_small()
    model = nnattr.load(hf, tiny.tokenizer())
    _, clean, corrupted, answer, distractor, clean_ids, corrupted_ids, a, d = workload(batch, tokens)
    run = {
        "nnattr_atp": lambda: attribution_patching.run(model, clean, corrupted, answer, distractor, nodes=NODES),
        "floor_atp": lambda: floor_atp(hf, clean_ids, corrupted_ids, a, d),
        "floor_last_atp": lambda: floor_atp(hf, clean_ids, corrupted_ids, a, d, last_only=True),
        "nnattr_exact": lambda: activation_patching.run(model, clean, corrupted, answer, distractor,
                                                        nodes=("attn",), rows=batch * 12),
    }[method]
    before = resident("VmRSS", reset_peak=True)
    seconds, _ = timed(run)
    return {"seconds": round(seconds, 2), "peak_mib": round((resident("VmHWM") - before) / 1024, 1)}


def resident(field: str, reset_peak: bool = False) -> int:
    """KiB of this process's resident memory now (``VmRSS``) or at its peak (``VmHWM``); Linux resets
    the peak when ``5`` is written to ``/proc/self/clear_refs``."""
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def scaling(args) -> list[dict]:
    """Each method in a fresh process per cell: B = 8 across ``--lengths``, T = 128 across ``--batches``
    (a cross through the grid: its far corner, B=32 x T=512, takes too long on 2 CPU cores)."""
    rows = []
    cells = [(8, t) for t in args.lengths] + [(b, 128) for b in args.batches if b != 8]
    for batch, tokens in cells:
        row = {"batch": batch, "tokens": tokens}
        for method in ("nnattr_atp", "floor_atp", "floor_last_atp") + (() if args.skip_exact else ("nnattr_exact",)):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(batch), str(tokens),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row[method] = json.loads(out.stdout.strip().splitlines()[-1])
        for floor in ("floor_atp", "floor_last_atp"):
            row[f"atp / {floor}"] = {k: round(row["nnattr_atp"][k] / row[floor][k], 3) for k in ("seconds", "peak_mib")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--exact-tokens", type=int, default=16, help="exact patching: 144 heads x batch rows")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--exact-repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default trimming")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.system_malloc and os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        # glibc returns freed memory to the system and faults it back in on the next pass, by
        # heuristics that depend on what ran before: up to 25% run-to-run swings in either
        # contender. Keep freed memory in the process (one configuration for every contender).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
             "transformer_lens": None, "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_")}
    if tl is not None:
        import importlib.metadata

        setup["transformer_lens"] = importlib.metadata.version("transformer_lens")
    print(json.dumps({"setup": setup}), flush=True)
    if args.scaling:
        return scaling(args)
    hf = gpt2_small()
    model = nnattr.load(hf, tiny.tokenizer())
    hooked = hooked_copy(hf) if tl is not None else None
    for tokens in args.tokens:
        print(json.dumps({"atp": atp_case(hf, model, hooked, args.batch, tokens, args.repeat)}), flush=True)
    if not args.skip_exact:
        print(json.dumps({"exact_heads": exact_case(hf, model, hooked, args.batch, args.exact_tokens,
                                                    args.exact_repeat)}), flush=True)


if __name__ == "__main__":
    main()
