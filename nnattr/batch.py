"""Prompts prepared once: token ids, token strings, answer ids, labels and the model's facts.

Every recipe, `nnattr.pairs`, the report and the CLI build one `Batch` per call and read
everything from it; nothing is tokenised twice. A trace receives ``batch.inputs`` (left-padded
ids and mask, the form nnsight gives a causal LM) and plain values read from the batch before
the ``with``: a `Batch` is a client-side object and never travels to NDIF.

>>> import nnattr
>>> from nnattr.batch import Batch
>>> model = nnattr.load("tiny-ioi")
>>> batch = Batch.of(model, ["When Mary and John went to the store , John gave a drink to"], " Mary")
>>> batch.lengths, batch.tokens[0][:3], batch.target
((15,), ('<bos>', 'When', 'Mary'), (41,))
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import torch

from .arch import Arch, arch_of, spec_for

Token = Union[str, int]
#: One prompt or many: text, a list of token ids (or of such lists), a ``[pos]`` or ``[batch, pos]``
#: id tensor, or a tokenizer encoding ``{"input_ids", "attention_mask"}`` (padding on either side).
Prompts = Union[str, Sequence[str], Sequence[Sequence[int]], torch.Tensor, Mapping[str, Any]]


@dataclass(frozen=True)
class Batch:
    """Prepared prompts: one row per prompt, unpadded, with their answers.

    ``ids`` and ``tokens`` hold each prompt's own tokens (special tokens included);
    ``labels`` name the prompts in results (their text); ``target`` / ``distractor`` hold one
    token id per prompt, or None. ``width`` is the longest prompt: every chunk of the batch is
    padded to it, so results of any chunking line up position by position, right-aligned.
    """

    ids: tuple[tuple[int, ...], ...]
    tokens: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...]
    target: tuple[int, ...] | None
    distractor: tuple[int, ...] | None
    arch: Arch
    pad_id: int
    width: int
    tokenizer: Any = field(repr=False, compare=False, default=None)
    read: tuple[int, ...] | None = None  # each prompt's read position (`at`), from its first token; None: the last

    @classmethod
    def of(cls, model, prompts: Prompts, target: Token | Sequence[Token] | None = None,
           distractor: Token | Sequence[Token] | None = None, *, role: str = "target",
           prepend_bos: bool | None = None) -> "Batch":
        """Validate and tokenise ``prompts`` (once) and the answer tokens for ``model``.

        A single ``target`` or ``distractor`` is shared by every prompt; a sequence gives one
        per prompt. ``role`` names the target in error messages (``"answer"`` for pairs).
        ``prompts`` may be a `Batch` already: it is reused as it is (answers given here replace
        its own), so a workflow tokenises its prompts once.

        ``prepend_bos`` (default: the model's, set by ``nnattr.load(..., prepend_bos=)``, else
        None): None keeps the tokenizer's behaviour for text and ids as given, and warns when ids
        lack the BOS token the tokenizer adds to text; True puts BOS first in every prompt that
        lacks it (TransformerLens's default); False removes a leading BOS.
        """
        tok = model.tokenizer
        if isinstance(prompts, Batch):
            if prompts.arch != arch_of(model):
                raise ValueError(f"this Batch was prepared for another model ({prompts.arch.family}, "
                                 f"{prompts.arch.n_layers} layers): build it with Batch.of(model, prompts)")
            n = len(prompts)
            batch = replace(prompts, width=max(prompts.lengths),  # a slice of a batch is a batch of its own
                            target=prompts.target if target is None else token_ids(tok, target, n, role=role),
                            distractor=prompts.distractor if distractor is None else
                            token_ids(tok, distractor, n, role="distractor"))
            check_length(model, batch.lengths, warn=False)  # warned when it was built
            batch.check_answers(batch.target, role=role)
            return batch
        if hasattr(prompts, "__array__") and not isinstance(prompts, torch.Tensor):  # numpy: its ids or texts
            prompts = prompts.tolist()
        ids, arch = _ids(tok, prompts), arch_of(model)
        _check_vocab(ids, arch.d_vocab)
        bos = getattr(model, "_nnattr_prepend_bos", None) if prepend_bos is None else prepend_bos
        ids = with_bos(tok, ids, bos, from_text=isinstance(prompts, str) or _texts(prompts))
        texts = (prompts,) if isinstance(prompts, str) else tuple(prompts) if _texts(prompts) else None
        _check_known(tok, ids, texts)
        check_length(model, tuple(map(len, ids)))
        tokens = tuple(tuple(tok.decode([i]) for i in row) for row in ids)
        labels = texts or tuple(tok.decode(row, skip_special_tokens=True) for row in ids)
        answers = token_ids(tok, target, len(ids), role=role), token_ids(tok, distractor, len(ids), role="distractor")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = cls(ids, tokens, labels, *answers, arch, 0 if pad is None else int(pad),
                    max(map(len, ids)), tok)
        batch.check_answers(batch.target, role=role)
        return batch

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(map(len, self.ids))

    def check_reference(self, prompts: "Batch", *, ablation: str, per_position: bool, from_start: bool) -> None:
        """Refuse reference prompts (this batch) whose values cannot stand in for ``prompts``' at the same position:
        per-position values are aligned at the last token, so each prompt needs reference values at all its
        positions, and a position counted from the start (``from_start``: some node at ``@p``, ``p >= 0``) names
        the same token in every prompt only where all are of one length."""
        if not (per_position or ablation == "resample"):
            return
        if max(prompts.lengths) > min(self.lengths):
            raise ValueError(f"{ablation} ablation aligns positions at the last token, so each prompt needs reference "
                             f"values at all its positions ({max(prompts.lengths)} tokens; shortest reference prompt: "
                             f"{min(self.lengths)}): give longer ones"
                             f"{', or per_position=False' * (ablation == 'mean')}")
        if from_start and len(set(prompts.lengths + self.lengths)) > 1:
            raise ValueError(f"a position counted from the start (@0, @1, ...) with {ablation} ablation: reference "
                             f"values are aligned at the last token, so with prompts and references of lengths "
                             f"{sorted(set(prompts.lengths + self.lengths))} @p would take another token's values. "
                             f"Count from the end (@-1 is the last token), give prompts and references of one length"
                             f"{', or use per_position=False' * (ablation == 'mean')}")

    def __getitem__(self, index: slice) -> "Batch":
        """The prompts ``index`` (a slice) as a batch of the same ``width``: a chunk."""
        if not isinstance(index, slice):
            raise TypeError(f"a Batch is sliced into chunks (batch[2:4]), not indexed with {index!r}")
        pick = lambda xs: None if xs is None else xs[index]  # noqa: E731
        return replace(self, ids=self.ids[index], tokens=self.tokens[index], labels=self.labels[index],
                       target=pick(self.target), distractor=pick(self.distractor), read=pick(self.read))

    def at(self, position: int | Sequence[int] | None) -> "Batch":
        """The batch read at ``position``: the token whose output a recipe reads, for each prompt.

        An int is shared by every prompt, a sequence gives one per prompt. ``0`` is a prompt's
        first token (special tokens count), negative counts from its end: ``-1`` (or None) is the
        last token, the default of every recipe.

        >>> batch.at(-3).positions, batch.at(2).read_tokens                # doctest: +SKIP
        ((12,), (' Mary',))
        """
        if position is None:
            return replace(self, read=None)
        if hasattr(position, "tolist"):  # a tensor or array
            position = position.tolist()
        many = isinstance(position, Sequence) and not isinstance(position, (str, bytes))
        given = list(position) if many else [position] * len(self)
        if isinstance(position, (str, bytes)) or len(given) != len(self):
            raise ValueError(f"position={position!r}: give one int for every prompt, or a list of {len(self)} ints")
        read = []
        for i, (p, n) in enumerate(zip(given, self.lengths)):
            why = not_an_int(p, "position")
            if why or not -n <= p < n:
                raise ValueError(f"position {p!r} for prompt {i}, which has {n} tokens{why and f' ({why})'}: give an "
                                 f"int from {-n} (its first token) to {n - 1}, or -1 for its last token")
            read.append(int(p) % n)
        return replace(self, read=tuple(read))

    @property
    def positions(self) -> tuple[int, ...]:
        """Each prompt's read position, counted from its first token (its last token by default)."""
        return tuple(n - 1 for n in self.lengths) if self.read is None else self.read

    @property
    def columns(self) -> torch.Tensor:
        """``[batch]``: each prompt's read position as a column of ``inputs`` (left-padded to ``width``)."""
        return torch.tensor([self.width - n + p for n, p in zip(self.lengths, self.positions)])

    @property
    def read_at(self) -> int | list[int] | None:
        """The read positions in short, for a result's ``meta``: None (each prompt's last token),
        one int when every prompt is read at the same place (from its start, or from its end), or
        the list of positions."""
        if self.read is None:
            return None
        from_end = {p - n for p, n in zip(self.read, self.lengths)}
        if from_end == {-1}:
            return None
        return self.read[0] if len(set(self.read)) == 1 else from_end.pop() if len(from_end) == 1 else list(self.read)

    @property
    def read_tokens(self) -> tuple[str, ...]:
        """The token at each prompt's read position."""
        return tuple(tokens[p] for tokens, p in zip(self.tokens, self.positions))

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, ``[batch, width]``, left-padded: what a trace takes."""
        rows = [(self.width - len(r), r) for r in self.ids]
        return {
            "input_ids": torch.tensor([[self.pad_id] * pad + list(r) for pad, r in rows]),
            "attention_mask": torch.tensor([[0] * pad + [1] * len(r) for pad, r in rows]),
        }

    def answer(self, role: str = "target") -> torch.Tensor | None:
        """``target`` or ``distractor`` ids as a ``[batch]`` tensor (None when not given)."""
        ids = getattr(self, role)
        return None if ids is None else torch.tensor(ids)

    def check_answers(self, target, *, role: str = "target") -> None:
        """Refuse a distractor equal to the target (given, or the model's top prediction a trace
        chose): the logit difference would be 0 by construction, a silent wrong number."""
        if target is None or self.distractor is None:
            return
        same = [i for i, (a, b) in enumerate(zip(target, self.distractor)) if int(a) == b]
        if same:
            i = same[0]
            what = f"the {role}" if self.target is not None else "the model's top prediction (the default target)"
            raise ValueError(f"prompt {i}: {what} and the distractor are the same token "
                             f"{self.tokenizer.decode([self.distractor[i]])!r}, so their logit difference is 0 by "
                             f"construction; pass a target, or another distractor")

    def metric(self, target=None) -> str:
        """The default metric in words: ``"logit(' Mary') − logit(' John')"``, or ``logit(target)``
        when prompts differ. ``target``: the answer ids a trace chose (the model's top prediction)."""
        target = self.target if target is None else tuple(int(t) for t in target)

        def logit(ids, role):
            if ids is None:
                return None
            return f"logit({self.tokenizer.decode([ids[0]])!r})" if len(set(ids)) == 1 else f"logit({role})"

        answer = logit(target, "target" if self.target else "top prediction") or "logit(top prediction)"
        other = logit(self.distractor, "distractor")
        return answer if other is None else f"{answer} − {other}"

    def decode(self, ids) -> list[str]:
        """Token strings of ids (a list or tensor): ``[" Mary", ...]``."""
        return [self.tokenizer.decode([int(i)]) for i in ids]


#: Config keys holding a model's number of positions, in the order they are read.
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
_FORMS = ("pass text (a str), a list of texts, token ids (a list of ints, a list of such lists, or an integer "
          "tensor [pos] or [batch, pos]), an encoding {'input_ids', 'attention_mask'}, or a Batch")


def check_length(model, lengths: Sequence[int], *, warn: bool = True) -> None:
    """Refuse prompts longer than the positions of a model with learned absolute position
    embeddings (GPT-2: they would fail deep in the embedding with ``IndexError``); warn for other
    (rotary) models, which run past ``max_position_embeddings`` but beyond what they were trained on."""
    config = getattr(model, "config", model)
    key = next((k for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    long = [(i, n) for i, n in enumerate(lengths) if key is not None and n > getattr(config, key)]
    if not long:
        return
    limit, (i, n) = getattr(config, key), long[0]
    where = f"prompt {i} has {n} tokens" + (f" ({len(long)} prompts are too long: {[j for j, _ in long][:8]})"
                                            if len(long) > 1 else "")
    if spec_for(model).pos_embed:
        raise ValueError(f"{where}, but the model has {limit} positions ({key}={limit} in its config, one learned "
                         f"embedding each): shorten it to at most {limit} tokens, e.g. keep its last {limit}")
    if warn:
        warnings.warn(f"{where}, more than {key}={limit} in the model's config: its rotary positions go past the "
                      f"length it was trained for, so its outputs and their attributions may be unreliable; "
                      f"shorten it to at most {limit} tokens", stacklevel=3)


def with_bos(tokenizer, ids: tuple[tuple[int, ...], ...], prepend: bool | None, *, from_text: bool):
    """Each prompt's ids with its leading BOS token as ``prepend`` asks (see `Batch.of`)."""
    bos = tokenizer.bos_token_id
    if prepend is not None and not isinstance(prepend, bool):
        raise TypeError(f"prepend_bos={prepend!r}: give True, False or None (the tokenizer's behaviour)")
    if bos is None:
        if prepend:
            raise ValueError("prepend_bos=True, but this tokenizer has no BOS token: leave prepend_bos unset")
        return ids
    if prepend:
        return tuple(row if row[:1] == (bos,) else (bos, *row) for row in ids)
    if prepend is False:
        return tuple(row[1:] if row[:1] == (bos,) and len(row) > 1 else row for row in ids)
    lacking = [] if from_text else [i for i, row in enumerate(ids) if row[:1] != (bos,)]
    if lacking and tokenizer("a")["input_ids"][:1] == [bos]:  # the tokenizer puts BOS before text
        which = f"prompts {lacking[:8]} do" if len(lacking) > 1 else f"prompt {lacking[0]} does"
        warnings.warn(f"{which} not start with the BOS token {tokenizer.bos_token!r}, which this tokenizer puts "
                      f"before text (the model was most likely trained with it, and without it its numbers can "
                      f"differ a lot): pass prepend_bos=True to add it, or prepend_bos=False to silence this",
                      stacklevel=3)
    return ids


def _not_a_prompt(p, i: int | None = None) -> TypeError:
    """A TypeError naming the prompt (``i``; None: the whole ``prompts`` argument), its type and the fix."""
    what = "prompts" if i is None else f"prompt {i}"
    if isinstance(p, (bytes, bytearray)):
        return TypeError(f"{what} is {type(p).__name__} ({bytes(p[:40])!r}), not text: decode it first "
                         f"(.decode('utf-8'))")
    shown = "None" if p is None else f"{repr(p)[:40]} ({type(p).__name__})"
    fix = _FORMS if i is None else "in a list, every prompt is text (a str), or every one a list of int token ids"
    return TypeError(f"{what} is {shown}: {fix}")


def as_prompts(prompts: Sequence[str] | str) -> list[str]:
    """One text prompt or many, as a non-empty list of non-empty strings."""
    if prompts is None or isinstance(prompts, (bytes, bytearray, numbers.Number)) or not isinstance(prompts, Iterable):
        raise _not_a_prompt(prompts)
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompts given: pass a string or a list of strings")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise _not_a_prompt(p, i)
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    return items


def token_id(tokenizer, token: Token, *, role: str = "target") -> int:
    """The id of a single-token string or an id, or a clear error.

    Strings are encoded without special tokens and must give exactly one token that is not
    the tokenizer's unknown token. Write the leading space where the tokenizer expects one
    (GPT-2: ``" Mary"``).
    """
    vocab = len(tokenizer)
    if isinstance(token, numbers.Real) and not isinstance(token, (bool, numbers.Integral)):  # 5.0, np.float32
        if not float(token).is_integer():
            raise ValueError(f"{role} id {token!r} is not a whole number: pass an int token id, or a token string")
        token = int(token)
    if isinstance(token, numbers.Integral) and not isinstance(token, bool):  # numpy ints too
        token = int(token)
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise TypeError(f"{role} must be a token string or an int id, got {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise ValueError(f"{role} id {token} is outside the vocabulary [0, {vocab})")
        return token
    if token == "":
        raise ValueError(f"{role} is an empty string: pass one token, e.g. ' Mary'")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(ids) != 1:
        raise ValueError(
            f"{role} {token!r} is {len(ids)} tokens {pieces}: it must be a single token. "
            f"Pick one token (e.g. the first, {pieces[0]!r}) or pass its id."
            if ids
            else f"{role} {token!r} encodes to no tokens"
        )
    unk = tokenizer.unk_token_id
    if unk is not None and ids[0] == unk and token != tokenizer.unk_token:
        raise ValueError(f"{role} {token!r} is not in the vocabulary (it encodes to the unknown token)")
    return ids[0]


def token_ids(tokenizer, tokens: Token | Sequence[Token] | None, n: int, *, role: str) -> tuple[int, ...] | None:
    """One id per prompt: a single token is shared by all prompts, a sequence gives one each."""
    if tokens is None:
        return None
    if hasattr(tokens, "tolist"):  # a tensor or array of ids (0-d: one id for every prompt)
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes, numbers.Number)):
        return (token_id(tokenizer, tokens, role=role),) * n
    tokens = list(tokens)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} {role}s for {n} prompts: give one {role}, or one per prompt")
    return tuple(token_id(tokenizer, t, role=role) for t in tokens)


def _texts(prompts) -> bool:
    return isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(p, str) for p in prompts)


def _ids(tokenizer, prompts: Prompts) -> tuple[tuple[int, ...], ...]:
    """Each prompt's token ids, unpadded."""
    if isinstance(prompts, Mapping):  # an encoding: drop padding by its mask
        if "input_ids" not in prompts:
            raise TypeError(f"prompts is a {type(prompts).__name__} with keys {list(prompts)[:8]}, not an encoding: "
                            f"an encoding holds 'input_ids' (token ids [pos] or [batch, pos]) and optionally "
                            f"'attention_mask', as tokenizer(texts) returns; pass text as a str or a list of str")
        ids = torch.as_tensor(prompts["input_ids"])
        mask = torch.as_tensor(prompts.get("attention_mask", torch.ones_like(ids)))
        if ids.ndim == 1:
            ids, mask = ids[None], mask[None]
        return tuple(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)) or _none()
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim not in (1, 2) or prompts.dtype.is_floating_point:
            raise ValueError(f"token ids must be an integer tensor [pos] or [batch, pos], got {prompts.dtype} "
                             f"{tuple(prompts.shape)}; pass an encoding with its attention_mask for padded rows")
        rows = prompts[None] if prompts.ndim == 1 else prompts
        return tuple(tuple(row.tolist()) for row in rows) or _none()
    if isinstance(prompts, (list, tuple)) and prompts and all(map(_is_id, prompts)):
        return (tuple(map(int, prompts)),)  # one prompt's ids
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (list, tuple)) for p in prompts):
        for i, row in enumerate(prompts):
            if not row or not all(map(_is_id, row)):
                bad = next((t for t in row if not _is_id(t)), None)
                raise ValueError(f"prompt {i} must be a non-empty list of int token ids" +
                                 ("" if bad is None else f"; it holds {bad!r} ({type(bad).__name__})"))
        return tuple(tuple(map(int, row)) for row in prompts)
    return tuple(tuple(tokenizer(p)["input_ids"]) for p in as_prompts(prompts))


