"""The ``nnattr`` command: a subcommand per recipe, and ``nnattr report`` (the main job).

    nnattr report                                    # embedded model, built-in IOI pair
    nnattr dla --prompt "When Mary and John went to the store, John gave a drink to" \\
        --target " Mary" --distractor " John" --by head --out results/
    nnattr logit-lens --model gpt2 --prompts-file prompts.txt --positions all
    python -m nnattr.recipes.attention_rollout --view flow      # the same, per recipe

Exit status: 0 on success, 2 for a usage error (argparse names the problem; an ``--out`` that is
a file or cannot be written too, before anything runs), 1 when nnattr refuses the input (a
multi-token target, an unknown word, ...): one ``error:`` line, no traceback. Without
``--prompt`` the built-in IOI example and its answers are used. ``--target 42`` is the text
"42"; a token id is ``--target-id 42`` (``--distractor-id``; an int in a prompts file). An
``--out`` folder that already holds files of the names a command writes gets a ``warning:``
line naming them, and they are overwritten.
"""

from __future__ import annotations

import argparse
import collections.abc
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import typing
from dataclasses import replace
from pathlib import Path
import types
import warnings

from .result import Attribution

DEFAULT_MODEL = "tiny-ioi"
EXAMPLE = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "target": " Mary",
    "distractor": " John",
}


class UsageError(Exception):
    """A problem with the command line found after parsing (exit 2)."""


def recipes() -> dict[str, types.ModuleType]:
    """Every recipe in ``nnattr.recipes`` by command name (a module with a ``run``): a new file
    there is a new subcommand, named after the file (``logit_lens`` -> ``logit-lens``)."""
    import pkgutil

    from . import recipes as package

    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if callable(getattr(module, "run", None)) and callable(getattr(module, "trace", None)):
            found[info.name.replace("_", "-")] = module
    return found


def main(argv=None) -> int:
    """Entry point of ``nnattr`` and ``python -m nnattr``; returns the exit status."""
    return _run(_parser(), argv)


def recipe_main(module: types.ModuleType, argv=None) -> int:
    """Entry point of a recipe file run as a script: ``python recipes/logit_lens.py``, or a copy
    of it, runs *that file's* ``run`` with options read from its signature and docstring."""
    if isinstance(module, str):  # a name in nnattr.recipes
        module = importlib.import_module(f"nnattr.recipes.{module}")
    file, spec = getattr(module, "__file__", None), getattr(module, "__spec__", None)
    name = module.__name__ if module.__name__ != "__main__" else spec.name if spec else None
    prog = f"python -m {name}" if name else f"python {Path(file).name}" if file else "recipe"
    parser = argparse.ArgumentParser(prog=prog, description=_summary(module))
    _recipe_options(parser, module)
    parser.set_defaults(recipe=module, parser=parser)
    return _run(parser, argv)


def _summary(module: types.ModuleType) -> str:
    return (module.__doc__ or getattr(module, "TITLE", module.__name__)).strip().splitlines()[0]


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
    for command, module in recipes().items():
        p = sub.add_parser(command, aliases=list(getattr(module, "ALIASES", ())), help=_summary(module),
                           description=_summary(module))
        _recipe_options(p, module)
        p.set_defaults(recipe=module, parser=p)
    return parser


