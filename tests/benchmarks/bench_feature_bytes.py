"""Bytes on the wire of feature attribution through the loopback NDIF server: one SAE per layer.

Model: the random Llama configuration of ``bench_remote_bytes.py`` (32 layers, 128-token prompt),
with d_model 64 so that 32 SAEs of 16 x d_model = 1024 ReLU features fit a CPU; each SAE reads
``resid_pre`` of its layer. Measured: the request (it carries the SAE weights: 32 x 2 x d_model x
d_sae floats) and the result (zstd-compressed, as they crossed the wire) of feature DLA and
feature patching at ``top_k`` (default 100 per SAE and prompt), against the naive remote recipe
that saves every layer's site activation and encodes locally.

    PYTHONPATH=. python tests/benchmarks/bench_feature_bytes.py
    PYTHONPATH=. python tests/benchmarks/bench_feature_bytes.py --layers 4 --pos 32   # quick
"""

from __future__ import annotations

import argparse
import time

import nnsight
import torch

from nnattr.features import SAE
from nnattr.recipes import feature_attribution, feature_patching
from tests.benchmarks.bench_remote_bytes import REPO, build, size
from tests.support.ndif_loopback import OLD_SERVER_IMPORT_WHITELIST, LoopbackNDIF, client_config, offline_repo_ids


def naive(model, prompts):
    with model.trace(prompts, remote=True):
        saved = nnsight.save([layer.input for layer in model.layers])  # [batch, pos, d_model] per layer
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    setup = argparse.Namespace(layers=args.layers, heads=4, kv_heads=2, d_model=args.d_model, vocab=32000,
                               pos=args.pos, prompts=1)
    model, server, prompts = build(setup)
    d_sae, g = args.expansion * args.d_model, torch.Generator().manual_seed(0)
    saes = [SAE(W_enc=torch.randn(args.d_model, d_sae, generator=g) / args.d_model ** 0.5,
                b_enc=torch.zeros(d_sae), W_dec=torch.randn(d_sae, args.d_model, generator=g) / d_sae ** 0.5,
                b_dec=torch.zeros(args.d_model), layer=i) for i in range(args.layers)]
    corrupted = [" ".join(prompts[0].split()[:-1] + ["w7"])]
    cases = {
        "feature_attribution (DLA)": lambda: feature_attribution.run(model, prompts, sae=saes, top_k=args.top_k,
                                                                     remote=True),
        "feature_patching (summed over positions)": lambda: feature_patching.run(
            model, prompts, corrupted, metric=lambda logits: logits[:, -1, 5] - logits[:, -1, 9], sae=saes,
            top_k=args.top_k, remote=True),
        "feature_patching per_position": lambda: feature_patching.run(
            model, prompts, corrupted, metric=lambda logits: logits[:, -1, 5] - logits[:, -1, 9], sae=saes,
            top_k=args.top_k, per_position=True, remote=True),
    }
    print(f"Llama config: {args.layers} layers, d_model {args.d_model}, 1 prompt x {args.pos} tokens; one SAE per "
          f"layer at resid_pre, {d_sae} features each; top_k={args.top_k}; zstd-compressed bytes on the wire\n")
    print("| recipe | request | result | naive result (every site activation) | time |")
    print("|---|---:|---:|---:|---:|")
    key = "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"
    loopback = LoopbackNDIF({REPO: server}, import_whitelist=OLD_SERVER_IMPORT_WHITELIST, execution_timeout=600,
                            session_timeout=900)
    with loopback as ndif, offline_repo_ids(REPO), client_config(ndif.host, key, repo_ids=[REPO]):
        naive(model, prompts)
        theirs = ndif.last.result_size
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            ours = ndif.last
            print(f"| {name} | {size(ours.request_size)} | {size(ours.result_size)} | {size(theirs)} | "
                  f"{seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