def _check_vocab(ids: tuple[tuple[int, ...], ...], vocab: int) -> None:
    """Refuse token ids the model has no embedding for (they would fail deep inside torch)."""
    for i, row in enumerate(ids):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary [0, {vocab}) "
                             f"(ids index its embedding, of {vocab} tokens)")


def not_an_int(value, what: str) -> str:
    """Why ``value`` cannot be a ``what`` (a position, a layer): "" for an int or a numpy int,
    else a clause naming its type (a bool is not a number here, and a float is not an index)."""
    if isinstance(value, bool):
        return f"{value!r} is a bool, not a {what}"
    if isinstance(value, numbers.Integral):
        return ""
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return f"{value!r} is a {type(value).__name__}: write it as the int {int(value)}"
    return f"{value!r} is a {type(value).__name__}, not an int"


def prompt_groups(data: Iterable, size: int | None) -> Iterator[list[str]]:
    """A dataset's prompts in groups, in their order: ``data`` yields prompts (str, grouped ``size``
    at a time; None: all loose prompts together) or batches (lists or tuples of str, each its own
    group). One str is one prompt. Any other item is a TypeError naming it (a list or tuple of
    items is checked whole before any group is given); a dict is refused (keys or values?)."""
    fix = "give a prompt (a str), or an iterable of prompts (str) or batches (lists of str)"
    if isinstance(data, Mapping):
        raise TypeError(f"data is a {type(data).__name__} of {len(data)} entries, which would run its keys: {fix}; "
                        f"pass list(data) or list(data.values()), whichever holds the prompts")
    if isinstance(data, (bytes, bytearray)) or not isinstance(data, Iterable):
        raise TypeError(f"data is {_shown(data)}: {fix}")
    items = [data] if isinstance(data, str) else data
    if isinstance(items, (list, tuple)):
        for i, item in enumerate(items):
            _check_item(i, item)

    def groups():
        group = []
        for i, item in enumerate(items):
            if _check_item(i, item):
                group.append(item)
            if group and (len(group) == size or not isinstance(item, str)):
                yield group
                group = []
            if not isinstance(item, str):
                yield list(item)
        if group:
            yield group

    return groups()