def _common(p: argparse.ArgumentParser, *, answers: bool, distractor: bool = True, pairs: bool = False,
            out_default: str | None = None):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face repo id, local folder or embedded short name (default {DEFAULT_MODEL})")
    given = p.add_mutually_exclusive_group()
    given.add_argument(*(["--prompt", "--clean"] if pairs else ["--prompt"]), dest="prompt", action="append",
                       metavar="TEXT", help="a prompt (repeatable)" + (", the clean one of a pair" if pairs else ""))
    given.add_argument("--prompts-file", type=Path, metavar="FILE",
                       help="one prompt per line (blank lines skipped; every other line is a prompt, '#' "
                            "included), or JSON lines: one object per line with clean (or prompt), corrupted, "
                            "answer (or target) and distractor, an answer as text or a token id (an int), every "
                            "line giving the same fields; read as JSON lines whatever its suffix when its first "
                            "line is a JSON object")
    if answers:
        names = ["--target", "--answer"] if pairs else ["--target"]
        target = p.add_mutually_exclusive_group()
        target.add_argument(*names, dest="target", metavar="TOKEN",
                            help="answer token, e.g. ' Mary'" + (" (with --distractor: the default metric)" if pairs
                                                                 else " (default: the model's top prediction)"))
        target.add_argument(*[f"{n}-id" for n in names], dest="target", type=_token_id, metavar="ID",
                            help=f"the answer as a token id ({names[0]} 42 is the text '42')")
    if answers and distractor:
        other = p.add_mutually_exclusive_group()
        other.add_argument("--distractor", metavar="TOKEN", help="score target minus this token, e.g. ' John'")
        other.add_argument("--distractor-id", dest="distractor", type=_token_id, metavar="ID",
                           help="the distractor as a token id")
    p.add_argument("--out", type=Path, default=None if out_default is None else Path(out_default), metavar="DIR",
                   help="folder for the results" + (f" (default {out_default})" if out_default else " (JSON + PNG)"))
    p.add_argument("--device", metavar="DEVICE",
                   help="where to load a local model: cpu (default), cuda, cuda:1, mps, auto (needs accelerate); "
                        "checked against the devices this machine has before loading")
    p.add_argument("--batch-size", type=_positive, metavar="N",
                   help="prompts (pairs, for patching) per chunk: one forward pass, or one request on NDIF "
                        "(default: all at once on CPU and NDIF, what fits on a GPU)")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the BOS token first in every prompt (TransformerLens's default), or with "
                        "--no-prepend-bos remove it (default: as the tokenizer does)")
    from .remote import add_cli_arguments

    add_cli_arguments(p)  # --remote, --ndif-host


# Arguments every recipe shares, handled by the CLI itself rather than read from ``run``.
_COMMON = {"model", "batch_size", "remote", "backend"}
_INPUTS = {"prompts", "clean", "corrupted", "target", "answer", "distractor"}


def _recipe_options(p: argparse.ArgumentParser, module: types.ModuleType) -> None:
    """The recipe's own options, read from its ``run``: one flag per keyword argument whose type
    a command line can give (``Literal`` choices, int, float, bool, a sequence of choices), with
    ``run``'s default and the ``name: text`` line of its docstring as help."""
    params = inspect.signature(module.run).parameters
    _common(p, answers="target" in params or "answer" in params, distractor="distractor" in params,
            pairs="corrupted" in params)
    p.add_argument("--top", type=_positive, default=10, metavar="K", help="rows in the printed table (default 10)")
    if "corrupted" in params:
        p.add_argument("--corrupted", action="append", metavar="TEXT", help="corrupted prompt per --prompt")
    hints, docs = typing.get_type_hints(module.run), _param_docs(module.run)
    for name, param in params.items():
        if param.kind is not param.KEYWORD_ONLY or name in _COMMON | _INPUTS:
            continue
        option = _option(hints.get(name))
        if option is None:  # a function or a result: Python API only
            continue
        shown = " ".join(param.default) if isinstance(param.default, (list, tuple)) else param.default
        default = "" if param.default is None else f" (default {shown})"
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=param.default,
                       help=docs.get(name, name.replace("_", " ")) + default, **option)


def _option(hint) -> dict | None:
    """argparse keywords for a ``run`` parameter's type, or None if a command line cannot give it."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:  # X | None
        hint, args = args[0], list(typing.get_args(args[0]))
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and int in args:
        words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        if any(typing.get_origin(a) in (list, tuple, collections.abc.Sequence) for a in args):
            return {"type": int, "nargs": "+", "metavar": "N", "action": _OneOrMany}  # one, or one per prompt
        if words:  # int | Literal["all"]
            return {"type": _int_or(words), "metavar": "N|" + "|".join(words)}
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (list, tuple, collections.abc.Sequence) and args and typing.get_origin(args[0]) is typing.Literal:
        return {"choices": list(typing.get_args(args[0])), "nargs": "+", "metavar": "TYPE"}
    if origin in (list, tuple, collections.abc.Sequence) and args and args[0] is int:
        return {"type": int, "nargs": "+", "metavar": "N"}
    if hint is Attribution or typing.get_args(hint)[-1:] == (Attribution,):  # a result, or {name: result}
        return {"type": _results_file, "metavar": "JSON"}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint is int:  # run() checks the range, with the same message in Python and on the command line
        return {"type": int, "metavar": "N"}
    if hint is float:
        return {"type": float, "metavar": "X"}
    if hint is str or str in args:  # a name or a folder that run() resolves (a lens, an SAE)
        return {"type": str, "metavar": "TEXT"}
    return None


class _OneOrMany(argparse.Action):
    """``--position 5`` gives the int 5 (shared by every prompt), ``--position 5 7`` a list (one each)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


