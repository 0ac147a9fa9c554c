"""Wall time of each recipe against the plain-PyTorch hooks reference of the same computation.

A GPT-2-small-sized random model (12 layers, 12 heads, d_model 768, vocab 50257, float32) on
a batch of 8 prompts of 64 tokens (a word-level tokenizer over the whole vocabulary, so no
Hub access). For each case the recipe (nnsight trace + kernels) and the reference from
``tests/support/reference.py`` (forward hooks on the native modules) run in the same process,
interleaved (ABBA), after one untimed warm-up each; the table gives the median of the repeats
and the ratio recipe / reference, and checks once that both compute the same numbers.

    PYTHONPATH=. python tests/benchmarks/bench_recipes.py                  # the full setting
    PYTHONPATH=. python tests/benchmarks/bench_recipes.py --layers 2 --vocab 2000 --repeats 3   # quick
    PYTHONPATH=. python tests/benchmarks/bench_recipes.py --cases logit_lens_all --repeats 3

CPU by default with one torch thread (``--threads``): on a shared machine more threads made the
plain forward slower, not faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CASES = ("dla_component", "dla_head", "logit_lens", "logit_lens_all", "head_attribution", "attention_rollout")
DEFAULT = ("dla_component", "dla_head", "logit_lens", "head_attribution", "attention_rollout")


def build(layers: int, vocab: int, seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=768, vocab_size=vocab, n_positions=1024,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t0", padding_side="left")
    return hf, tok


def cases(hf, model, prompts, input_ids, target: int):
    """``{name: (recipe_call, reference_call, compare)}``; compare gives the max abs difference."""
    from nnattr.recipes import attention_rollout, direct_logit_attribution, head_attribution, logit_lens
    from tests.support import reference as ref

    batch = input_ids.shape[0]
    t = torch.full((batch,), target)
    expected_all = torch.cat([input_ids[:, 1:], t[:, None]], dim=1)  # [batch, pos]

    def diff(a, b):
        return (a.double() - b.double()).abs().max().item()

    return {
        "dla_component": (
            lambda: direct_logit_attribution.run(model, prompts, target),
            lambda: ref.dla_components(hf, input_ids, target),
            lambda r, e: diff(r.values, e[0]),
        ),
        "dla_head": (
            lambda: direct_logit_attribution.run(model, prompts, target, by="head"),
            lambda: ref.dla_heads(hf, input_ids, target),
            lambda r, e: diff(r.values, e),
        ),
        "logit_lens": (
            lambda: logit_lens.run(model, prompts, target, positions="last"),
            lambda: ref.logit_lens(hf, input_ids, t[:, None]),
            lambda r, e: diff(r.values, e[0].transpose(0, 1)[..., 0]),  # [prompt, layer]
        ),
        "logit_lens_all": (
            lambda: logit_lens.run(model, prompts, target, positions="all"),
            lambda: ref.logit_lens(hf, input_ids, expected_all),
            lambda r, e: diff(r.values, e[0].transpose(0, 1)),
        ),
        "head_attribution": (
            lambda: head_attribution.run(model, prompts, target),
            lambda: ref.head_attribution(hf, input_ids, target),
            lambda r, e: diff(r.values, e.sum(-1)),
        ),
        "attention_rollout": (
            lambda: attention_rollout.run(model, prompts),
            lambda: ref.rollout(hf, input_ids),
            lambda r, e: diff(r.values, e),
        ),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU, 2 threads ran GPT-2 small's forward ~2x slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nnattr

    hf, tok = build(args.layers, args.vocab)
    model = nnattr.load(hf, tok)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.pos), generator=g)  # [batch, pos], no padding
    prompts = [" ".join(f"t{i}" for i in row.tolist()) for row in input_ids]
    assert torch.equal(tok(prompts, return_tensors="pt")["input_ids"], input_ids)
    target = 7
    table = cases(hf, model, prompts, input_ids, target)

    n_params = sum(p.numel() for p in hf.parameters())
    print(f"GPT-2 {args.layers} layers x 12 heads, d_model 768, vocab {args.vocab} ({n_params / 1e6:.0f}M params), "
          f"batch {args.batch} x {args.pos} tokens, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'case':<20}{'recipe s':>10}{'hooks s':>10}{'ratio':>8}{'max |diff|':>12}")
    for name in args.cases:
        recipe, reference, compare = table[name]
        try:
            agreement = compare(recipe(), reference())  # doubles as the warm-up
        except Exception as error:  # noqa: BLE001 - a broken case is a row of the table, not the end of it
            print(f"{name:<20}FAILED: {type(error).__name__}: {str(error).splitlines()[0][:100]}", flush=True)
            continue
        times = {"recipe": [], "hooks": []}
        for r in range(args.repeats):
            order = (("recipe", recipe), ("hooks", reference))
            for label, fn in order if r % 2 == 0 else order[::-1]:
                times[label].append(timed(fn))
        a, b = statistics.median(times["recipe"]), statistics.median(times["hooks"])
        print(f"{name:<20}{a:>10.3f}{b:>10.3f}{a / b:>8.2f}{agreement:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
