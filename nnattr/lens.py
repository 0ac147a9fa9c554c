"""The tuned lens: learned per-layer affine translators before the final norm and unembedding.

Belrose et al. 2023, Eliciting Latent Predictions from Transformers with the Tuned Lens. The
logit lens decodes the residual ``h_l`` entering layer ``l`` as ``lm_head(ln_f(h_l))``; the tuned
lens first moves it with a translator trained for that layer:

    tuned_l(h) = softcap(lm_head(ln_f(h + A_l h + b_l)))        A_l: [d_model, d_model], b_l: [d_model]

``l = 0`` is the embeddings; there is one translator per layer (``n_layers`` of them) and none for
the last layer's output, which is the model's own final residual. The translator's output is
*added* to ``h`` (as in the ``tuned-lens`` package), so zero translators, the initial ones, give
the logit lens exactly. Training minimises ``KL(p_final || p_lens)`` per position, averaged over
real tokens, summed over layers; the model stays frozen.

>>> import nnattr
>>> from nnattr.lens import TunedLens, kl_by_layer
>>> from nnattr.recipes import logit_lens
>>> model = nnattr.load("tiny-ioi")
>>> lens = TunedLens.load("tiny-ioi")                      # the lens shipped with the embedded model
>>> result = logit_lens.run(model, "When Mary and John went to the store, John gave a drink to", lens=lens)
>>> result.title
'Tuned lens'

Saved forms (`TunedLens.load` reads both, `TunedLens.save` writes both):

- nnattr's: a folder with ``lens.safetensors`` (``weight [layer, d_model, d_model]``, ``bias
  [layer, d_model]``) and ``lens.json`` (sizes, base model, training record);
- the ``tuned-lens`` package's: a folder with ``config.json`` (``TunedLensConfig``: ``d_model``,
  ``num_hidden_layers``, ``bias``, ``base_model_name_or_path``, ``lens_type``) and ``params.pt``
  (``torch.save`` of the translators' state dict: ``{i}.weight [d_model, d_model]`` in
  ``torch.nn.Linear``'s (out, in) layout, ``{i}.bias [d_model]``).
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import torch

from .arch import dims, spec_for
from .kernels import kl_to_final, softcap, translate

OWN_FORMAT = "nnattr.tuned_lens"
SHIPPED = "tuned-lens"  # the lens shipped inside a model's folder: <model folder>/tuned-lens/


@dataclass(frozen=True, eq=False)
class TunedLens:
    """Translators ``weight [layer, d_model, d_model]`` and ``bias [layer, d_model]`` (float32):
    translator ``l`` maps the residual entering layer ``l`` to ``h + h @ weight[l].T + bias[l]``.

    ``base_model`` names the model it was trained for; ``source`` says where it came from (an
    embedded model's name, a folder, ``"trained"``, ``"zeros"``): the logit lens recipe records
    it in ``meta["lens"]``. ``info`` holds the training record.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    base_model: str | None = None
    source: str = "zeros"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        w, b = self.weight, self.bias
        if w.ndim != 3 or w.shape[1] != w.shape[2] or b.shape != w.shape[:2]:
            raise ValueError(f"a tuned lens holds weight [layer, d_model, d_model] and bias [layer, d_model]; "
                             f"got weight {tuple(w.shape)} and bias {tuple(b.shape)}")
        object.__setattr__(self, "weight", w.detach().float().cpu().contiguous())
        object.__setattr__(self, "bias", b.detach().float().cpu().contiguous())

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[-1]

    def __repr__(self) -> str:
        return (f"TunedLens({self.n_layers} translators, d_model {self.d_model}, base_model={self.base_model!r}, "
                f"source={self.source!r})")

    # ------------------------------------------------------------------ building

    @classmethod
    def zeros(cls, model) -> "TunedLens":
        """Zero translators for ``model``: the logit lens, and the start of training."""
        d = dims(model)
        return cls(torch.zeros(d.n_layers, d.d_model, d.d_model), torch.zeros(d.n_layers, d.d_model),
                   base_model=_name(model), source="zeros")

    @classmethod
    def load(cls, source: str | pathlib.Path) -> "TunedLens":
        """A saved lens: an embedded model's name (``"tiny-ioi"``: its shipped lens), a model folder
        holding a ``tuned-lens/`` folder, or a lens folder in nnattr's form or the ``tuned-lens``
        package's (``config.json`` + ``params.pt``)."""
        from . import embedded

        name = str(source)
        if name in embedded.MODELS:
            folder, label = embedded.MODELS[name] / SHIPPED, name
        else:
            folder, label = pathlib.Path(name).expanduser(), name
            if not folder.is_dir():
                raise FileNotFoundError(f"lens {name!r}: no such folder. Give a folder holding lens.json + "
                                        f"lens.safetensors (TunedLens.save) or config.json + params.pt (the "
                                        f"tuned-lens package), or an embedded model's name "
                                        f"({', '.join(map(repr, sorted(embedded.MODELS)))})")
            if not _is_lens(folder) and _is_lens(folder / SHIPPED):  # a model folder with its lens
                folder = folder / SHIPPED
        if (folder / "lens.json").is_file():
            return _load_own(folder, label)
        if (folder / "config.json").is_file() and (folder / "params.pt").is_file():
            return _load_tuned_lens(folder, label)
        raise FileNotFoundError(f"lens {name!r}: {folder} holds no tuned lens. Expected lens.json + lens.safetensors "
                                f"(TunedLens.save) or config.json + params.pt (the tuned-lens package's layout)")

    def save(self, folder: str | pathlib.Path, *, layout: Literal["nnattr", "tuned-lens"] = "nnattr") -> pathlib.Path:
        """Write the lens to ``folder``: nnattr's form (``lens.safetensors`` + ``lens.json``), or the
        ``tuned-lens`` package's (``params.pt`` + ``config.json``, readable by its
        ``TunedLens.from_model_and_pretrained``). Returns the folder."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if layout == "tuned-lens":
            config = {"base_model_name_or_path": self.base_model or "", "d_model": self.d_model,
                      "num_hidden_layers": self.n_layers, "bias": True, "base_model_revision": None,
                      "unembed_hash": None, "lens_type": "linear_tuned_lens"}
            state = {f"{i}.{part}": t[i].clone() for i in range(self.n_layers)
                     for part, t in (("weight", self.weight), ("bias", self.bias))}
            torch.save(state, folder / "params.pt")
            (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
            return folder
        if layout != "nnattr":
            raise ValueError(f"layout={layout!r}: expected 'nnattr' (lens.safetensors + lens.json) or 'tuned-lens' "
                             f"(params.pt + config.json)")
        from safetensors.torch import save

        (folder / "lens.safetensors").write_bytes(save({"weight": self.weight, "bias": self.bias}))
        meta = {"format": OWN_FORMAT, "version": 1, "base_model": self.base_model, "n_layers": self.n_layers,
                "d_model": self.d_model,
                "translator": "h + h @ weight[l].T + bias[l], h the residual entering layer l (l = 0: the embeddings)",
                **({"training": self.info} if self.info else {})}
        (folder / "lens.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    # ------------------------------------------------------------------ using

    def check(self, model) -> "TunedLens":
        """This lens, if it fits ``model`` (one translator per layer, its ``d_model``); else a ValueError
        naming both."""
        d = dims(model)
        if (self.n_layers, self.d_model) != (d.n_layers, d.d_model):
            raise ValueError(
                f"this tuned lens ({self.source}, trained for {self.base_model or 'an unnamed model'}) has "
                f"{self.n_layers} translators of d_model {self.d_model}, but the model {_name(model)!r} has "
                f"{d.n_layers} layers of d_model {d.d_model}: load the lens trained for this model, or train one "
                f"with nnattr.lens.TunedLens.train(model, texts)")
        named = str(getattr(getattr(model, "config", model), "name_or_path", "") or "")  # unnamed: nothing to compare
        name = _name(model)
        if self.base_model and named and self.base_model not in (name, pathlib.Path(name).name):
            import warnings

            warnings.warn(f"this tuned lens ({self.source}) was trained for {self.base_model!r}, and the model is "
                          f"{name!r}: same sizes, but its translators fit the other model's residual stream. Load "
                          f"the lens trained for this model, or train one with nnattr.lens.TunedLens.train",
                          stacklevel=3)
        return self

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual ``h [..., d_model]`` entering ``layer`` (0: the embeddings), translated."""
        return translate(h, self.weight[layer], self.bias[layer])

    def to_dict(self) -> dict:
        """What a result's ``meta`` records about this lens (plain values)."""
        return {"source": self.source, "base_model": self.base_model, "n_layers": self.n_layers,
                "d_model": self.d_model}

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, model, texts: Sequence[str], *, steps: int = 300, lr: float = 1e-3, batch_size: int = 32,
              seed: int = 0, weight_decay: float = 0.0, init: "TunedLens | None" = None) -> "TunedLens":
        """Train translators for ``model`` (an ``nnattr.load`` model) on ``texts``.

        Objective: for every layer, ``KL(p_final || p_lens)`` per position, averaged over the real
        tokens of a minibatch; summed over layers (each translator only sees its own term). Adam,
        ``steps`` minibatches of ``batch_size`` texts drawn epoch by epoch in an order set by
        ``seed``; translators start at zero (the logit lens) or at ``init``. The model stays frozen
        and runs locally (plain PyTorch on the Hugging Face module). Same seed, same texts, same
        thread count: the same weights. A progress bar shows on a terminal.
        """
        from tqdm.auto import trange

        from .batch import Batch
        from .runner import show_progress

        for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: give a positive int")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr={lr!r}: give a positive learning rate")
        batch = Batch.of(model, [texts] if isinstance(texts, str) else list(texts))
        lens = (init.check(model) if init is not None else cls.zeros(model))
        weight = lens.weight.clone().requires_grad_(True)
        bias = lens.bias.clone().requires_grad_(True)
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        rows = _Rows(model, batch, batch_size)  # the frozen model's residuals, computed once when they fit
        order, queue, losses = random.Random(seed), [], []
        bar = trange(steps, desc="Tuned lens", unit="step", disable=not show_progress(), leave=False)
        for _ in bar:
            picked = []
            while len(picked) < min(batch_size, len(batch)):
                if not queue:
                    queue = list(range(len(batch)))
                    order.shuffle(queue)
                picked.append(queue.pop())
            states, final = rows(picked)  # [layer + 1] of [token, d_model]; [token, vocab]
            with torch.enable_grad():
                loss = sum(_kl_sum(model, translate(h, weight[i], bias[i]), final) / len(final)
                           for i, h in enumerate(states[:-1]))
            opt.zero_grad(set_to_none=True)
            weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
        info = {"texts": len(batch), "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "weight_decay": weight_decay, "optimizer": "Adam", "final_loss": losses[-1],
                "objective": "sum over layers of mean over real tokens of KL(final || lens)"}
        return cls(weight, bias, base_model=_name(model), source="trained", info=info)


