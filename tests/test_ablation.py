"""Ablation (zero, mean, resample) of node sets against forward hooks on the Hugging Face modules.

The reference (``hooks_ablated``) runs each prompt alone, unpadded, with a plain ``model(...)`` call: forward
(pre-)hooks on the native modules (``tests/support/reference.py``'s ``NATIVE``) replace a head's slice of the output
projection's input, an attention or MLP write (OPT's fc2 output flattened to ``[pos, d]``) or an embedding by 0,
by a mean of the same activation recorded on the reference prompts (each alone, unpadded: per position from the
end, or over all their tokens), or by the drawn reference prompt's own activation. No nnsight, no nnattr kernels.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.testing import assert_close

import nnattr
from nnattr import circuits
from nnattr.arch import arch_of
from nnattr.kernels import ablation_nodes
from nnattr.recipes import ablation
from tests.support import reference as R
from tests.support import tiny
from tests.test_patching import build  # the sharpened tiny models (every matrix x10: logits O(1))

try:
    import ndif.services.ray.deployments.modeling.nns  # noqa: F401  (the loopback server's core)
except ImportError:
    ndif = None

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(atol=2e-5, rtol=2e-5)
PROMPTS = tiny.prompts(3, lengths=(5, 7, 4))  # left-padded in one batch
REFERENCE = tiny.prompts(4, seed=5, lengths=(8, 9, 7, 10))  # no shorter than any prompt: aligned at the last token
TARGET, DISTRACTOR = ["w5", "w17", "w42"], ["w9", "w3", "w60"]
FAMILIES = ["gpt2", "llama", "opt", "falcon", "gemma2"]


def sets_for(hf) -> list[list[str]]:
    """Every kind of node, alone and together (GPT-2 and OPT: the position embedding too), and nothing."""
    embeds = ["embed", "pos_embed"] if len(R.native(hf).embeds) == 2 else ["embed"]
    return [["L0H1"], ["L1H3", "L0H0", "L0H2"], ["L0 attn"], ["L1 MLP"], ["L0 MLP", "L1H2"], embeds[-1:],
            ["embed", "L1 attn"], []]


# ----------------------------------------------------------------------------- the reference: hooks, one prompt alone


def _where(hf, name: str):
    """``(module, kind, columns)``: the native module whose output (or, for a head, whose input; for ``L3 resid``,
    the block's hidden-states input) holds the node. A position ``@p`` does not change where."""
    nat, blocks, name = R.native(hf), R.blocks(hf), name.split("@")[0]
    if name in ("embed", "pos_embed"):
        return hf.get_submodule(nat.embeds[name == "pos_embed"]), "out", None
    layer, head, write = re.fullmatch(r"L(\d+)(?:H(\d+)| (attn|MLP|resid))", name).groups()
    block = blocks[int(layer)]
    if write == "resid":
        return block, "block", None
    if head is not None:
        d_head = hf.config.hidden_size // hf.config.num_attention_heads if not hasattr(hf.config, "head_dim") \
            else hf.config.head_dim
        return block.get_submodule(nat.o_proj), "in", slice(int(head) * d_head, (int(head) + 1) * d_head)
    return block.get_submodule(nat.attn_write if write == "attn" else nat.mlp_write), "out", None


def record(hf, text: str, names) -> dict[str, torch.Tensor]:
    """Each node's activation on one prompt alone: ``[pos, width]`` (a head: the whole output projection input)."""
    ids = torch.tensor([tiny.tokenizer()(text)["input_ids"]])
    seen = {}
    handles = []
    for name in names:
        module, where, _ = _where(hf, name)
        if where == "block":
            handles.append(module.register_forward_pre_hook(lambda m, a, kw, name=name: seen.__setitem__(
                name, (a[0] if a else kw["hidden_states"])[0].clone()), with_kwargs=True))
        elif where == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0][0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(
                name, R._tensor(out).reshape(-1, R._tensor(out).shape[-1]).clone())))
    try:
        with torch.no_grad():
            R.forward(hf, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def hooks_ablated(hf, text: str, names, values, target: str, distractor: str) -> float:
    """The logit difference of one prompt alone with ``names`` replaced by ``values[name]`` (``[pos, width]``,
    broadcast; None: 0)."""
    tok = tiny.tokenizer()
    ids = torch.tensor([tok(text)["input_ids"]])
    handles = []

    def replaced(x, name):  # x: [pos, width]; a fresh tensor (Falcon adds attention into its MLP write in place)
        v = torch.zeros(()) if values is None else values[name]
        new = v.expand(x.shape).to(x.dtype).clone()
        if "@" in name:  # one position only
            keep, at = x.clone(), int(name.split("@")[1])
            keep[at] = new[at]
            return keep
        return new

    for name in names:
        module, where, cols = _where(hf, name)
        if where == "block":
            def block_pre(m, a, kw, name=name):
                x = a[0] if a else kw["hidden_states"]
                new = replaced(x[0], name)[None]
                return ((new, *a[1:]), kw) if a else (a, {**kw, "hidden_states": new})
            handles.append(module.register_forward_pre_hook(block_pre, with_kwargs=True))
        elif where == "in":
            def pre(m, a, name=name, cols=cols):
                z = a[0].clone()
                z[..., cols] = replaced(z[0], name)[..., cols]
                return (z, *a[1:])
            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(m, a, out, name=name):  # one prompt: [1, pos, d], or OPT's fc2 [pos, d]
                x = R._tensor(out)
                new = replaced(x.reshape(-1, x.shape[-1]), name).reshape(x.shape)
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = R.forward(hf, ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits[tok.convert_tokens_to_ids(target)] - logits[tok.convert_tokens_to_ids(distractor)])


def hooks_means(hf, names, *, per_position: bool, length: int) -> dict[str, torch.Tensor]:
    """Each node's mean over REFERENCE, each prompt alone: over its last ``length`` positions, or all its tokens."""
    acts = [record(hf, text, names) for text in REFERENCE]
    if per_position:
        return {name: torch.stack([a[name][-length:] for a in acts]).mean(0) for name in names}
    return {name: torch.cat([a[name] for a in acts]).mean(0) for name in names}


# ----------------------------------------------------------------------------- the recipe against the hooks


@pytest.mark.parametrize("arch", FAMILIES)
def test_zero_mean_and_resample_equal_the_hooks_reference(sharp_zoo, arch):
    hf, model = sharp_zoo(arch)
    sets = sets_for(hf)
    names = sorted({name for s in sets for name in s})
    lengths = [len(p.split()) for p in PROMPTS]
    zero = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, rows=7)  # several forwards, padded
    clean = [hooks_ablated(hf, p, [], None, t, d) for p, t, d in zip(PROMPTS, TARGET, DISTRACTOR)]
    assert zero.per_prompt["clean_metric"] == pytest.approx(clean, abs=2e-5)
    want = [[hooks_ablated(hf, p, s, None, t, d) for s in sets] for p, t, d in zip(PROMPTS, TARGET, DISTRACTOR)]
    assert_close(zero.values, torch.tensor(want), **TOL)
    assert zero.values[:, -1].tolist() == pytest.approx(clean, abs=2e-5)  # nothing ablated: the clean metric
    assert (zero.values[:, :-1] - zero.values[:, -1:]).abs().min() > 1e-3  # every set moves the metric

    for per_position in (True, False):
        mean = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, ablation="mean", reference=REFERENCE,
                            per_position=per_position)
        means = {n: hooks_means(hf, names, per_position=per_position, length=n) for n in set(lengths)}
        want = [[hooks_ablated(hf, p, s, means[n], t, d) for s in sets]
                for p, n, t, d in zip(PROMPTS, lengths, TARGET, DISTRACTOR)]
        assert_close(mean.values, torch.tensor(want), **TOL)

    resample = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, ablation="resample",
                            reference=REFERENCE, seed=3, rows=5)
    acts = [record(hf, text, names) for text in REFERENCE]
    drawn = resample.per_prompt["drawn"]  # [prompt][set]: the reference prompt each row took its values from
    want = [[hooks_ablated(hf, p, s, {k: v[-n:] for k, v in acts[drawn[i][j]].items()}, t, d)
             for j, s in enumerate(sets)] for i, (p, n, t, d) in enumerate(zip(PROMPTS, lengths, TARGET, DISTRACTOR))]
    assert_close(resample.values, torch.tensor(want), **TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_streams_and_single_positions_equal_the_hooks_reference(sharp_zoo, arch):
    """``L1 resid`` replaces the stream entering layer 1; ``@p`` one position (from the end, or each prompt's
    start), in a left-padded batch of prompts of three lengths."""
    hf, model = sharp_zoo(arch)
    sets = [["L0 resid"], ["L1 resid@-2"], ["L0H1@-1", "L1 MLP@0"], ["embed@1", "L1H0@-3"], ["L1 resid@-2"]]
    names = sorted({name for s in sets for name in s})
    lengths = [len(p.split()) for p in PROMPTS]
    zero = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, rows=4)
    want = [[hooks_ablated(hf, p, s, None, t, d) for s in sets] for p, t, d in zip(PROMPTS, TARGET, DISTRACTOR)]
    assert_close(zero.values, torch.tensor(want), **TOL)
    sets = [["L0 resid"], ["L1 resid@-2"], ["L0H1@-1", "L1 MLP@-4"], ["embed@-2", "L1H0@-3"]]  # aligned at the end
    names = sorted({name for s in sets for name in s})
    mean = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, ablation="mean", reference=REFERENCE)
    means = {n: hooks_means(hf, names, per_position=True, length=n) for n in set(lengths)}
    want = [[hooks_ablated(hf, p, s, means[n], t, d) for s in sets]
            for p, n, t, d in zip(PROMPTS, lengths, TARGET, DISTRACTOR)]
    assert_close(mean.values, torch.tensor(want), **TOL)
    assert (zero.values[:, 0] - torch.tensor(zero.per_prompt["clean_metric"])).abs().min() > 1e-3
    with pytest.raises(ValueError, match="position 4 is outside a prompt of 4 tokens"):
        ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=[["L0H1@4"]])
    with pytest.raises(ValueError, match="unknown node name 'L0H1@x'"):
        ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=[["L0H1@x"]])
    for kwargs in (dict(ablation="mean"), dict(ablation="resample")):  # values aligned at the end: @0 is ambiguous
        with pytest.raises(ValueError, match="counted from the start"):
            ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=[["L0H1@0"]], reference=REFERENCE, **kwargs)
    one_length = ablation.run(model, PROMPTS[:1] * 2, TARGET[:1] * 2, DISTRACTOR[:1] * 2, node_sets=[["L0H1@0"]],
                              ablation="mean", reference=[PROMPTS[0], PROMPTS[0]])  # the prompt itself: no change
    assert_close(one_length.values[:, 0], torch.tensor(one_length.per_prompt["clean_metric"]), **TOL)


