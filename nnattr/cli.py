"""The ``nnattr`` command: a subcommand per recipe, and ``nnattr report`` (the main job).

    nnattr report                                    # embedded model, built-in IOI pair
    nnattr dla --prompt "When Mary and John went to the store, John gave a drink to" \\
        --target " Mary" --distractor " John" --by head --out results/
    nnattr logit-lens --model gpt2 --prompts-file prompts.txt --positions all
    python -m nnattr.recipes.attention_rollout --view flow      # the same, per recipe

Exit status: 0 on success, 2 for a usage error (argparse names the problem), 1 when nnattr
refuses the input (a multi-token target, an unknown word, ...): one ``error:`` line, no
traceback. Without ``--prompt`` the built-in IOI example and its answers are used.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "tiny-ioi"
EXAMPLE = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "target": " Mary",
    "distractor": " John",
}


@dataclass(frozen=True)
class Recipe:
    module: str  # recipes/<module>.py, imported as nnattr.recipes.<module>
    command: str
    aliases: tuple[str, ...]
    help: str
    answers: bool = True  # takes --target / --distractor
    pairs: bool = False  # needs --corrupted


RECIPES = (
    Recipe("direct_logit_attribution", "dla", ("direct-logit-attribution",),
           "direct logit attribution by component, layer, head or head and position"),
    Recipe("head_attribution", "head-attribution", (), "gradient x activation per attention head"),
    Recipe("logit_lens", "logit-lens", (), "decode every layer's residual stream"),
    Recipe("attention_rollout", "rollout", ("attention-rollout",),
           "attention rollout, value-weighted rollout or per-head flow", answers=False),
    Recipe("attribution_patching", "attribution-patching", (),
           "attribution patching (gradient estimate of activation patching) on clean/corrupted pairs", pairs=True),
    Recipe("activation_patching", "activation-patching", (),
           "exact activation patching on clean/corrupted pairs (all nodes, or attribution's top candidates)",
           pairs=True),
)
# Node types of recipes/attribution_patching.py (NODES there; a test keeps the two equal).
NODES = ("resid", "attn", "attn_pos", "mlp", "mlp_pos", "head", "head_pos")


class UsageError(Exception):
    """A problem with the command line found after parsing (exit 2)."""


def available(recipe: Recipe) -> bool:
    return importlib.util.find_spec(f"nnattr.recipes.{recipe.module}") is not None


def main(argv=None) -> int:
    """Entry point of ``nnattr`` and ``python -m nnattr``; returns the exit status."""
    parser = _parser()
    return _run(parser, argv)


def recipe_main(name: str, argv=None) -> int:
    """Entry point of ``python -m nnattr.recipes.<name>``: the recipe's subcommand alone."""
    recipe = next(r for r in RECIPES if r.module == name)
    parser = argparse.ArgumentParser(prog=f"python -m nnattr.recipes.{name}", description=recipe.help)
    _recipe_options(parser, recipe)
    parser.set_defaults(recipe=recipe, parser=parser)
    return _run(parser, argv)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nnattr",
        description="Attribution for transformer language models on nnsight. "
        "`nnattr report` runs the whole workflow on the embedded model.",
    )
    parser.add_argument("--version", action="version", version=f"nnattr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser("report", help="run the standard workflow and write an HTML report",
                            description="DLA, head attribution, logit lens, rollout and (when available) "
                            "attribution patching with exact patching, written to one folder.")
    _common(report, answers=True, pairs=True, out_default="nnattr-report")
    report.add_argument("--corrupted", action="append", metavar="TEXT",
                        help="corrupted prompt paired with each --prompt (repeatable)")
    report.add_argument("--top", type=_positive, default=10, metavar="K",
                        help="attribution-patching candidates confirmed by exact patching (default 10)")
    report.set_defaults(recipe=None, parser=report)
    for recipe in RECIPES:
        if recipe.pairs and not available(recipe):
            continue
        p = sub.add_parser(recipe.command, aliases=list(recipe.aliases), help=recipe.help, description=recipe.help)
        _recipe_options(p, recipe)
        p.set_defaults(recipe=recipe, parser=p)
    return parser