# ---------------------------------------------------------------------- resolving, measuring, plotting


def resolve(model, lens) -> TunedLens | None:
    """The lens the logit lens recipe's ``lens=`` names, checked against ``model``: None (the logit
    lens), a `TunedLens`, ``"tuned"`` (the lens shipped in the model's own folder, as for the embedded
    ``tiny-ioi``), an embedded model's name, or a saved lens's folder."""
    if lens is None or isinstance(lens, TunedLens):
        return None if lens is None else lens.check(model)
    if not isinstance(lens, (str, pathlib.Path)):
        raise ValueError(f"lens={lens!r} ({type(lens).__name__}): give None (the logit lens), a "
                         f"nnattr.lens.TunedLens, 'tuned' (the lens shipped with the model) or a saved lens's folder")
    if str(lens) == "tuned":
        home = str(getattr(model.config, "name_or_path", "") or "")
        folder = pathlib.Path(home) / SHIPPED
        if not home or not _is_lens(folder):
            raise ValueError(f"lens='tuned': the model {_name(model)!r} ships no tuned lens (no {SHIPPED}/ folder in "
                             f"its folder); train one with nnattr.lens.TunedLens.train(model, texts) and pass it, "
                             f"or give the folder of a saved lens")
        return replace(TunedLens.load(folder), source=_name(model)).check(model)  # named as TunedLens.load(name)
    return TunedLens.load(lens).check(model)