def test_padded_batch_equals_one_prompt_at_a_time_and_draws_are_seeded(sharp_zoo):
    _, model = sharp_zoo("gpt2")
    sets = [["L0H1", "L1 MLP"], ["pos_embed"], ["L1 attn"]]
    for kwargs in (dict(ablation="zero"), dict(ablation="mean", reference=REFERENCE),
                   dict(ablation="resample", reference=REFERENCE, seed=7)):
        batched = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, **kwargs)
        alone = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, batch_size=1, rows=1, **kwargs)
        assert_close(batched.values, alone.values, **TOL)
    again = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, ablation="resample",
                         reference=REFERENCE, seed=7)
    assert again.per_prompt["drawn"] == batched.per_prompt["drawn"]
    assert_close(again.values, batched.values, atol=0, rtol=0)  # the same seed: the same draws, the same numbers
    other = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, ablation="resample",
                         reference=REFERENCE, seed=8)
    assert other.per_prompt["drawn"] != batched.per_prompt["drawn"]


def test_mean_over_the_prompt_itself_per_position_changes_nothing(sharp_zoo):
    _, model = sharp_zoo("llama")
    one = PROMPTS[1]
    every = [list(ablation_nodes(2, 4, ("embed",)))]  # every node at once
    out = ablation.run(model, one, "w5", "w9", node_sets=every + [["L0H1"], ["L1 MLP"]], ablation="mean",
                       reference=[one])
    assert_close(out.values[0], torch.tensor(out.per_prompt["clean_metric"] * 3), **TOL)
    assert out.dims == ("prompt", "set") and out.labels["set"][1:] == ["L0H1", "L1 MLP"]


