"""Sparse autoencoders attached to a model: `SAE`, its loaders, and the result of feature attribution.

An `SAE` holds encoder and decoder weights and biases, an activation (ReLU, JumpReLU with a
per-feature threshold, TopK) and the site it reads (Cunningham et al. 2023; Bricken et al. 2023):

=============  ================================================  =======================
site           the activation it encodes                          SAELens ``hook_name``
=============  ================================================  =======================
``resid_pre``  the residual stream entering layer ``L``           ``blocks.L.hook_resid_pre``
``attn_out``   layer ``L``'s attention write to the residual      ``blocks.L.hook_attn_out``
``mlp_out``    layer ``L``'s MLP write to the residual            ``blocks.L.hook_mlp_out``
=============  ================================================  =======================

(``blocks.L.hook_resid_post`` is read as ``resid_pre`` of layer ``L + 1``.) It loads the SAELens
layout, a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, and ``threshold`` for JumpReLU), and saves the
same layout, so an SAE saved here loads in SAELens and back. What it cannot run exactly it
refuses, naming the field: ``normalize_activations`` other than ``"none"``, an architecture other
than standard / jumprelu / topk, ``hook_z`` reshaping, TopK's ``rescale_acts_by_decoder_norm``.

>>> sae = SAE.load("tiny-ioi")                  # shipped: resid_pre of tiny-ioi's layer 2, 512 features
>>> sae.name, sae.d_in, sae.d_sae
('resid_pre.2', 128, 512)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, Union

import torch

from .kernels import ACTIVATIONS, sae_decode, sae_encode, top_features
from .result import Attribution, sum_error

Site = Literal["resid_pre", "attn_out", "mlp_out"]
SITES: tuple[str, ...] = Site.__args__  # in forward order within a layer
Activation = Literal["relu", "jumprelu", "topk"]
EMBEDDED = {"tiny-ioi": Path(__file__).resolve().parent / "embedded" / "tiny-ioi-sae"}
_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|attn_out|mlp_out|resid_post)")


@dataclass(frozen=True, eq=False)
class SAE:
    """An SAE at ``site`` of layer ``layer``: ``a = act((x - b_dec) @ W_enc + b_enc)``,
    ``x_hat = a @ W_dec + b_dec`` (see `nnattr.kernels.features`). Tensors are kept in float32."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    layer: int
    site: Site = "resid_pre"
    activation: Activation = "relu"
    threshold: torch.Tensor | None = None  # [d_sae], JumpReLU
    k: int | None = None  # TopK
    apply_b_dec_to_input: bool = True
    name: str | None = None  # default "<site>.<layer>"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(self, key) is not None:
                set_(key, torch.as_tensor(getattr(self, key)).detach().float())
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (None, None)
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.activation == "jumprelu":
            shapes["threshold"] = (d_sae,)
        got = {key: None if getattr(self, key) is None else tuple(getattr(self, key).shape) for key in shapes}
        bad = {key: got[key] or "missing" for key, shape in shapes.items() if got[key] != shape}
        if d_in is None or bad:
            raise ValueError(f"SAE tensors do not line up as W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, "
                             f"d_in], b_dec [d_in] (threshold [d_sae] for jumprelu): got W_enc "
                             f"{tuple(self.W_enc.shape)}, and {bad}")
        if self.site not in SITES:
            raise ValueError(f"site={self.site!r}; expected one of {SITES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.activation == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= d_sae):
            raise ValueError(f"a topk SAE needs k, an int from 1 to d_sae={d_sae}; got k={self.k!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r}: give the layer index, an int >= 0")
        if self.name is None:
            set_("name", f"{self.site}.{self.layer}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def hook_name(self) -> str:
        """The TransformerLens / SAELens name of the site: ``blocks.2.hook_resid_pre``."""
        return f"blocks.{self.layer}.hook_{self.site}"

    def tensors(self) -> dict:
        """The plain dict a trace takes (tensors and settings: never this object)."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                "threshold": self.threshold, "activation": self.activation, "k": self.k,
                "apply_b_dec_to_input": self.apply_b_dec_to_input}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations: ``[..., d_in] -> [..., d_sae]``."""
        return sae_encode(x, self.tensors())

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction: ``[..., d_sae] -> [..., d_in]``."""
        return sae_decode(acts, self.tensors())

    @classmethod
    def basis(cls, d_model: int, *, layer: int, site: Site = "resid_pre") -> "SAE":
        """The residual basis as a dictionary: feature ``i`` is ``relu(x_i)``, feature ``d_model + i``
        is ``relu(-x_i)`` (``W_enc = [I, -I]``, ``W_dec = [I; -I]``, no biases), so the reconstruction is
        exact and the error 0. A baseline for learned features (Marks et al. 2024 compare to neurons)."""
        eye = torch.eye(d_model)
        return cls(W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d_model), W_dec=torch.cat([eye, -eye]),
                   b_dec=torch.zeros(d_model), layer=layer, site=site, name=f"{site}.{layer} basis")

    def save(self, folder: str | Path) -> Path:
        """Write the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in self.tensors().items() if isinstance(v, torch.Tensor)}
        save_file(weights, str(folder / "sae_weights.safetensors"))
        architecture = {v: k for k, v in _ARCHITECTURES.items()}[self.activation]
        cfg = {"architecture": architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "hook_name": self.hook_name,
               "metadata": {"hook_name": self.hook_name, "nnattr_name": self.name},
               **({"k": self.k, "rescale_acts_by_decoder_norm": False} if self.activation == "topk" else {})}
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, source: str | Path, *, name: str | None = None) -> "SAE":
        """An SAE from a folder in the SAELens layout (SAELens 6, or older: ``hook_point``,
        ``activation_fn_str``), or a shipped one by name (``"tiny-ioi"``)."""
        folder = EMBEDDED.get(str(source), Path(source))
        if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
            raise FileNotFoundError(f"{source!r} is neither a shipped SAE ({', '.join(EMBEDDED)}) nor a folder holding "
                                    f"cfg.json and sae_weights.safetensors (the SAELens layout)")
        from safetensors.torch import load_file

        cfg, weights = json.loads((folder / "cfg.json").read_text()), load_file(str(folder / "sae_weights.safetensors"))
        return cls(**_from_saelens(cfg, weights, folder), name=name or cfg.get("metadata", {}).get("nnattr_name"))


