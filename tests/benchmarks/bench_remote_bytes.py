"""Bytes on the wire per recipe through the loopback NDIF server, against naive remote recipes.

Every recipe runs through nnsight's real client against `tests/support/ndif_loopback.py` (NDIF's
own execution core, a separate frozen float32 model, the older server's import whitelist on), and
the request blob and result blob are measured exactly as they crossed the wire (zstd-compressed,
nnsight's default). The naive recipe of each method saves the activations the method needs, whole,
and would compute locally: residual writes for DLA, the attention output projection's input (and
its gradient) for head-level methods, every layer's residual for the logit lens, every layer's
attention pattern (and values) for rollout.

Model: a random Llama configuration with 32 layers and 32 heads (8 kv heads), built small enough
for a CPU: d_model 256 (d_head 8), MLP 512, vocab 32000, float32; one prompt of 128 tokens
(``--prompts`` for more) from a word-level tokenizer over the whole vocabulary (no Hub access).

    PYTHONPATH=. python tests/benchmarks/bench_remote_bytes.py
    PYTHONPATH=. python tests/benchmarks/bench_remote_bytes.py --layers 4 --heads 8 --kv-heads 2 --pos 32   # quick
"""

from __future__ import annotations

import argparse
import copy
import time

import nnsight
import torch

import nnattr
from nnattr.kernels import first
from nnattr.recipes import attention_rollout, attention_views, direct_logit_attribution, head_attribution, logit_lens
from nnattr.recipes import attention_summary
from tests.support.ndif_loopback import OLD_SERVER_IMPORT_WHITELIST, LoopbackNDIF, client_config, offline_repo_ids

REPO = "nnattr-bench/llama-32x32"
KB = 1024


def build(args):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>"] + [f"w{i}" for i in range(args.vocab - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", padding_side="left")
    config = LlamaConfig(num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, hidden_size=args.d_model,
                         intermediate_size=2 * args.d_model, vocab_size=args.vocab,
                         max_position_embeddings=max(256, args.pos), pad_token_id=0, bos_token_id=2,
                         eos_token_id=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.name_or_path = REPO
    state = copy.deepcopy(hf.state_dict())

    def server():
        served = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
        served.load_state_dict(state)
        served.name_or_path = REPO
        return nnsight.TransformersModel(served, tokenizer=tokenizer)

    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(words[i] for i in torch.randint(3, args.vocab, (args.pos - 1,), generator=g))
               for _ in range(args.prompts)]  # + <bos> = pos tokens
    return nnattr.load(hf, tokenizer), server, prompts


# --- naive recipes: save what the method needs, whole; compute locally afterwards ------------------


def naive_dla(model, prompts, by):
    with model.trace(prompts, remote=True):
        saved = [model.embed.output]
        for layer in model.layers:
            if by == "head_position":
                saved.append(layer.attn.v_proj.output)  # [batch, pos, kv_head * d_head]
            if by in ("head", "head_position", "all"):
                saved.append(layer.attn.o_proj.input)  # [batch, pos, head * d_head]
            if by == "head_position":
                saved.append(layer.attn.output[1])  # [batch, head, query, key]
            if by in ("component", "layer", "all"):
                saved.append(first(layer.attn_out.output))  # [batch, pos, d_model]
                saved.append(first(layer.mlp_out.output))
        saved.append(model.ln_f.input)
        saved = nnsight.save(saved)
    return saved


def naive_heads(model, prompts):
    with model.trace(prompts, remote=True):
        model.embed.output.requires_grad_(True)
        z = [layer.attn.o_proj.input for layer in model.layers]
        metric = model.output.logits[:, -1].max(-1).values.sum()
        grads = []
        with metric.backward():
            for act in reversed(z):
                grads.append(act.grad)
        saved = nnsight.save([z, grads])
    return saved


def naive_lens(model, prompts):
    with model.trace(prompts, remote=True):
        states = [model.layers[0].input] + [first(layer.output) for layer in model.layers]
        saved = nnsight.save(states)  # [batch, pos, d_model] each; decode locally with W_U
    return saved