def test_node_names_are_the_circuit_writers_and_bad_input_is_refused(sharp_zoo):
    hf, model = sharp_zoo("gpt2")
    a = arch_of(model)
    nodes = ablation_nodes(a.n_layers, a.n_heads, a.embeddings)
    assert set(circuits.writers(a)) <= set(nodes)
    assert set(nodes) - set(circuits.writers(a)) == {"L0 attn", "L1 attn", "L0 resid", "L1 resid"}
    default = ablation.run(model, PROMPTS[0], "w5", "w9")  # every writer alone
    assert default.labels["set"] == circuits.writers(a)
    one = ablation.run(model, PROMPTS[0], "w5", "w9", node_sets=["L0H1", "L1 MLP"])  # one set
    text = ablation.run(model, PROMPTS[0], "w5", "w9", node_sets="L0H1, L1 MLP; L0H2")
    assert one.labels["set"] == ["L0H1 + L1 MLP"] and text.labels["set"] == ["L0H1 + L1 MLP", "L0H2"]
    assert_close(one.values[0, 0], text.values[0, 0], **TOL)  # other rows in the batch: rounding only
    with pytest.raises(ValueError, match=r"unknown node name 'L9H0'; valid names: embed, pos_embed, L0 resid, L0H0"):
        ablation.run(model, PROMPTS[0], node_sets=[["L9H0"]])
    with pytest.raises(ValueError, match="aligns positions at the last token.*or per_position=False"):
        ablation.run(model, PROMPTS, node_sets=["L0H1"], ablation="mean", reference=["w1 w2"])
    with pytest.raises(ValueError, match="resample ablation aligns"):
        ablation.run(model, PROMPTS, node_sets=["L0H1"], ablation="resample", reference=["w1 w2"])
    with pytest.raises(ValueError, match="takes no reference"):
        ablation.run(model, PROMPTS, node_sets=["L0H1"], reference=PROMPTS)
    with pytest.raises(ValueError, match="rows=0"):
        ablation.run(model, PROMPTS, node_sets=["L0H1"], rows=0)
    short = ablation.run(model, PROMPTS, TARGET, DISTRACTOR, node_sets=["L0H1"], ablation="mean",
                         reference=["w1 w2"], per_position=False)  # over all positions: any lengths
    assert short.values.isfinite().all()