def _from_saelens(cfg: dict, weights: dict, folder: Path) -> dict:
    """``SAE`` keywords from a SAELens ``cfg.json`` and its weights; a ValueError names what is not supported."""
    where = f"{folder / 'cfg.json'}"
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    found = _HOOK.fullmatch(hook or "")
    if not found:
        raise ValueError(f"{where}: hook_name={hook!r} is not a site nnattr reads: expected blocks.<L>.hook_resid_pre, "
                         f"hook_resid_post, hook_attn_out or hook_mlp_out")
    layer, site = int(found.group(1)), found.group(2)
    layer, site = (layer + 1, "resid_pre") if site == "resid_post" else (layer, site)
    architecture = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if architecture == "standard" and fn == "topk":  # SAELens < 6 wrote TopK as a standard SAE
        architecture, cfg = "topk", {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}
    elif architecture == "standard" and fn not in (None, "relu"):
        raise ValueError(f"{where}: activation_fn={fn!r} is not supported: nnattr runs relu, jumprelu and topk SAEs")
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"{where}: architecture={architecture!r} is not supported; nnattr loads "
                         f"{', '.join(_ARCHITECTURES)}")
    checks = {"normalize_activations": (cfg.get("normalize_activations") or "none", ("none", False)),
              "reshape_activations": (cfg.get("reshape_activations", "none"), ("none",)),
              "rescale_acts_by_decoder_norm": (cfg.get("rescale_acts_by_decoder_norm", False), (False,)),
              "finetuning_scaling_factor": (cfg.get("finetuning_scaling_factor", False), (False,))}
    for field, (value, fine) in checks.items():
        if value not in fine:
            raise ValueError(f"{where}: {field}={value!r} is not supported (nnattr encodes the raw activation; "
                             f"fold it into the weights first, or use an SAE with {field}={fine[0]!r})")
    if "log_threshold" in weights and "threshold" not in weights:
        weights = {**weights, "threshold": weights["log_threshold"].exp()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") + ("threshold",) * (architecture == "jumprelu")
               if k not in weights]
    if missing:
        raise ValueError(f"{folder / 'sae_weights.safetensors'} lacks {missing} (it holds {sorted(weights)})")
    for key, size in (("d_in", weights["W_enc"].shape[0]), ("d_sae", weights["W_enc"].shape[1])):
        if cfg.get(key, size) != size:
            raise ValueError(f"{where}: {key}={cfg[key]} but W_enc is {tuple(weights['W_enc'].shape)} [d_in, d_sae]")
    return dict(W_enc=weights["W_enc"], b_enc=weights["b_enc"], W_dec=weights["W_dec"], b_dec=weights["b_dec"],
                threshold=weights.get("threshold") if architecture == "jumprelu" else None, layer=layer, site=site,
                activation=_ARCHITECTURES[architecture], k=cfg.get("k") if architecture == "topk" else None,
                apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))