def naive_rollout(model, prompts, view):
    with model.trace(prompts, remote=True):
        saved = []
        for layer in model.layers:
            if view == "value_weighted":
                saved.append(layer.attn.v_proj.output)
            saved.append(layer.attn.output[1])  # [batch, head, query, key]
        saved = nnsight.save(saved)
    return saved


CASES = {
    # name: (recipe call, naive call, scored result)
    **{f"dla by={by}": (lambda m, p, by=by: direct_logit_attribution.run(m, p, by=by, remote=True),
                        lambda m, p, by=by: naive_dla(m, p, by), True)
       for by in ("component", "layer", "head", "head_position", "all")},
    "dla by=all position=-5": (lambda m, p: direct_logit_attribution.run(m, p, by="all", position=-5, remote=True),
                               lambda m, p: naive_dla(m, p, "all"), True),
    **{f"head_attribution by={by}": (lambda m, p, by=by: head_attribution.run(m, p, by=by, remote=True),
                                     naive_heads, True) for by in ("head", "head_position")},
    "logit_lens positions=last": (lambda m, p: logit_lens.run(m, p, positions="last", remote=True), naive_lens, True),
    "logit_lens positions=all": (lambda m, p: logit_lens.run(m, p, positions="all", remote=True), naive_lens, True),
    **{f"attention_rollout view={view}": (lambda m, p, view=view: attention_rollout.run(m, p, view=view, remote=True),
                                          lambda m, p, view=view: naive_rollout(m, p, view), False)
       for view in ("rollout", "value_weighted", "flow")},
    # attention_views: one layer and one head asked for; naive: every layer's patterns (and values).
    **{f"attention_views view={view} (1 layer, 1 head)":
       (lambda m, p, view=view: attention_views.run(m, p, view=view, layers=[-1], heads=[0], remote=True),
        lambda m, p, view=view: naive_rollout(m, p, "value_weighted" if view != "patterns" else view), False)
       for view in ("patterns", "value_weighted", "norm_based")},
    "attention_views view=patterns (1 layer, all heads)":
        (lambda m, p: attention_views.run(m, p, layers=[-1], remote=True), lambda m, p: naive_rollout(m, p, "x"), False),
    # attention_summary: six numbers per layer; naive: every layer's patterns, summarised locally.
    "attention_summary layer_idx=all": (lambda m, p: attention_summary.run(m, p, layer_idx="all", remote=True),
                                        lambda m, p: naive_rollout(m, p, "x"), False),
}


def size(n: int) -> str:
    return f"{n / KB / KB:.1f} MiB" if n >= KB * KB else f"{n / KB:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    nnsight.CONFIG.APP.REMOTE_LOGGING = False

    model, server, prompts = build(args)
    d = nnattr.dims(model)
    print(f"Llama config: {d.n_layers} layers x {d.n_heads} heads ({d.n_kv_heads} kv heads, d_head {d.d_head}), "
          f"d_model {d.d_model}, vocab {d.d_vocab}, float32; {args.prompts} prompt(s) x {args.pos} tokens; "
          f"zstd-compressed bytes as they crossed the wire\n")
    print("| recipe | request | result | naive result | naive / recipe | time |")
    print("|---|---:|---:|---:|---:|---:|")
    key = "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"
    with LoopbackNDIF({REPO: server}, import_whitelist=OLD_SERVER_IMPORT_WHITELIST, execution_timeout=600,
                      session_timeout=900) as ndif, offline_repo_ids(REPO), client_config(ndif.host, key, repo_ids=[REPO]):
        for name in args.cases:
            recipe, naive, scored = CASES[name]
            started = time.perf_counter()
            recipe(model, prompts)
            seconds = time.perf_counter() - started
            ours = ndif.last
            naive(model, prompts)
            theirs = ndif.last
            flag = " (over 64 KiB)" if scored and ours.result_size >= 64 * KB else ""
            print(f"| {name} | {size(ours.request_size)} | {size(ours.result_size)}{flag} | "
                  f"{size(theirs.result_size)} | {theirs.result_size / ours.result_size:,.0f}x | {seconds:.1f} s |",
                  flush=True)
        assert not ndif.internal_errors, ndif.internal_errors


if __name__ == "__main__":
    main()