def test_custom_metric(sharp_zoo):
    _, model = sharp_zoo("gpt2")
    t, d = [tiny.tokenizer().convert_tokens_to_ids(w) for w in ("w5", "w9")]
    custom = ablation.run(model, PROMPTS, node_sets=[["L0H1"], []],
                          metric=lambda logits: logits[:, -1, t] - logits[:, -1, d])
    plain = ablation.run(model, PROMPTS, "w5", "w9", node_sets=[["L0H1"], []])
    assert_close(custom.values, plain.values, **TOL) and custom.metric == "custom metric"


# ----------------------------------------------------------------------------- the embedded model


def test_mean_ablation_on_tiny_ioi_matches_the_embedded_model_docs():
    """docs/embedded_model.md: mean-ablating a head (its slice of the input of attn.c_proj replaced by its mean over
    every real position of the task's prompts) drops the IO - S logit difference of 128 held-out prompts by the
    amounts `evaluate.head_scores` stored in training.json (L0H0 17.0, L0H2 16.0, L2H0 0.0)."""
    import json
    from pathlib import Path

    from nnattr.embedded import tasks

    model = nnattr.load("tiny-ioi")
    stored = json.loads((Path(nnattr.__file__).parent / "embedded" / "tiny-ioi" / "training.json").read_text())
    items = tasks.ioi_prompts(128, seed=0, split="test")
    out = ablation.run(model, [p["prompt"] for p in items], [p["answer"] for p in items],
                       [p["distractor"] for p in items], node_sets=[["L0H0"], ["L0H2"], ["L2H0"]], ablation="mean",
                       per_position=False)  # reference: the prompts themselves
    drop = torch.tensor(out.per_prompt["clean_metric"]).mean() - out.values.mean(0)
    want = torch.tensor(stored["head_scores"]["ioi_ablation"])[[0, 0, 2], [0, 2, 0]]
    assert_close(drop, want, atol=1e-3, rtol=0)
    assert drop[0] > 15 and drop[1] > 15 and abs(drop[2]) < 0.1


