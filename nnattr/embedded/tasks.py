"""Seeded synthetic tasks for the embedded model: IOI and induction.

Every word is one token of the embedded word-level tokenizer (see ``vocabulary``), and every
generator is a pure function of its arguments: the same ``seed`` and ``split`` give the same
data on every machine (``random.Random`` plus ``zlib.crc32``, never Python's salted ``hash``).

Held-out split. IOI prompts are split by the unordered name pair: about a fifth of all pairs
(chosen by a checksum) appear only in ``split="test"``, so no test prompt is a training prompt.
Induction sequences are split by a checksum of their repeated run (one run in ten is test).

Answers follow the GPT-2 convention of a leading space (``" Mary"``); the word-level tokenizer
maps ``" Mary"`` and ``"Mary"`` to the same single token.

>>> ioi_prompts(1, seed=0, split="test")[0]["prompt"]
'Since Dan and Hannah were hungry at the garden, Hannah brought a cake to'
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Literal

Split = Literal["train", "test"]

NAMES = tuple("""
Mary John Alice Bob Anna Tom Sarah James Emma David Lisa Paul Kate Mark Laura Peter Julia Sam
Rose Jack Ellen Henry Grace Adam Lucy Brian Helen Kevin Amy Steve Diana Eric Clara Frank Nina
Oscar Rachel Tim Sophie Victor Hannah Max Irene Leo Olivia Ryan Vera Carl Jane Dan
""".split())

PLACES = tuple("""
store park school market library station garden beach museum office hospital restaurant
kitchen church farm river bank theater cafe airport
""".split())

OBJECTS = tuple("""
drink book ring bone kiss basketball letter computer necklace flower apple pen hat ticket
cake key bag phone gift camera
""".split())

# {A} and {B} are the two names of the first clause; {S} is the subject, repeated later.
# The indirect object is whichever of A and B is not S.
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "When {A} and {B} arrived at the {place}, {S} handed the {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "{A} and {B} had a long talk at the {place}, and afterwards {S} said goodbye to",
    "The {place} was quiet when {A} and {B} got there, so {S} passed a {object} to",
    "Yesterday {A} and {B} visited the {place}, and {S} sent a {object} to",
    "At the {place}, {A} and {B} were talking, then {S} threw the {object} to",
    "Once {A} and {B} bought a {object} at the {place}, {S} decided to give it to",
    "Since {A} and {B} were hungry at the {place}, {S} brought a {object} to",
)

FILLER = tuple("""
time year people way day man thing woman life child world school state family student group
country problem hand part case week company system program question work government number
night point home water room mother area money story fact month lot right study job word
business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea kid body information back parent face
others level door health person art war history party result change morning reason research
girl guy moment air teacher force education foot boy age policy process music market sense
nation plan college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report decision son
view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple
site project activity star table need court oil situation cost industry figure street image
phone data picture practice piece land product doctor wall patient worker news test movie north
love support technology step baby computer type attention film tree source organization hair
window evidence population truth song camera box animal army fire glass island bird stone shoe
sky cloud rain snow wind ocean lake hill forest desert valley bridge tower castle village
engine wheel rocket planet moon sun metal silver gold iron copper salt sugar bread milk cheese
egg rice soup tea coffee juice pepper onion carrot potato tomato lemon orange banana grape
cherry melon horse cow sheep pig goat duck chicken mouse rabbit tiger lion bear wolf fox deer
snake frog fish whale shark eagle owl bee ant spider blue red green yellow purple brown black
white pink gray quick slow happy sad brave calm bright dark soft hard warm cold wet dry loud
quiet sharp round flat deep tall short young old rich poor clean dirty fresh empty heavy
""".split())


def vocabulary() -> list[str]:
    """All words the tasks use, sorted: the word-level tokenizer's vocabulary, minus specials.

    Words are split as the ``tokenizers`` ``Whitespace`` pre-tokenizer splits them
    (``\\w+|[^\\w\\s]+``), so punctuation is its own token.
    """
    text = " ".join(TEMPLATES + NAMES + PLACES + OBJECTS + FILLER)
    text = re.sub(r"\{\w+\}", " ", text)
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text)) | set(NAMES + PLACES + OBJECTS + FILLER))


def _is_test(key: str, *, every: int) -> bool:
    """Deterministic held-out membership: one key in ``every`` goes to the test split."""
    return zlib.crc32(key.encode()) % every == 0


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def name_pairs(split: Split) -> list[tuple[str, str]]:
    """Unordered name pairs (sorted tuples) of a split; train and test are disjoint."""
    _check_split(split)
    pairs = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1 :]]
    return [p for p in pairs if _is_test(" ".join(sorted(p)), every=5) == (split == "test")]


def _fill(template: int, first: str, second: str, subject: str, place: str, obj: str) -> str:
    return TEMPLATES[template].format(A=first, B=second, S=subject, place=place, object=obj)


def ioi_prompts(n: int, *, seed: int, split: Split = "train") -> list[dict]:
    """``n`` IOI prompts, half in order ABB and half BAB (alternating).

    Each item: ``prompt`` (ends just before the indirect object), ``answer`` (the indirect
    object, e.g. ``" Mary"``), ``distractor`` (the subject), ``order`` ("ABB" or "BAB": A is
    the indirect object, B the subject), ``template`` (index into ``TEMPLATES``), ``io``,
    ``s``, ``place``, ``object``.
    """
    rng = random.Random(f"ioi-{split}-{seed}")
    pairs = name_pairs(split)
    out = []
    for i in range(n):
        io, s = rng.sample(rng.choice(pairs), 2)
        order = "ABB" if i % 2 == 0 else "BAB"
        first, second = (io, s) if order == "ABB" else (s, io)
        template = rng.randrange(len(TEMPLATES))
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        out.append({
            "prompt": _fill(template, first, second, s, place, obj),
            "answer": " " + io,
            "distractor": " " + s,
            "order": order,
            "template": template,
            "io": io,
            "s": s,
            "place": place,
            "object": obj,
        })
    return out


def ioi_pairs(n: int, *, seed: int, split: Split = "test") -> list[dict]:
    """``n`` clean/corrupted IOI pairs whose prompts have identical token lengths.

    The corrupted prompt repeats the indirect object instead of the subject at the second
    mention (``..., John gave a drink to`` becomes ``..., Mary gave a drink to``), so its
    correct answer is the clean ``distractor`` and vice versa: the answer flips while every
    other token stays in place (the "S2 flip" corruption of Wang et al. 2022).

    Each item: ``clean``, ``corrupted``, ``answer`` and ``distractor`` (for the clean prompt;
    swap them for the corrupted one), plus ``order`` and ``template``.
    """
    out = []
    for p in ioi_prompts(n, seed=seed, split=split):
        first, second = (p["io"], p["s"]) if p["order"] == "ABB" else (p["s"], p["io"])
        corrupted = _fill(p["template"], first, second, p["io"], p["place"], p["object"])
        out.append({
            "clean": p["prompt"],
            "corrupted": corrupted,
            "answer": p["answer"],
            "distractor": p["distractor"],
            "order": p["order"],
            "template": p["template"],
        })
    return out


def induction_sequences(n: int, *, length: int, seed: int, split: Split = "train",
                        prefix: int = 0) -> list[str]:
    """``n`` strings of ``length`` distinct random filler words, then the same words again.

    Each string has ``prefix + 2 * length`` words: ``prefix`` random words that do not repeat,
    then the repeated run. From the first word of the second run on, every next word is
    predictable by induction (``A B ... A -> B``).
    """
    _check_split(split)
    if not 2 <= length <= (len(FILLER) - prefix):
        raise ValueError(f"length must be in [2, {len(FILLER) - prefix}], got {length}")
    rng = random.Random(f"induction-{split}-{seed}-{prefix}")
    out = []
    while len(out) < n:
        words = rng.sample(FILLER, prefix + length)
        half = " ".join(words[prefix:])
        if _is_test(half, every=10) == (split == "test"):
            out.append(" ".join(words[:prefix] + [half, half]))
    return out


__all__ = [
    "NAMES", "PLACES", "OBJECTS", "TEMPLATES", "FILLER", "vocabulary", "name_pairs",
    "ioi_prompts", "ioi_pairs", "induction_sequences",
]
