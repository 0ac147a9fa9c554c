"""SAE feature attribution: DLA against plain PyTorch hooks, the sum identity, AtP against plain
autograd and against exact single-feature patching, the activations, the SAELens loader, top-k."""

from __future__ import annotations

import json

import pytest
import torch

import nnattr
from nnattr.batch import Batch
from nnattr.cli import main
from nnattr.features import SAE, reconstruction
from nnattr.recipes import attribution_patching, feature_attribution, feature_patching
from tests.support import reference, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["gpt2", "llama", "gemma2"]  # LayerNorm with biases; RMSNorm; RMSNorm (1 + w), post-norms, soft-cap


def random_sae(d_model: int, d_sae: int = 48, *, layer: int, site: str = "resid_pre", activation: str = "relu",
               seed: int = 0, **kwargs) -> SAE:
    g = torch.Generator().manual_seed(seed)
    threshold = torch.rand(d_sae, generator=g) * 0.2 if activation == "jumprelu" else None
    return SAE(W_enc=torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5,
               b_enc=torch.randn(d_sae, generator=g) * 0.1, W_dec=torch.randn(d_sae, d_model, generator=g) * 0.3,
               b_dec=torch.randn(d_model, generator=g) * 0.1, layer=layer, site=site, activation=activation,
               threshold=threshold, **kwargs)