def _check_item(i: int, item) -> bool:
    """True for a prompt, False for a batch of prompts; a TypeError (or ValueError) otherwise."""
    if isinstance(item, str):
        return True
    if isinstance(item, (list, tuple)):
        bad = next(((j, p) for j, p in enumerate(item) if not isinstance(p, str)), None)
        if bad is None and item:
            return False
        if bad is None:
            raise ValueError(f"data item {i} is an empty batch: a batch holds at least one prompt")
        raise TypeError(f"data item {i} is a batch ({type(item).__name__}) holding {_shown(bad[1])} at {bad[0]}: "
                        f"a batch is a list or tuple of prompts (str)")
    raise TypeError(f"data item {i} is {_shown(item)}: each item is a prompt (a str) or a batch of prompts "
                    f"(a list or tuple of str)")


def _shown(x) -> str:
    return "None" if x is None else f"{repr(x)[:40]} ({type(x).__name__})"


def _is_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _none():
    raise ValueError("no prompts given: the token ids hold no rows")


def _check_known(tokenizer, ids, texts) -> None:
    """Refuse prompts with words a word-level tokenizer does not know (they would silently
    become the unknown token). Sub-word tokenizers never produce it for ordinary text."""
    unk = tokenizer.unk_token_id
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if unk is not None and unk in row:
            words = [w for w in (texts[i].split() if texts else [])
                     if tokenizer(w, add_special_tokens=False)["input_ids"] == [unk]]
            raise ValueError(f"prompt {i} has tokens not in the vocabulary: {words or row}")


__all__ = ["Batch", "Prompts", "Token", "as_prompts", "check_length", "not_an_int", "prompt_groups", "token_id",
           "token_ids"]