def _int_or(words: list[str]):
    """An argparse type: an int, or one of ``words``."""
    def parse(text: str):
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int or one of {words}, got {text!r}") from None
    parse.__name__ = "int or " + " or ".join(words)
    return parse


def _results_file(text: str):
    """A result (or ``{name: result}``) from a JSON file that ``--out`` wrote."""
    from .result import read

    try:
        return read(text)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"no such file: {text}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{text} is not a result written by --out ({error})") from None


def _param_docs(fn) -> dict[str, str]:
    """``{name: text}`` from docstring lines ``name: text`` (several names may share a line)."""
    out = {}
    for line in (fn.__doc__ or "").splitlines():
        for part in re.split(r"; (?=[A-Za-z_]\w*: )", line.strip()):  # "a: text; b: text" names two
            name, sep, text = part.partition(": ")
            if sep and name.isidentifier():
                out[name] = text.strip().rstrip(".")
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _token_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token id (an int from 0), got {text!r}; "
                                         f"give a token as text with --target / --distractor") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token id (an int from 0), got {value}")
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
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return _main(args, inputs)
    except (ValueError, FileNotFoundError, _remote_error()) as error:  # nnattr refusing the input, or NDIF saying no
        sys.stderr.write(f"error: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def _main(args, inputs) -> int:
    model = _load_model(args)
    if args.recipe is None:
        from .report import write_report

        return write_report(model, **inputs, model_name=args.model, out=args.out, top=args.top,
                            batch_size=args.batch_size, options=_remote_options(args))
    return _run_recipe(args, model, inputs)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line: one ``warning:`` line (its text names the values), no source line."""
    sys.stderr.write(f"warning: {message}\n")


def _remote_error() -> type:
    from .remote import NDIFError

    return NDIFError


def _inputs(args) -> dict:
    """Prompts, corrupted prompts and answers from the flags, a file, or the built-in example."""
    if args.remote and args.device:
        raise UsageError("--device: a --remote model runs on NDIF's devices, not on a local one")
    _check_device(args.device)
    _check_out(args)
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
        if hasattr(args, "target"):  # the example's own answers, never its distractor with your target
            if target is None and distractor is None and hasattr(args, "distractor"):
                distractor = EXAMPLE["distractor"]
            target = EXAMPLE["target"] if target is None else target
        sys.stderr.write(f"no --prompt given: using the built-in example {prompts[0]!r}\n")
    if corrupted is not None and len(corrupted) != len(prompts):
        raise UsageError(f"--corrupted: {len(corrupted)} corrupted prompts for {len(prompts)} prompts; "
                         f"give one per prompt")
    if args.recipe is not None and "corrupted" in inspect.signature(args.recipe.run).parameters \
            and corrupted is None:
        raise UsageError("--corrupted: this command needs a corrupted prompt for every prompt")
    return {"prompts": prompts, "corrupted": corrupted, "target": target, "distractor": distractor}


# device_map strategies of accelerate, given as --device instead of a device.
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device(device: str | None) -> None:
    """Refuse a ``--device`` that names no device, or one this machine does not have, before loading."""
    if device is None or device in _DEVICE_MAPS:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device: {device!r} is not a device; give cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cpu":
        return
    available = _local_devices(torch)
    shown = ", ".join(d for devices in available.values() for d in devices)
    if parsed.type == "meta":
        raise UsageError(f"--device meta: the meta device holds no weights, so nothing can run on it; available here: "
                         f"{shown}")
    devices = available.get(parsed.type, [])
    if not devices:
        built = parsed.type != "cuda" or torch.backends.cuda.is_built()
        why = "" if built else " (this torch is not compiled with CUDA)"
        raise UsageError(f"--device {device}: no {parsed.type} device here{why}; available here: {shown}")
    if parsed.index is not None and parsed.index >= len(devices):
        raise UsageError(f"--device {device}: there {'is' if len(devices) == 1 else 'are'} {len(devices)} "
                         f"{parsed.type} device{'s' * (len(devices) > 1)} here ({', '.join(devices)})")


def _local_devices(torch) -> dict[str, list[str]]:
    """``{device type: [device, ...]}`` of the devices a local model can load on here."""
    found = {"cpu": ["cpu"]}
    if torch.cuda.is_available():
        found["cuda"] = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found["mps"] = ["mps"]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found["xpu"] = [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def _check_out(args) -> None:
    """Refuse an ``--out`` that cannot be a writable folder before anything runs, and say which
    files already there this command will overwrite."""
    out = args.out
    if out is None:
        return
    found = next(p for p in (out, *out.parents) if p.exists())  # out, or the folder it would be made in
    if not found.is_dir():
        raise UsageError(f"--out: {found} is a file; give a folder (it is created if missing)" if found == out else
                         f"--out: {found} is a file, so {out} cannot be made in it; give another folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {found} is not writable" + ("" if found == out else f", so {out} cannot be made "
                                                             f"in it") + "; give a folder you can write to")
    if found != out:
        return
    if args.recipe is None:  # the report: its page, its data and its figures
        clash = [p.name for p in out.iterdir() if p.name in ("index.html", "results.json") or p.suffix == ".png"]
    else:
        name = _out_name(args.recipe)
        clash = [p.name for p in out.iterdir() if p.name in (f"{name}.json", f"{name}.png")
                 or (p.name.startswith(f"{name}_") and p.suffix == ".png")]
    if clash:
        clash.sort()
        shown = ", ".join(clash[:6]) + (f" and {len(clash) - 6} more" if len(clash) > 6 else "")
        sys.stderr.write(f"warning: --out {out} already holds {shown}: files of the same name are overwritten\n")


def _out_name(module: types.ModuleType) -> str:
    """The stem of the files a recipe command writes to ``--out``: its file's name."""
    return Path(module.__file__).stem if getattr(module, "__file__", None) else "result"


# JSON-lines fields: {field: the keys that give it}; a line gives each field by at most one key.
_FIELDS = {"prompt": ("clean", "prompt"), "corrupted": ("corrupted",), "target": ("answer", "target"),
           "distractor": ("distractor",)}
_KEYS = {key: field for field, keys in _FIELDS.items() for key in keys}
# Keys the generators in nnattr.embedded.tasks write beside the inputs (ioi_pairs, ioi_prompts): read and ignored,
# so their output is a prompts file as it is.
_IGNORED_KEYS = ("order", "template", "io", "s", "place", "object")


def _read_prompts(path: Path):
    """Prompts (and, from JSON lines, corrupted prompts and answers) from a file: JSON lines when the
    first non-blank line is a JSON object (or the name ends in .jsonl or .json), else one prompt per
    line (blank lines skipped)."""
    if path.is_dir():
        raise UsageError(f"--prompts-file: {path} is a folder; give a file (one prompt per line, or JSON lines)")
    if not path.is_file():
        raise UsageError(f"--prompts-file: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"--prompts-file: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--prompts-file: {path} holds no prompts")
    fields = {"corrupted": None, "target": None, "distractor": None}
    if not (_json_object(lines[0][1]) or path.suffix in (".jsonl", ".json")):
        return [line for _, line in lines], fields
    given = None  # the fields the first line gives: every line must give the same
    columns = {field: [] for field in _FIELDS}
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"--prompts-file: line {number} of {path} is not JSON ({error.msg} at column "
                             f"{error.colno}); a JSON-lines file holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise UsageError(f"--prompts-file: line {number} of {path} is not a JSON object but "
                             f"{type(row).__name__} {line.strip()[:40]!r}; give one object per line")
        found = _row_fields(row, number, path)
        if "prompt" not in found:
            raise UsageError(f"--prompts-file: line {number} of {path} has no 'clean' or 'prompt' field; every line "
                             f"needs one")
        if given is None:
            given, first = {field: key for field, (key, _) in found.items()}, number
        elif set(found) != set(given):
            extra = [key for field, (key, _) in found.items() if field not in given]
            missing = [key for field, key in given.items() if field not in found]
            said = (f"gives {', '.join(map(repr, extra))}, which line {first} does not" if extra else
                    f"lacks {', '.join(map(repr, missing))}, which line {first} gives")
            raise UsageError(f"--prompts-file: line {number} of {path} {said}; every line must give the same fields")
        for field, (_, value) in found.items():
            columns[field].append(value)
    fields.update({field: columns[field] for field in fields if field in given})
    return columns["prompt"], fields


def _json_object(line: str) -> bool:
    """Whether a line is a JSON object: what makes a prompts file JSON lines, whatever its name."""
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _row_fields(row: dict, number: int, path: Path) -> dict:
    """``{field: (key, value)}`` of one JSON line, its keys and value types checked."""
    found = {}
    for key, value in row.items():
        if key in _IGNORED_KEYS:
            continue
        field = _KEYS.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(_KEYS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"--prompts-file: line {number} of {path} has an unknown key {key!r}; {hint}known keys: "
                             + ", ".join(map(repr, _KEYS)))
        if field in found:
            raise UsageError(f"--prompts-file: line {number} of {path} gives both " + " and ".join(
                repr(k) for k in _FIELDS[field] if k in row) + ", two names of one field; give one")
        ids = field in ("target", "distractor")  # an answer may be a token id: an int
        if not (isinstance(value, str) or (ids and isinstance(value, int) and not isinstance(value, bool))):
            raise UsageError(f"--prompts-file: line {number} of {path} has no {key!r} text"
                             + (" or token id" if ids else "") + f" (got {json.dumps(value)[:40]})")
        found[field] = (key, value)
    return found


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
    if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().exists():
        raise ValueError(f"no model folder at {args.model!r}")  # a file: nnattr.load says it is not a folder
    source = str(Path(args.model).expanduser()) if args.model.startswith("~") else args.model
    try:
        return nnattr.load(source, prepend_bos=getattr(args, "prepend_bos", None), **kwargs)
    except (OSError, ValueError) as error:  # Hub and transformers errors: their first line says it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.removeprefix(f"model {args.model!r}: ")  # nnattr.load's own errors name it too
        raise ValueError(f"could not load model {args.model!r}: {first}") from None


def _run_recipe(args, model, inputs) -> int:
    module = args.recipe
    params = inspect.signature(module.run).parameters
    given = {"prompts": inputs["prompts"], "clean": inputs["prompts"], "corrupted": inputs["corrupted"],
             "target": inputs["target"], "answer": inputs["target"], "distractor": inputs["distractor"]}
    options = {name: getattr(args, name) for name, param in params.items()
               if param.kind is param.KEYWORD_ONLY and hasattr(args, name) and name not in _COMMON}
    kwargs = {name: value for name, value in given.items() if name in params}
    result = module.run(model, **kwargs, **options, batch_size=args.batch_size, **_remote_options(args))
    results = result if isinstance(result, dict) else {None: result}  # patching: one result per node type
    print("\n\n".join(format_table(r, args.top) for r in results.values()))
    if args.out is not None:
        name = _out_name(module)
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"command": args.parser.prog, "model": args.model}
        if None in results:
            data.update(results[None].to_dict())
        else:
            data["results"] = {node: r.to_dict() for node, r in results.items()}
        (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
        for node, r in results.items():
            r.plot().savefig(args.out / f"{name}{'' if node is None else '_' + node}.png", dpi=110)
        print(f"wrote {name}.json and {len(results)} PNG file{'s' * (len(results) > 1)} to {args.out}")
    return 0


def format_table(result, k: int = 10) -> str:
    """A short plain-text table of a result's top entries (by magnitude), with its title; the
    value column is headed by the unit, labels and numbers as in the report (``L1H0``, ``+7.65``)."""
    from .plotting import describe, entry_label, number

    single = result.single()
    title = " · ".join(describe(single)[0].splitlines())  # says "mean over n prompts" for several
    lines = [title if "n_prompts" in single.meta else f"{title} (1 prompt)"]
    if single.method == "logit_lens" and isinstance(single.meta.get("top_tokens"), list):
        return "\n".join(lines + _lens_rows(single))
    if single.dims[-2:] == ("query", "key"):  # rollout, flow: what the last token draws on
        dims = single.dims[:-2] + ("key",)
        labels = {d: single.labels[d] for d in dims}
        single = replace(single, values=single.values[..., -1, :], dims=dims, labels=labels)
        lines[0] += " · last query token"
    rows = [(entry_label(single, labels), number(value)) for labels, value in single.top(k)]  # top() skips NaN
    width = max([len(" ".join(single.dims))] + [len(label) for label, _ in rows])
    digits = max([len(value) for _, value in rows], default=0)
    lines.append(f"  {'#':>3}  {' '.join(single.dims):<{width}}  {single.units}")
    lines += [f"  {i:>3}  {label:<{width}}  {value:>{digits}}" for i, (label, value) in enumerate(rows, 1)]
    return "\n".join(lines)


def _lens_rows(lens) -> list[str]:
    from .plotting import number

    top, probs = lens.meta["top_tokens"], lens.meta.get("top_probs")
    out = [f"  {'layer':<6}  top predictions at the last position" + " (probability)" * bool(probs)]
    for i, layer in enumerate(lens.labels["layer"]):
        cells = [
            f"{t!r} {number(probs[i][-1][j], signed=False)}" if probs else repr(t)
            for j, t in enumerate(top[i][-1][:3])
        ]
        out.append(f"  {layer:<6}  " + ", ".join(cells))
    return out


__all__ = ["main", "recipe_main", "recipes", "format_table", "EXAMPLE"]