def _common(p: argparse.ArgumentParser, *, answers: bool, pairs: bool = False, out_default: str | None = None):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face repo id, local folder or embedded short name (default {DEFAULT_MODEL})")
    given = p.add_mutually_exclusive_group()
    given.add_argument(*(["--prompt", "--clean"] if pairs else ["--prompt"]), dest="prompt", action="append",
                       metavar="TEXT", help="a prompt (repeatable)" + (", the clean one of a pair" if pairs else ""))
    given.add_argument("--prompts-file", type=Path, metavar="FILE",
                       help="one prompt per line, or JSON lines with clean/corrupted/answer/distractor")
    if answers:
        p.add_argument("--target", metavar="TOKEN",
                       help="answer token, e.g. ' Mary' (default: the model's top prediction)")
        p.add_argument("--distractor", metavar="TOKEN", help="score target minus this token, e.g. ' John'")
    p.add_argument("--out", type=Path, default=None if out_default is None else Path(out_default), metavar="DIR",
                   help="folder for the results" + (f" (default {out_default})" if out_default else " (JSON + PNG)"))
    p.add_argument("--device", metavar="DEVICE",
                   help="where to load a local model: cpu (default), cuda, cuda:1, auto (needs accelerate)")
    p.add_argument("--batch-size", type=_positive, metavar="N", help="prompts per forward pass")
    from .remote import add_cli_arguments

    add_cli_arguments(p)  # --remote, --ndif-host


def _recipe_options(p: argparse.ArgumentParser, recipe: Recipe) -> None:
    _common(p, answers=recipe.answers, pairs=recipe.pairs)
    p.add_argument("--top", type=_positive, default=10, metavar="K", help="rows in the printed table (default 10)")
    if recipe.pairs:
        p.add_argument("--corrupted", action="append", metavar="TEXT", help="corrupted prompt per --prompt")
        p.add_argument("--nodes", nargs="+", choices=NODES, metavar="TYPE",
                       help=f"node types to score, from {', '.join(NODES)} (default resid attn mlp head)")
    if recipe.module == "attribution_patching":
        p.add_argument("--method", choices=["atp", "ig"], default="atp",
                       help="plain gradient (atp) or integrated gradients (ig)")
        p.add_argument("--steps", type=_positive, default=5, help="interpolation steps for --method ig")
    elif recipe.module == "activation_patching":
        p.add_argument("--top-candidates", type=_positive, metavar="K",
                       help="patch only attribution patching's top K nodes per type (default: every node)")
    if recipe.module == "direct_logit_attribution":
        p.add_argument("--by", choices=["component", "layer", "head", "head_position"], default="component")
    elif recipe.module == "head_attribution":
        p.add_argument("--by", choices=["head", "head_position"], default="head")
    elif recipe.module == "logit_lens":
        p.add_argument("--positions", choices=["last", "all"], default="all",
                       help="decode every position (default) or the last only")
        p.add_argument("--k", type=_positive, default=5, help="top tokens kept per cell (default 5)")
    elif recipe.module == "attention_rollout":
        p.add_argument("--view", choices=["rollout", "value_weighted", "flow"], default="rollout")
        p.add_argument("--residual", type=float, default=0.5, help="identity weight mixed in (default 0.5)")
        p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _remote_options(args) -> dict:
    """Keyword arguments every recipe receives for local or remote execution: the one place
    where ``--remote`` and ``--ndif-host`` become recipe options (``nnattr.remote`` checks the
    key and the service before the first request)."""
    from .remote import remote_kwargs

    return remote_kwargs(args)