def encode64(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The activation formulas written out, in float64."""
    pre = (x.double() - sae.b_dec.double() * sae.apply_b_dec_to_input) @ sae.W_enc.double() + sae.b_enc.double()
    if sae.activation == "relu":
        return pre.clamp(min=0)
    if sae.activation == "jumprelu":
        return torch.where(pre > sae.threshold.double(), pre, 0.0).clamp(min=0)
    kth = pre.sort(-1, descending=True).values[..., sae.k - 1 : sae.k]
    return torch.where(pre >= kth, pre, 0.0).clamp(min=0)


def site_path(model, sae: SAE) -> tuple[str, bool]:
    """The module whose input (resid_pre) or output (attn_out, mlp_out) is the SAE's site."""
    nat = reference.native(model)
    block = f"{nat.blocks}.{sae.layer}"
    return {"resid_pre": (block, True), "attn_out": (f"{block}.{nat.attn_write}", False),
            "mlp_out": (f"{block}.{nat.mlp_write}", False)}[sae.site]


def reference_dla(model, inputs, sae: SAE, target=None, distractor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``(shares [batch, d_sae + 3], logit [batch])``: each feature, b_dec, error, rest."""
    path, is_input = site_path(model, sae)
    with torch.no_grad(), reference.recording(model, *(({}, {"x": path}) if is_input else ({"x": path}, {}))) as seen:
        r = reference.read_out(model, inputs["input_ids"], inputs["attention_mask"])
        reference.forward(model, inputs["input_ids"], inputs["attention_mask"])
    x = seen["x"][:, -1].double()  # [batch, d_model]
    t, t2 = reference.answers(model, r.logits, target, distractor)
    a = encode64(sae, x)  # [batch, d_sae]
    share = lambda v: reference.frozen_norm_share(model, v, r.resid, t, t2)  # noqa: E731
    feats = share(a.T[..., None] * sae.W_dec.double()[:, None])  # [d_sae, batch]
    x_hat = a @ sae.W_dec.double() + sae.b_dec.double()
    terms = [share(sae.b_dec.double().expand_as(x)), share(x - x_hat),
             share(r.resid - x) + reference.bias_share(model, t, t2)]
    logit = r.logits.gather(-1, t[:, None])[:, 0] - (0 if t2 is None else r.logits.gather(-1, t2[:, None])[:, 0])
    return torch.cat([feats.T, torch.stack(terms, 1)], 1), logit


def block(result, sae: SAE) -> torch.Tensor:
    """``[prompt, d_sae + 3]``: one SAE's features by index, then b_dec, error, rest (top_k=None)."""
    labels = result.labels["component"]
    index = [labels.index(f"{sae.name}/f{f}") for f in range(sae.d_sae)]
    index += [labels.index(f"{sae.name}/{e}") for e in ("b_dec", "error", "rest")]
    return result.values[:, index].double()


@pytest.mark.parametrize("arch", FAMILIES)
def test_feature_dla_matches_plain_pytorch(arch):
    hf = tiny.hf_model(arch)
    model, prompts = nnattr.load(hf, tiny.tokenizer()), tiny.prompts(3)
    saes = [random_sae(32, layer=1, activation="jumprelu", seed=1), random_sae(32, layer=0, site="attn_out", seed=2),
            random_sae(32, layer=1, site="mlp_out", activation="topk", k=6, seed=3)]
    result = feature_attribution.run(model, prompts, "w5", "w9", sae=saes, top_k=None)
    inputs = Batch.of(model, prompts).inputs
    for sae in saes:
        expected, logit = reference_dla(hf, inputs, sae, torch.tensor(Batch.of(model, "w5").ids[0][-1]),
                                        torch.tensor(Batch.of(model, "w9").ids[0][-1]))
        torch.testing.assert_close(block(result, sae), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(expected.sum(-1), logit, atol=1e-5, rtol=0)  # the identity, independently
        other = result.labels["component"].index(f"{sae.name}/other features")
        assert result.values[:, other].abs().max() < 1e-6  # top_k=None: nothing left over
    torch.testing.assert_close(torch.tensor(result.per_prompt["logit"]).double(), logit, atol=1e-5, rtol=0)
    assert result.meta["sum_error"] < 1e-5 and result.dims == ("prompt", "component")


def test_activations_match_their_formulas():
    x = torch.randn(5, 7, 32)
    for activation, extra in (("relu", {}), ("jumprelu", {}), ("topk", {"k": 4})):
        sae = random_sae(32, layer=0, activation=activation, **extra)
        torch.testing.assert_close(sae.encode(x).double(), encode64(sae, x), atol=1e-6, rtol=0)
    topk = random_sae(32, layer=0, activation="topk", k=4).encode(x)
    assert ((topk > 0).sum(-1) <= 4).all()
    with pytest.raises(ValueError, match="topk SAE needs k"):
        random_sae(32, layer=0, activation="topk")
    with pytest.raises(ValueError, match="threshold"):
        SAE(**{**random_sae(32, layer=0).tensors(), "activation": "jumprelu", "layer": 0})


def test_top_k_is_the_full_results_top_k_and_the_rest_sums():
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())
    sae, prompts = random_sae(32, layer=1), tiny.prompts(3)
    full = feature_attribution.run(model, prompts, sae=sae, top_k=None)
    top = feature_attribution.run(model, prompts, sae=sae, top_k=5)
    feats = block(full, sae)[:, : sae.d_sae]
    for i in range(len(prompts)):
        kept = {lab: v for lab, v in zip(top.labels["component"], top.values[i].tolist())
                if "/f" in lab and v == v}
        best = feats[i].abs().topk(5).indices.tolist()
        assert sorted(kept) == sorted(f"{sae.name}/f{f}" for f in best)
        for f in best:
            assert abs(kept[f"{sae.name}/f{f}"] - feats[i, f].item()) < 1e-6
        other = top.values[i, top.labels["component"].index(f"{sae.name}/other features")]
        assert abs(other.item() - (feats[i].sum() - feats[i, best].sum()).item()) < 1e-5
    assert top.meta["sum_error"] < 1e-5
    # batched == one by one
    for i, p in enumerate(prompts):
        one = feature_attribution.run(model, [p], sae=sae, top_k=None)
        torch.testing.assert_close(block(one, sae)[0], block(full, sae)[i], atol=1e-6, rtol=0)


def test_bad_input_is_refused_clearly():
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())
    with pytest.raises(ValueError, match="d_in=64 but the model's d_model is 32"):
        feature_attribution.run(model, "w1 w2", sae=random_sae(64, layer=0))
    with pytest.raises(ValueError, match="layer 2, but the model has 2 layers"):
        feature_attribution.run(model, "w1 w2", sae=random_sae(32, layer=2))
    with pytest.raises(ValueError, match="top_k=0"):
        feature_attribution.run(model, "w1 w2", sae=random_sae(32, layer=0), top_k=0)
    with pytest.raises(ValueError, match="repeat"):
        feature_attribution.run(model, "w1 w2", sae=[random_sae(32, layer=0), random_sae(32, layer=0, seed=1)])
    with pytest.raises(ValueError, match="site='resid_post'"):
        random_sae(32, layer=0, site="resid_post")
    with pytest.raises(FileNotFoundError, match="SAELens layout"):
        SAE.load("no-such-sae")
    with pytest.raises(ValueError, match="no SAE ships for this model: pass sae="):
        feature_attribution.run(model, tiny.prompts(2))
    basis = feature_attribution.run(model, tiny.prompts(2), sae="basis")  # the exact residual-basis baseline
    assert basis.meta["saes"] == ["resid_pre.1 basis"] and basis.meta["sum_error"] < 1e-5
    assert basis.values[:, basis.labels["component"].index("resid_pre.1 basis/error")].abs().max() < 1e-5


def write_saelens(folder, cfg: dict, weights: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))