SAEs = Union[str, Path, SAE, Sequence[Union[str, Path, SAE]]]


def resolve(model, sae: SAEs | None) -> list[SAE]:
    """SAEs (one, a name, a folder, or a list of them) checked against ``model``, in forward order.

    None: the shipped SAE of the embedded model ``tiny-ioi``; on any other model a ValueError (no
    SAE ships for it). ``"basis"``: the residual basis at the middle layer (`SAE.basis`), exact and
    without an error term, a baseline rather than learned features."""
    from .arch import arch_of

    arch = arch_of(model)
    if sae is None:
        where = Path(str(getattr(getattr(model, "config", None), "name_or_path", "")))
        if not (where.is_dir() and where.resolve() == (EMBEDDED["tiny-ioi"].parent / "tiny-ioi").resolve()):
            raise ValueError("no sae= given, and no SAE ships for this model: pass sae= (an nnattr.features.SAE, a "
                             "folder in the SAELens layout, a list of them, one per site), or sae='basis' for the "
                             "residual basis at the middle layer (a baseline, not learned features)")
        sae = "tiny-ioi"
    if isinstance(sae, str) and sae == "basis":
        sae = SAE.basis(arch.d_model, layer=arch.n_layers // 2)
    saes = [sae] if isinstance(sae, (str, Path, SAE)) else list(sae)
    if not saes:
        raise ValueError("sae=[]: give at least one SAE (an SAE, a folder in the SAELens layout, or 'tiny-ioi')")
    saes = [s if isinstance(s, SAE) else SAE.load(s) for s in saes]
    for s in saes:
        if s.d_in != arch.d_model:
            raise ValueError(f"SAE {s.name!r} reads d_in={s.d_in} but the model's d_model is {arch.d_model}: give an "
                             f"SAE trained on this model's activations")
        if s.layer >= arch.n_layers:
            raise ValueError(f"SAE {s.name!r} sits at layer {s.layer}, but the model has {arch.n_layers} layers "
                             f"(0 to {arch.n_layers - 1})")
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise ValueError(f"SAE names {names} repeat: give each SAE its own name= (SAE.load(..., name=...))")
    return sorted(saes, key=lambda s: (s.layer, SITES.index(s.site)))


def plan(saes: list[SAE], n_layers: int) -> list[list[tuple[int, str]]]:
    """Per layer, ``(sae index, site)`` in forward order: what a trace reads as it passes the layer."""
    return [[(i, s.site) for i, s in enumerate(saes) if s.layer == layer] for layer in range(n_layers)]


def components(saes: list[SAE], out: dict, extra: tuple[str, ...]) -> tuple[torch.Tensor, list[str], dict]:
    """Scores ``[prompt, component(, position)]`` from each SAE's top entries (``out["values<i>"]``,
    ``out["index<i>"]``, ``[prompt, k]``, the index into ``[(position,) feature]``) and its extra
    terms ``out["terms<i>"]`` (``[prompt, len(extra)(, position)]``). Per SAE: the features any prompt
    ranked (NaN where a prompt did not), ranked by mean magnitude, then ``extra``. Returns the values,
    labels (``"resid_pre.2/f123"``) and ``{"sae", "kind", "feature"}``, one entry per component."""
    blocks, labels, kinds = [], [], {"sae": [], "kind": [], "feature": []}
    for i, s in enumerate(saes):
        values, index, terms = out[f"values{i}"].float(), out[f"index{i}"], out[f"terms{i}"].float()
        positions = terms.shape[2:]  # (width,) per position, () otherwise
        feature, position = index % s.d_sae, index // s.d_sae
        chosen = feature.unique()  # sorted
        grid = torch.full((len(values), len(chosen), *positions), float("nan"))
        column = torch.searchsorted(chosen, feature)
        rows = torch.arange(len(values))[:, None].expand_as(index)
        grid[(rows, column, position) if positions else (rows, column)] = values
        order = grid.abs().nan_to_num().reshape(len(values), len(chosen), -1).sum(-1).mean(0).argsort(descending=True,
                                                                                             stable=True)
        blocks += [grid[:, order], terms]
        labels += [f"{s.name}/f{f}" for f in chosen[order].tolist()] + [f"{s.name}/{e}" for e in extra]
        kinds["sae"] += [s.name] * (len(chosen) + len(extra))
        kinds["kind"] += ["feature"] * len(chosen) + list(extra)
        kinds["feature"] += chosen[order].tolist() + [None] * len(extra)
    return torch.cat(blocks, 1), labels, kinds


def result(saes: list[SAE], out: dict, extra: tuple[str, ...], *, labels: dict, whole: torch.Tensor | None = None,
           keep: torch.Tensor | None = None, meta: dict, per_prompt: dict, **fields) -> Attribution:
    """The `Attribution` of feature scores: dims ``("prompt", "component"(, "position"))`` from
    `components`; ``meta["components"]`` says which SAE, kind and feature each component is. With
    ``whole`` (``[prompt]``, the logit), each SAE's block must sum to it: the gap per prompt (the
    largest over SAEs) goes to ``per_prompt["sum_error"]`` and its maximum to ``meta["sum_error"]``.
    ``keep`` (``[prompt, position]``): per-position scores are cut to its width and NaN where it is False."""
    scores, names, kinds = components(saes, out, extra)
    if keep is not None:
        scores = scores[..., -keep.shape[1]:].masked_fill(~keep[:, None], float("nan"))
    dims = ("prompt", "component") + ("position",) * (scores.ndim == 3)
    if whole is not None:
        errors = [sum_error(torch.cat([out[f"values{i}"], out[f"terms{i}"]], 1), whole,
                            what=f"SAE {s.name!r}'s features, {', '.join(extra[1:])}") for i, s in enumerate(saes)]
        per_prompt = {**per_prompt, "sum_error": [max(e) for e in zip(*errors)]}
        meta = {**meta, "sum_error": max(per_prompt["sum_error"])}
    meta = {**meta, "saes": [s.name for s in saes], "components": kinds}
    return Attribution(scores, dims, {**labels, "component": names}, meta=meta, per_prompt=per_prompt, **fields)


def reconstruction(sae: SAE, x: torch.Tensor) -> dict[str, float]:
    """MSE, fraction of variance explained, mean L0 and dead features of ``sae`` on activations
    ``x: [n, d_in]`` (rows are token positions)."""
    acts = sae.encode(x)
    error = (x.float() - sae.decode(acts)).pow(2)
    variance = (x.float() - x.float().mean(0)).pow(2).sum()
    return {"mse": error.mean().item(), "fve": 1 - (error.sum() / variance).item(),
            "l0": (acts > 0).float().sum(-1).mean().item(), "dead": int(((acts > 0).sum(0) == 0).sum())}


__all__ = ["SAE", "SITES", "EMBEDDED", "resolve", "plan", "components", "result", "reconstruction", "top_features"]