def _run(parser: argparse.ArgumentParser, argv) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors
        return int(stop.code or 0)
    try:
        inputs = _inputs(args)
    except UsageError as error:  # argparse's format, without its SystemExit
        args.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{args.parser.prog}: error: {error}\n")
        return 2
    _quiet_when_piped()
    try:
        model = _load_model(args)
        if args.recipe is None:
            from .report import write_report

            return write_report(model, **inputs, model_name=args.model, out=args.out, top=args.top,
                                batch_size=args.batch_size, options=_remote_options(args))
        return _run_recipe(args, model, inputs)
    except (ValueError, _remote_error()) as error:  # nnattr refusing the input, or NDIF saying why not
        sys.stderr.write(f"error: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def _remote_error() -> type:
    from .remote import NDIFError

    return NDIFError


def _inputs(args) -> dict:
    """Prompts, corrupted prompts and answers from the flags, a file, or the built-in example."""
    if args.remote and args.device:
        raise UsageError("--device: a --remote model runs on NDIF's devices, not on a local one")
    corrupted = getattr(args, "corrupted", None)
    target, distractor = getattr(args, "target", None), getattr(args, "distractor", None)
    if args.prompts_file is not None:
        prompts, from_file = _read_prompts(args.prompts_file)
        if from_file["corrupted"] is not None:
            if corrupted:
                raise UsageError("--corrupted: the prompts file already gives corrupted prompts")
            corrupted = from_file["corrupted"]
        target = target if target is not None else from_file["target"]
        distractor = distractor if distractor is not None else from_file["distractor"]
    elif args.prompt:
        prompts = args.prompt
    else:
        prompts = [EXAMPLE["clean"]]
        corrupted = corrupted or [EXAMPLE["corrupted"]]
        if hasattr(args, "target"):
            target = EXAMPLE["target"] if target is None else target
            distractor = EXAMPLE["distractor"] if distractor is None else distractor
        sys.stderr.write(f"no --prompt given: using the built-in example {prompts[0]!r}\n")
    if corrupted is not None and len(corrupted) != len(prompts):
        raise UsageError(f"--corrupted: {len(corrupted)} corrupted prompts for {len(prompts)} prompts; "
                         f"give one per prompt")
    if getattr(args.recipe, "pairs", False) and corrupted is None:
        raise UsageError("--corrupted: this command needs a corrupted prompt for every prompt")
    return {"prompts": prompts, "corrupted": corrupted, "target": target, "distractor": distractor}


def _read_prompts(path: Path):
    """Prompts (and, from JSON lines, corrupted prompts and answers) from a file."""
    if not path.is_file():
        raise UsageError(f"--prompts-file: no such file: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UsageError(f"--prompts-file: {path} holds no prompts")
    fields = {"corrupted": None, "target": None, "distractor": None}
    if path.suffix != ".jsonl":
        return lines, fields
    try:
        rows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as error:
        raise UsageError(f"--prompts-file: {path} is not JSON lines ({error})") from None
    key = "clean" if isinstance(rows[0], dict) and "clean" in rows[0] else "prompt"
    for name, keys in ((key, (key,)), ("corrupted", ("corrupted",)), ("target", ("target", "answer")),
                       ("distractor", ("distractor",))):
        found = next((k for k in keys if isinstance(rows[0], dict) and k in rows[0]), None)
        if found is None:
            continue
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get(found), str):
                raise UsageError(f"--prompts-file: line {i + 1} of {path} has no {found!r} text")
        fields[name] = [row[found] for row in rows]
    if fields.get(key) is None:
        raise UsageError(f"--prompts-file: {path} needs a 'clean' or 'prompt' field on every line")
    return fields.pop(key), fields


def _quiet_when_piped() -> None:
    """No progress bars (ours are off already when not a terminal; transformers' are not)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging

        logging.disable_progress_bar()


def _load_model(args):
    import nnattr

    kwargs = {}
    if args.device not in (None, "cpu"):  # cpu is where a local model loads anyway
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"--device {args.device} needs the accelerate package: pip install accelerate")
        kwargs["device_map"] = args.device
    if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().is_dir():
        raise ValueError(f"no model folder at {args.model!r}")
    source = str(Path(args.model).expanduser()) if args.model.startswith("~") else args.model
    try:
        return nnattr.load(source, **kwargs)
    except (OSError, ValueError) as error:  # Hub and transformers errors: their first line says it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load model {args.model!r}: {first}") from None


def _run_recipe(args, model, inputs) -> int:
    recipe = args.recipe
    module = importlib.import_module(f"nnattr.recipes.{recipe.module}")
    options = {"batch_size": args.batch_size, **_remote_options(args)}
    prompts, target, distractor = inputs["prompts"], inputs["target"], inputs["distractor"]
    if recipe.module in ("direct_logit_attribution", "head_attribution"):
        result = module.run(model, prompts, target, distractor, by=args.by, **options)
    elif recipe.module == "logit_lens":
        result = module.run(model, prompts, target, positions=args.positions, k=args.k, **options)
    elif recipe.module == "attention_rollout":
        result = module.run(model, prompts, view=args.view, residual=args.residual,
                            head_fusion=args.head_fusion, **options)
    else:
        result = _patching(args, module, model, inputs, options)
    results = result if isinstance(result, dict) else {None: result}  # patching: one result per node type
    print("\n\n".join(format_table(r, args.top) for r in results.values()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"command": recipe.command, "model": args.model}
        if None in results:
            data.update(results[None].to_dict())
        else:
            data["results"] = {node: r.to_dict() for node, r in results.items()}
        (args.out / f"{recipe.module}.json").write_text(json.dumps(data, indent=1))
        for node, r in results.items():
            r.plot().savefig(args.out / f"{recipe.module}{'' if node is None else '_' + node}.png", dpi=110)
        print(f"wrote {recipe.module}.json and {len(results)} PNG file{'s' * (len(results) > 1)} to {args.out}")
    return 0


def _patching(args, module, model, inputs, options) -> dict:
    pair = (model, inputs["prompts"], inputs["corrupted"], inputs["target"], inputs["distractor"])
    nodes = {"nodes": tuple(args.nodes)} if args.nodes else {}
    if args.recipe.module == "attribution_patching":
        return module.run(*pair, method=args.method, steps=args.steps, **nodes, **options)
    candidates = None
    if args.top_candidates:
        from .recipes import attribution_patching

        candidates = attribution_patching.run(*pair, **nodes, **options)
    options = {k: v for k, v in options.items() if k != "batch_size"}  # its batch is patched rows, not prompts
    return module.run(*pair, candidates=candidates, k=args.top_candidates or 10, **nodes, **options)


def format_table(result, k: int = 10) -> str:
    """A short plain-text table of a result's top entries (by magnitude), with its title."""
    from .plotting import describe

    single = result.single()
    title = " · ".join(describe(single)[0].splitlines())
    n = len(result) if result.dims[0] == "prompt" else 1
    lines = [f"{title} ({n} prompt{'s' * (n != 1)})"]
    if single.dims == ("layer", "position") and isinstance(single.meta.get("top_tokens"), list):
        return "\n".join(lines + _lens_rows(single))
    if single.dims[-2:] == ("query", "key"):  # rollout, flow: what the last token draws on
        dims = single.dims[:-2] + ("key",)
        single = type(single)(single.values[..., -1, :], dims, {d: single.labels[d] for d in dims}, single.meta)
        lines[0] += " · last query token"
    join = "".join if single.dims == ("layer", "head") else " ".join  # L3H7
    rows = [(join(labels), value) for labels, value in single.top(k) if not math.isnan(value)]  # NaN: not computed
    width = max([len(" ".join(single.dims))] + [len(label) for label, _ in rows])
    lines.append(f"  {'#':>3}  {' '.join(single.dims):<{width}}  value")
    lines += [f"  {i:>3}  {label:<{width}}  {value:+.4g}" for i, (label, value) in enumerate(rows, 1)]
    return "\n".join(lines)


def _lens_rows(lens) -> list[str]:
    top, probs = lens.meta["top_tokens"], lens.meta.get("top_probs")
    out = [f"  {'layer':<6}  top predictions at the last position"]
    for i, layer in enumerate(lens.labels["layer"]):
        cells = [
            f"{t!r} {probs[i][-1][j]:.2f}" if probs else repr(t) for j, t in enumerate(top[i][-1][:3])
        ]
        out.append(f"  {layer:<6}  " + ", ".join(cells))
    return out


__all__ = ["main", "recipe_main", "format_table", "RECIPES", "EXAMPLE"]