def test_saelens_layout_loads_and_unsupported_fields_are_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(32, 40, generator=g), "W_dec": torch.randn(40, 32, generator=g),
         "b_enc": torch.randn(40, generator=g), "b_dec": torch.randn(32, generator=g),
         "threshold": torch.rand(40, generator=g)}
    v6 = {"architecture": "jumprelu", "d_in": 32, "d_sae": 40, "dtype": "float32", "device": "cpu",
          "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
          "metadata": {"hook_name": "blocks.1.hook_attn_out", "sae_lens_version": "6.18.0"}}
    write_saelens(tmp_path / "v6", v6, w)
    sae = SAE.load(tmp_path / "v6")
    assert (sae.layer, sae.site, sae.activation, sae.apply_b_dec_to_input) == (1, "attn_out", "jumprelu", False)
    x = torch.randn(4, 32)
    pre = x @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > w["threshold"]))
    # SAELens < 6: hook_point, activation_fn_str "topk" with its k; resid_post L is resid_pre L + 1
    old = {"d_in": 32, "d_sae": 40, "hook_point": "blocks.0.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 5}, "normalize_activations": False, "sae_lens_version": "3.5.0"}
    write_saelens(tmp_path / "old", old, {k: v for k, v in w.items() if k != "threshold"})
    sae = SAE.load(tmp_path / "old")
    assert (sae.layer, sae.site, sae.activation, sae.k) == (1, "resid_pre", "topk", 5)
    for field, value, match in (("normalize_activations", "expected_average_only_in", "normalize_activations"),
                                ("architecture", "gated", "architecture='gated'"),
                                ("metadata", {"hook_name": "blocks.1.attn.hook_z"}, "hook_name"),
                                ("d_sae", 41, "d_sae=41")):
        write_saelens(tmp_path / field, {**v6, field: value}, w)
        with pytest.raises(ValueError, match=match):
            SAE.load(tmp_path / field)
    again = SAE.load(sae.save(tmp_path / "saved"))  # our own save is the same layout
    assert (again.layer, again.site, again.k, again.name) == (1, "resid_pre", 5, "resid_pre.1")
    torch.testing.assert_close(again.encode(x), sae.encode(x))


def test_the_shipped_sae_reconstructs_tiny_ioi():
    from nnattr.embedded import train_sae
    from nnattr.features import EMBEDDED

    sae = SAE.load("tiny-ioi")
    assert (sae.layer, sae.site, sae.d_in, sae.d_sae, sae.activation) == (2, "resid_pre", 128, 512, "relu")
    figures = json.loads((EMBEDDED["tiny-ioi"] / "training.json").read_text())["held_out"]
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nnattr.embedded import path

    hf, tok = GPT2LMHeadModel.from_pretrained(path("tiny-ioi")).eval(), AutoTokenizer.from_pretrained(path("tiny-ioi"))
    x = train_sae.activations(hf, tok, train_sae.texts(32, 32, seed=1, split="test"))
    measured = reconstruction(sae, x)
    assert measured["fve"] > 0.8 and abs(measured["fve"] - figures["fve"]) < 0.05
    assert abs(measured["l0"] - figures["l0"]) < 0.2 * figures["l0"]


def ioi_pairs(n: int = 4):
    from nnattr.embedded import tasks

    return tasks.ioi_pairs(n, seed=3)


@pytest.mark.parametrize("arch", ["llama", "falcon"])  # Falcon adds its attention output into the MLP's, in place
def test_feature_patching_matches_plain_autograd(arch):
    hf = tiny.hf_model(arch)
    model = nnattr.load(hf, tiny.tokenizer())
    clean = tiny.prompts(3)
    corrupted = [" ".join(p.split()[:-2] + ["w1", p.split()[-1]]) for p in clean]
    sae = random_sae(32, layer=1, site="mlp_out", seed=4)
    result = feature_patching.run(model, clean, corrupted, "w5", "w9", sae=sae, top_k=None, per_position=True)
    (t,), (t2,) = Batch.of(model, "w5").ids[0][-1:], Batch.of(model, "w9").ids[0][-1:]
    path, _ = site_path(hf, sae)
    for i in range(len(clean)):
        acts = []
        for text, grad in ((clean[i], False), (corrupted[i], True)):
            ids = torch.tensor([Batch.of(model, text).ids[0]])
            seen = {}

            def keep(module, args, out):  # the site's value; the model goes on with a copy (Falcon adds in place)
                seen["x"] = out[0] if isinstance(out, tuple) else out
                return (seen["x"] * 1, *out[1:]) if isinstance(out, tuple) else seen["x"] * 1

            handle = hf.get_submodule(path).register_forward_hook(keep)
            try:
                with torch.enable_grad():
                    logits = reference.forward(hf, ids).logits[0, -1]
                    seen["x"].retain_grad()
                    (logits[t] - logits[t2]).backward()
            finally:
                handle.remove()
            acts.append((seen["x"][0].detach().double(), seen["x"].grad[0].double()))
        (x_clean, _), (x_corrupted, g) = acts
        expected = (encode64(sae, x_clean) - encode64(sae, x_corrupted)) * (g @ sae.W_dec.double().T)  # [pos, d_sae]
        labels = result.labels["component"]
        got = result[i].values[[labels.index(f"{sae.name}/f{f}") for f in range(sae.d_sae)]].T.double()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        error = result[i].values[labels.index(f"{sae.name}/error")].double()
        x_hat = lambda x: encode64(sae, x) @ sae.W_dec.double() + sae.b_dec.double()  # noqa: E731
        torch.testing.assert_close(error, ((x_clean - x_hat(x_clean) - x_corrupted + x_hat(x_corrupted)) * g).sum(-1),
                                   atol=1e-6, rtol=0)


def test_features_other_and_error_sum_to_attribution_patching_of_the_site():
    model = nnattr.load("tiny-ioi")
    pairs = ioi_pairs(3)
    args = ([p["clean"] for p in pairs], [p["corrupted"] for p in pairs], [p["answer"] for p in pairs],
            [p["distractor"] for p in pairs])
    sae = SAE.load("tiny-ioi")
    feats = feature_patching.run(model, *args, sae=sae, top_k=10)
    site = attribution_patching.run(model, *args, nodes=("resid",))["resid"].values[:, sae.layer].nansum(-1)
    torch.testing.assert_close(feats.values.nansum(-1), site, atol=1e-4, rtol=1e-4)


def exact_feature_patch(hf, tok, sae: SAE, pair: dict, features: list[int]) -> list[float]:
    """Plain PyTorch: the corrupted run with feature f moved to its clean activation at every position
    (x_corrupted + (a_f(clean) - a_f(corrupted)) W_dec[f], the error unchanged), minus the corrupted run."""
    from nnattr.embedded import train_sae

    ids = [torch.tensor([tok(pair[k])["input_ids"]]) for k in ("clean", "corrupted")]
    t, t2 = (tok(pair[k], add_special_tokens=False)["input_ids"][0] for k in ("answer", "distractor"))
    seen = []
    with torch.no_grad(), train_sae.at_site(hf, seen.append):
        hf(ids[0])
        base = hf(ids[1]).logits[0, -1]
    delta = sae.encode(seen[0]) - sae.encode(seen[1])  # [1, pos, d_sae]
    out = []
    for f in features:
        with torch.no_grad(), train_sae.at_site(hf, lambda x: x + delta[..., f, None] * sae.W_dec[f]):
            logits = hf(ids[1]).logits[0, -1]
        out.append(((logits[t] - logits[t2]) - (base[t] - base[t2])).item())
    return out


def test_feature_patching_agrees_with_exact_single_feature_patching():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nnattr.embedded import path

    model, sae, pairs = nnattr.load("tiny-ioi"), SAE.load("tiny-ioi"), ioi_pairs(4)
    hf, tok = GPT2LMHeadModel.from_pretrained(path("tiny-ioi")).eval(), AutoTokenizer.from_pretrained(path("tiny-ioi"))
    result = feature_patching.run(model, [p["clean"] for p in pairs], [p["corrupted"] for p in pairs],
                                  [p["answer"] for p in pairs], [p["distractor"] for p in pairs], sae=sae, top_k=8)
    estimates, exact = [], []
    for i, pair in enumerate(pairs):
        mine = [(int(lab.split("/f")[1]), v) for lab, v in zip(result.labels["component"], result.values[i].tolist())
                if "/f" in lab and v == v]
        estimates += [v for _, v in mine]
        exact += exact_feature_patch(hf, tok, sae, pair, [f for f, _ in mine])
    estimates, exact = torch.tensor(estimates), torch.tensor(exact)
    # AtP is first order: it ranks and signs the features, it does not match each effect exactly
    assert torch.corrcoef(torch.stack([estimates, exact]))[0, 1] > 0.9
    big = exact.abs() > 0.1 * exact.abs().max()
    assert (estimates[big].sign() == exact[big].sign()).float().mean() >= 0.9


def test_cli_runs_on_the_embedded_model(tmp_path, capsys):
    prompt = "When Mary and John went to the store , John gave a drink to"
    assert main(["feature-attribution", "--model", "tiny-ioi", "--prompt", prompt, "--target", " Mary",
                 "--distractor", " John", "--top-k", "5", "--top", "3", "--out", str(tmp_path)]) == 0
    assert "resid_pre.2/f" in capsys.readouterr().out
    assert main(["feature-patching", "--model", "tiny-ioi", "--clean", prompt, "--corrupted",
                 prompt.replace("John gave", "Mary gave"), "--answer", " Mary", "--distractor", " John",
                 "--per-position", "--top", "3"]) == 0
    assert main(["feature-attribution", "--model", "tiny-ioi", "--prompt", prompt, "--top-k", "all"]) == 0
    assert main(["feature-attribution", "--model", "tiny-ioi", "--prompt", prompt, "--sae", "/nonexistent/sae"]) == 1
    assert capsys.readouterr().err.startswith("error: '/nonexistent/sae' is neither a shipped SAE")  # no traceback


def test_pairs_of_unequal_length_need_align_right_even_summed():
    model = nnattr.load("tiny-ioi")
    clean = "When Mary and John went to the store , John gave a drink to"
    longer = "When Mary and John went to the store , Mary gave a drink to the"
    with pytest.raises(ValueError, match="clean prompt has 15 tokens and the corrupted prompt 16.*align='right'"):
        feature_patching.run(model, clean, longer, " Mary", " John")
    right = feature_patching.run(model, clean, longer, " Mary", " John", align="right", top_k="all")
    assert right.meta["align"] == "right" and right.meta["top_k"] is None
