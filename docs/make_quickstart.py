"""Regenerate the quickstart's figures from the shipped weights, and check every number its text quotes.

    python docs/make_quickstart.py            # figures into docs/img/quickstart/, then check the text
    python docs/make_quickstart.py --check    # only check the text (tests/test_docs.py runs this)

The text of docs/quickstart.md is written by hand; this script says which of its quoted numbers,
tokens and printed tables no longer match the embedded model, so a retrained model cannot leave
the page describing the old one. The page screenshot (report_page.png) is taken separately; see
the comment at the end of docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGE = DOCS / "quickstart.md"
FIGURES = DOCS / "img" / "quickstart"


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def facts() -> list[str]:
    """The phrases the quickstart must contain, computed now from the embedded model."""
    import nnattr
    from nnattr.cli import EXAMPLE, main
    from nnattr.recipes import attention_rollout, direct_logit_attribution, logit_lens

    model = nnattr.load("tiny-ioi")
    clean, target, distractor = EXAMPLE["clean"], EXAMPLE["target"], EXAMPLE["distractor"]
    dla = direct_logit_attribution.run(model, clean, target, distractor)[0]
    part = dict(zip(dla.labels["component"], dla.values.tolist()))
    l2 = part["2_attn_out"]
    sign = "slightly negative, −" if l2 < 0 else "slightly positive, +"
    said = [f"(+{part['1_attn_out']:.2f} of +{dla.meta['logit']:.2f}; layer 2's attention is {sign}{abs(l2):.2f})"]

    tops = [row[-1][0] for row in logit_lens.run(model, clean, target, positions="last")[0].meta["top_tokens"]]
    answer = target.strip()
    if all(t == answer for t in tops[2:]):
        said.append(f"after the embedding the model predicts `{tops[0]}` again, after layer 0 `{tops[1]}`, and from "
                    f"layer 1 on it predicts `{answer}`")
    else:
        said.append(f"the lens's top tokens by layer are now {tops}: rewrite section 4")

    rollout = attention_rollout.run(model, clean)[0]
    ranked = sorted(zip(rollout.values[-1].tolist(), rollout.labels["key"]), reverse=True)
    token = lambda label: label.split(":", 1)[1]  # noqa: E731  "10:John" -> "John"
    said.append(f"the final `to` draws most on the second `{token(ranked[0][1])}` ({ranked[0][0]:.2f})")
    said.append("(" + ", ".join(f"`{token(label)}` {value:.2f}" for value, label in ranked[1:5]) + ")")

    from nnattr.features import SAE
    from nnattr.lens import TunedLens, kl_by_layer
    from nnattr.embedded.train_lens import HELDOUT_SEED, HELDOUT_TEXTS, texts
    from nnattr.recipes import feature_attribution, token_attribution, token_circulation

    heldout = texts(HELDOUT_TEXTS, seed=HELDOUT_SEED, split="test")
    lens = TunedLens.load("tiny-ioi")
    logit, tuned = kl_by_layer(model, heldout).tolist(), kl_by_layer(model, heldout, lens).tolist()
    said.append(f"(KL {logit[0]:.3f} nats at the embeddings, {logit[2]:.3f} after layer 1); the tuned lens is much "
                f"closer ({tuned[0]:.3f} and {tuned[2]:.3f})")
    circ = token_circulation.run(model, clean, target, distractor)
    ranks = [row[-1] for row in circ.per_prompt["rank"][0]]
    said.append(f"the rank of `{answer}` goes {ranks[0]} → {ranks[1]} → {ranks[2]}: the model starts pointing at the "
                f"answer after layer 1, whose attention writes {circ.per_prompt['attn'][0][1][-1]:+.1f} of it")
    ig = token_attribution.run(model, clean, target, distractor, baseline="pad")[0]
    (top1, v1), (top2, v2) = [(labels[0].split(":", 1)[1], v) for labels, v in ig.top(2)]
    said.append(f"`{top1}` carries the most ({v1:+.1f}), then `{top2}` ({v2:+.1f})")
    said.append(f"up to a completeness error of {abs(ig.meta['completeness_error']):.3g} at {ig.meta['steps']} steps")
    features = feature_attribution.run(model, clean, target, distractor, sae=SAE.load("tiny-ioi"))[0]
    named = dict(zip(features.labels["component"], features.values.tolist()))
    (f1, a1), (f2, a2) = [(c.split("/f")[1], v) for c, v in sorted(named.items(), key=lambda kv: -abs(kv[1]))
                          if "/f" in c][:2]
    said.append(f"features {f1} ({a1:+.2f}) and {f2} ({a2:+.2f}) carry the most, and the SAE's error "
                f"{named['resid_pre.2/error']:+.2f}")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["dla", "--by", "head", "--top", "5"])
    said += [line for line in printed.getvalue().splitlines() if line.strip()]
    return said


def check(text: str | None = None) -> list[str]:
    """What the page says that the model no longer does: the missing phrases, and known falsehoods."""
    text = PAGE.read_text() if text is None else text
    missing = [f"not in the page: {phrase!r}" for phrase in facts() if _flat(phrase) not in _flat(text)]
    if "pip install nnattr" in text:
        missing.append("the page says `pip install nnattr`, but no package index serves nnattr")
    return missing


def regenerate() -> None:
    """``nnattr report`` on the built-in example; its figures replace docs/img/quickstart/*.png."""
    from nnattr.cli import main

    with tempfile.TemporaryDirectory() as out:
        if main(["report", "--out", out]) != 0:
            raise SystemExit("nnattr report failed: the figures were not replaced")
        for png in sorted(Path(out).glob("*.png")):
            if (FIGURES / png.name).exists():  # the figures the page shows
                shutil.copy(png, FIGURES / png.name)
                print(f"wrote {FIGURES.relative_to(DOCS.parent) / png.name}")


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the text")
    args = parser.parse_args(argv)
    if not args.check:
        regenerate()
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    print("docs/quickstart.md agrees with the embedded model" if not problems else
          f"{len(problems)} statement(s) of docs/quickstart.md to rewrite")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(run())