# ----------------------------------------------------------------------------- remote (loopback NDIF)

REPO, KEY = "nnattr-test/tiny-llama-ablation", "0b7e3c2a-41f6-4c1d-9a8e-5d2f6b1c3e7a"
needs_ndif = pytest.mark.skipif(ndif is None, reason="needs the ndif server core (see .ci/run)")

if ndif is not None:
    from tests.support.fixtures import offline_server

    REMOTE_CLIENT, server = offline_server(build("llama"), "llama", REPO, KEY)  # frozen, sdpa, no aliases


@needs_ndif
@pytest.mark.parametrize("kwargs", [dict(ablation="zero", rows=4), dict(ablation="mean", reference=REFERENCE),
                                    dict(ablation="resample", reference=REFERENCE, seed=1)],
                         ids=["zero", "mean", "resample"])
def test_remote_equals_local_in_one_request(server, kwargs):
    sets = [["L0H1"], ["L1H3", "L0 MLP"], ["L0 attn", "embed"], ["L1 resid@-2", "L0H0@-3"], []]
    local = ablation.run(REMOTE_CLIENT, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, **kwargs)
    before = len(server.requests)
    far = ablation.run(REMOTE_CLIENT, PROMPTS, TARGET, DISTRACTOR, node_sets=sets, remote=True, **kwargs)
    assert len(server.requests) == before + 1 and server.last.status == "COMPLETED"
    assert server.last.result_size < 5_000  # metrics only, never activations
    assert_close(far.values, local.values, atol=1e-5, rtol=1e-5)
    assert far.per_prompt["clean_metric"] == pytest.approx(local.per_prompt["clean_metric"], abs=1e-5)


def test_resample_never_draws_a_rows_own_prompt_and_one_prompt_alone_is_refused():
    from nnattr.kernels import resample_draws

    draws = resample_draws(3, 3, 50, ablation="resample", seed=0, own=True)
    assert not (draws == torch.arange(3)[:, None]).any() and set(draws.flatten().tolist()) == {0, 1, 2}
    other = resample_draws(3, 2, 50, ablation="resample", seed=0, own=False)  # another reference: any prompt
    assert set(other.flatten().tolist()) == {0, 1, 2}
    for kind in ("mean", "resample"):
        with pytest.raises(ValueError, match="needs at least 2 prompts"):
            resample_draws(1, 1, 2, ablation=kind, seed=0, own=True)