def embedded(name: str = "tiny-ioi") -> TunedLens:
    """The tuned lens shipped with an embedded model (``TunedLens.load(name)``)."""
    return TunedLens.load(name)


@torch.no_grad()
def kl_by_layer(model, texts: Sequence[str], lens: TunedLens | None = None, *, batch_size: int = 64) -> torch.Tensor:
    """``[layer + 1]`` float64: the mean over every real token of ``texts`` of ``KL(p_final || p_lens)``
    in nats, for the residual after the embeddings and after each layer (rows ``embed, L0, ...``, as
    in the logit lens recipe; row ``l`` is the residual entering layer ``l``). The last row is the
    model's output (0 up to rounding). ``lens=None``: the logit lens."""
    from .batch import Batch

    if lens is not None:
        lens.check(model)
    batch = Batch.of(model, [texts] if isinstance(texts, str) else list(texts))
    total, count = None, 0
    for start in range(0, len(batch), batch_size):
        states, final = _forward(model, batch.ids[start:start + batch_size], batch.pad_id)
        states = [h if lens is None or i == len(states) - 1 else lens.translate(h, i) for i, h in enumerate(states)]
        sums = torch.stack([_kl_sum(model, h, final) for h in states]).double()
        total = sums if total is None else total + sums
        count += len(final)
    return total / count


def kl_plot(curves: dict[str, Sequence[float]], labels: Sequence[str] | None = None, *, title: str | None = None):
    """One line per lens: per-layer KL to the final distribution (nats, log scale), e.g.
    ``kl_plot({"logit lens": kl_by_layer(model, texts), "tuned lens": kl_by_layer(model, texts, lens)})``.
    ``labels`` name the rows (default ``embed, L0, ...``: the residual after the embeddings and after
    each layer, as the logit lens recipe labels them); the last row, the output itself (KL 0), is not
    drawn. Returns a ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    curves = {name: [float(v) for v in values] for name, values in curves.items()}
    n = len(next(iter(curves.values())))
    labels = list(labels) if labels is not None else ["embed"] + [f"L{i}" for i in range(n - 1)]
    if any(len(v) != n for v in curves.values()) or len(labels) != n:
        raise ValueError(f"kl_plot: every curve needs one value per row ({n}); got "
                         f"{ {k: len(v) for k, v in curves.items()} } and {len(labels)} labels")
    fig = Figure(figsize=(5.2, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(n - 1))  # the last row is the output itself (KL 0): not drawn on a log scale
    for (name, values), marker in zip(curves.items(), "os^vD"):
        ax.plot(x, values[:-1], marker=marker, label=name)
    ax.set_xticks(x, labels[:-1])
    ax.set_xlabel("residual after (embed: the embeddings)")
    ax.set_ylabel("KL(final ‖ lens), nats")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False)
    ax.set_title(title or "Per-layer KL to the model's output")
    return fig


# ---------------------------------------------------------------------- internals


def _name(model) -> str:
    """The model's name: an embedded model's short name, else its Hugging Face name or folder."""
    from . import embedded

    config = getattr(model, "config", model)
    name = str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"))
    return next((short for short, folder in embedded.MODELS.items() if str(folder) == name), name)


def _is_lens(folder: pathlib.Path) -> bool:
    return (folder / "lens.json").is_file() or ((folder / "config.json").is_file() and (folder / "params.pt").is_file())


def _forward(model, rows: Sequence[Sequence[int]], pad_id: int):
    """``rows`` (right-padded) through the Hugging Face module, kept at their real tokens: the residual
    entering each layer and the final norm's input (``[layer + 1]`` of ``[token, d_model]``), and the
    final logits ``[token, vocab]`` (after any soft-cap)."""
    hf = getattr(model, "_module", model)
    width = max(map(len, rows))
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=hf.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=hf.device)
    seen = []
    norm = hf.get_submodule(spec_for(hf.config).ln_f)
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    real = mask.bool()  # [batch, pos] -> token rows, prompt by prompt
    states = list(out.hidden_states[:-1]) + [seen[-1]]  # HF's last hidden state is after the final norm
    return [h[real] for h in states], out.logits.float()[real]


class _Rows:
    """Token rows of chosen texts for training: computed once for all texts when they take under
    ``budget`` bytes, else by a forward of the chosen texts at every step."""

    def __init__(self, model, batch, chunk: int, budget: float = 2**30):
        self.model, self.batch, self.cache = model, batch, None
        d = dims(model)
        if sum(batch.lengths) * 4 * ((d.n_layers + 1) * d.d_model + d.d_vocab) <= budget:
            parts = [_forward(model, batch.ids[i:i + chunk], batch.pad_id) for i in range(0, len(batch), chunk)]
            self.cache = ([torch.cat([p[0][layer] for p in parts]) for layer in range(d.n_layers + 1)],
                          torch.cat([p[1] for p in parts]))
            ends = torch.tensor(batch.lengths).cumsum(0)
            self.spans = [(int(e) - n, int(e)) for e, n in zip(ends, batch.lengths)]

    def __call__(self, picked: list[int]):
        if self.cache is None:
            return _forward(self.model, [self.batch.ids[i] for i in picked], self.batch.pad_id)
        index = torch.cat([torch.arange(*self.spans[i]) for i in picked])
        states, final = self.cache
        return [h[index] for h in states], final[index]


def _kl_sum(model, h: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Sum over token rows of ``KL(final || lens(h))``, ``h [token, d_model]`` already translated."""
    hf = getattr(model, "_module", model)
    norm, unembed = hf.get_submodule(spec_for(hf.config).ln_f), hf.get_output_embeddings()
    logits = softcap(unembed(norm(h)).float(), dims(hf).logit_softcap)
    return kl_to_final(final, logits).sum()


def _load_own(folder: pathlib.Path, label: str) -> TunedLens:
    from safetensors.torch import load_file

    meta = json.loads((folder / "lens.json").read_text())
    if meta.get("format") != OWN_FORMAT:
        raise ValueError(f"{folder / 'lens.json'}: format {meta.get('format')!r}, expected {OWN_FORMAT!r}")
    tensors = load_file(str(folder / "lens.safetensors"))
    return TunedLens(tensors["weight"], tensors["bias"], base_model=meta.get("base_model"), source=label,
                     info=meta.get("training", {}))


def _load_tuned_lens(folder: pathlib.Path, label: str) -> TunedLens:
    """The ``tuned-lens`` package's layout: ``config.json`` (its ``TunedLensConfig``) and ``params.pt``,
    the state dict of its ``layer_translators`` ``ModuleList`` (``{i}.weight``, ``{i}.bias``)."""
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("lens_type", "linear_tuned_lens")
    if kind != "linear_tuned_lens":
        raise ValueError(f"{folder / 'config.json'}: lens_type {kind!r}; only 'linear_tuned_lens' is supported")
    try:
        n, d = int(config["num_hidden_layers"]), int(config["d_model"])
    except KeyError as missing:
        raise ValueError(f"{folder / 'config.json'} lacks {missing}: not a tuned-lens config") from None
    state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
    state = {key.removeprefix("layer_translators."): value for key, value in state.items()}  # a whole lens's
    missing = [f"{i}.weight" for i in range(n) if f"{i}.weight" not in state]
    if missing:
        raise ValueError(f"{folder / 'params.pt'}: no {', '.join(missing[:3])} for the {n} translators its "
                         f"config.json names (keys: {', '.join(sorted(state)[:6])} ...)")
    weight = torch.stack([state[f"{i}.weight"].float() for i in range(n)])
    bias = torch.stack([state[f"{i}.bias"].float() if f"{i}.bias" in state else torch.zeros(d) for i in range(n)])
    if weight.shape != (n, d, d):
        raise ValueError(f"{folder / 'params.pt'}: translators {tuple(weight.shape[1:])}, but config.json says "
                         f"d_model {d}")
    return TunedLens(weight, bias, base_model=config.get("base_model_name_or_path") or None, source=label)


__all__ = ["TunedLens", "embedded", "kl_by_layer", "kl_plot", "resolve"]
