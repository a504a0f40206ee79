"""The ``aalconvert`` command line: ``aalconvert inspect`` and ``aalconvert rules``."""

import argparse
import importlib
import inspect as signature_tools
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aalconvert import __version__
from aalconvert.trace import _one_line

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw")


class CommandError(Exception):
    """A problem with what the user asked for: printed as one line, exit ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aalconvert",
        description="Convert PyTorch models to train in less memory, and report what is saved.",
    )
    parser.add_argument("--version", action="version", version=f"aalconvert {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("rules", help="list the conversion rules, what each changes, and their options")
    add_inspect_parser(commands)
    return parser


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    """The ``inspect`` subcommand and its options."""
    inspect = commands.add_parser(
        "inspect",
        help="estimate, module by module, what conversion saves (fake tensors: nothing is computed)",
        description="Estimate what a training-mode forward keeps for backward under ordinary "
                    "backprop and after conversion, module by module, without real computation.",
    )
    inspect.add_argument("target", metavar="TARGET",
                         help="a .py file defining `model` or a factory such as build_model(), or "
                              "package.module:callable")
    inspect.add_argument("--input-shape", action="append", metavar="SHAPE",
                         help="full input shape with the batch, e.g. 8,3,224,224; repeat once per "
                              "positional input")
    inspect.add_argument("--dtype", choices=list(DTYPES), default=None,
                         help="cast the model's floating parameters and float inputs")
    inspect.add_argument("--rules", default="auto",
                         help="rule name or comma-separated names (see `aalconvert rules`)")
    inspect.add_argument("--batch-size", type=int, default=8,
                         help="batch for the file's input_shape / example_inputs(batch_size) (default 8)")
    inspect.add_argument("--depth", type=int, default=None, help="sum rows by module-name depth")
    inspect.add_argument("--top", type=int, default=None, help="show only the first N rows")
    inspect.add_argument("--format", choices=("table", "json", "csv"), default="table")
    inspect.add_argument("--output", type=Path, default=None, help="write the report to this file")
    inspect.add_argument("--model", default=None, metavar="NAME",
                         help="the model object or zero-argument factory to use in TARGET")
    inspect.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                         help="add this optimizer's state to the predicted peak")
    inspect.add_argument("--labels", choices=("auto", "none"), default="auto",
                         help="auto: a language model (...ForCausalLM/...ForMaskedLM) runs with labels = its "
                              "input ids, so the loss head counts; none: never pass labels")
    inspect.add_argument("--budget", default=None, metavar="SIZE",
                         help="plan a rule per module so that one training step fits SIZE (e.g. 10GiB, "
                              "512MiB, 1.5GB) and print the plan instead of the report")
    inspect.add_argument("--kept-budget", default=None, metavar="SIZE|FRACTION", type=share_or_size,
                         help="plan so that the forward keeps at most this for backward: a size, or a share "
                              "of what BP keeps (0.25, 25%%); alone or with --budget")
    inspect.add_argument("--max-batch", action="store_true",
                         help="print the largest batch that fits --memory for bp, exact, auto, "
                              "auto+approx8 and auto+approx4")
    inspect.add_argument("--memory", default=None, metavar="SIZE",
                         help="the memory size --max-batch fits (e.g. 24GiB)")
    inspect.add_argument("--debug", action="store_true", help="show tracebacks")


def share_or_size(text: str) -> str | float:
    """``--kept-budget``: a number with a point (``0.25``) is a share of what BP keeps; anything else
    (``25%``, ``4096``, ``2MiB``) stays text for ``budget_limits`` to read."""
    try:
        return float(text) if "." in text else text
    except ValueError:
        return text


def print_rules() -> None:
    """The rule table: name, whether forward and gradients stay exact, options, description."""
    from rich.console import Console
    from rich.table import Table

    from aalconvert.rules.registry import AUTO, NAMES, OPTIONS_BY_RULE, PRECEDENCE, build_rule

    table = Table(title=f"aalconvert rules (precedence: {' > '.join(PRECEDENCE)})")
    for column in ("rule", "forward exact", "gradient exact", "options", "what it does"):
        table.add_column(column)
    for name in NAMES:
        if name == "auto":
            table.add_row(name, "no (ASA)", "no", "all of its rules'", "the paper's recipe: " + " + ".join(AUTO))
            continue
        rule = build_rule(name, {})
        family = "approx" if name.startswith("approx") else name
        options = ", ".join(OPTIONS_BY_RULE.get(family, ())) or "-"
        yes_no = lambda flag: "yes" if flag else "no"
        table.add_row(name, yes_no(rule.forward_exact), yes_no(rule.gradient_exact), options, rule.description)
    Console().print(table)
    print("every rule set includes exact (its masks change no number and never keep more);")
    print("every rule also takes skip= (module names or a predicate (module, name) -> bool)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "rules":
        print_rules()
        return 0
    if args.command == "inspect":
        return run_inspect(args)
    parser.print_help()
    return 0


def load_namespace(target: str) -> tuple[dict[str, Any], str]:
    """The globals of TARGET (a .py file or an importable module) and the callable named after ':'."""
    path = Path(target)
    if target.endswith(".py") or path.exists():
        if not path.is_file():
            raise CommandError(f"no such file: {target}")
        # Like `python file.py`, but the current directory is importable too (for repo-local packages).
        for folder in (str(path.resolve().parent), os.getcwd()):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        try:
            return runpy.run_path(str(path), run_name="__aalconvert_target__"), ""
        except Exception as error:
            raise CommandError(f"{target} raised {_one_line(error)}") from error
    if ":" not in target:
        raise CommandError(f"TARGET {target!r} is neither a .py file nor package.module:callable")
    module_name, _, attribute = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise CommandError(f"cannot import {module_name!r}: {_one_line(error)}") from error
    return vars(module), attribute


def pick_model(namespace: dict[str, Any], name: str | None, target: str) -> Any:
    """The nn.Module named ``name`` (built if a zero-argument factory), else ``model`` / ``build_model()``."""
    from torch import nn

    if name is None:
        if isinstance(namespace.get("model"), nn.Module):
            name = "model"
        elif callable(namespace.get("build_model")):
            name = "build_model"
        else:
            raise CommandError(
                f"no model found in {target}: define `model` or `build_model()`, or pass "
                "--model NAME (a module object or zero-argument factory in the file)"
            )
    if name not in namespace:
        raise CommandError(f"{target} defines no {name!r}; pass --model with a name it defines")
    candidate = namespace[name]
    if not isinstance(candidate, nn.Module):
        if not callable(candidate):
            raise CommandError(f"{name} in {target} is a {type(candidate).__name__}, not a model or factory")
        try:
            candidate = candidate()
        except Exception as error:
            raise CommandError(f"{name}() in {target} raised {_one_line(error)}") from error
    if not isinstance(candidate, nn.Module):
        raise CommandError(f"{name} in {target} gave a {type(candidate).__name__}, not a torch.nn.Module")
    return candidate


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,224,224"`` -> ``(8, 3, 224, 224)``; raises CommandError on anything else."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise CommandError(
            f"bad --input-shape {text!r}: expected comma-separated positive integers with the "
            "batch first, e.g. --input-shape 8,3,224,224", code=2)
    return shape


def first_embedding(model: Any) -> Any:
    """The model's first layer with parameters, if it is an nn.Embedding (its inputs are token ids)."""
    from torch import nn

    for module in model.modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            return module if isinstance(module, nn.Embedding) else None
    return None


def make_inputs(model: Any, shapes: list[tuple[int, ...]], dtype: Any, say: Callable[[str], None]) -> tuple:
    """Random inputs of ``shapes``: token ids within the vocabulary after an Embedding, else floats."""
    import torch

    embedding = first_embedding(model)
    if embedding is not None:
        say(f"first layer is an Embedding: inputs are random token ids in [0, {embedding.num_embeddings})")
        return tuple(torch.randint(0, embedding.num_embeddings, shape) for shape in shapes)
    return tuple(torch.randn(shape, dtype=dtype) for shape in shapes)


def find_inputs(namespace: dict[str, Any], model: Any, args: argparse.Namespace,
                shapes: list[tuple[int, ...]], dtype: Any, say: Callable[[str], None]) -> tuple:
    """``shapes`` (--input-shape), else the file's example_inputs, else its input_shape with --batch-size."""
    import torch

    if shapes:
        return make_inputs(model, shapes, dtype, say)
    if "example_inputs" in namespace:
        inputs = namespace["example_inputs"]
        if callable(inputs):
            takes_batch = "batch_size" in signature_tools.signature(inputs).parameters
            try:
                inputs = inputs(batch_size=args.batch_size) if takes_batch else inputs()
            except Exception as error:
                raise CommandError(f"example_inputs() raised {_one_line(error)}") from error
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, (tuple, list)):
            raise CommandError(f"example_inputs must be a tuple of tensors, got {type(inputs).__name__}")
        return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in inputs)
    if "input_shape" in namespace:
        per_sample = tuple(namespace["input_shape"])
        several = all(isinstance(s, (tuple, list)) for s in per_sample) and per_sample
        shapes = [tuple(s) for s in per_sample] if several else [per_sample]
        return make_inputs(model, [(args.batch_size, *s) for s in shapes], dtype, say)
    raise CommandError(
        f"no input shape for {args.target}: pass --input-shape with the full shape, batch "
        "first (e.g. --input-shape 8,3,224,224; repeat it for each positional input)", code=2)


def check_rules(text: str) -> list[str]:
    """``--rules`` split at commas, every name checked against the registry before any work."""
    from aalconvert.rules.registry import NAMES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in NAMES]
    if unknown or not names:
        raise CommandError(f"unknown rule {', '.join(unknown) or repr(text)}; choose from "
                           f"{', '.join(NAMES)} (comma-separated)", code=2)
    return names


def run_inspect(args: argparse.Namespace) -> int:
    """``aalconvert inspect``: load TARGET, estimate on fake tensors, write the report."""
    from rich.console import Console

    errors = Console(stderr=True, highlight=False)
    try:
        if args.budget is not None or args.kept_budget is not None or args.max_batch or args.memory is not None:
            from aalconvert.cli_budget import run_budget_commands

            run_budget_commands(args, errors)
            return 0
        report = build_inspect_report(args, errors)
        write_report(report, args)
        if args.output is not None:
            errors.print(f"wrote {args.output}", markup=False, soft_wrap=True)  # a path unbroken
    except Exception as error:
        if args.debug:
            raise
        code = error.code if isinstance(error, CommandError) else 1
        message = str(error) if isinstance(error, CommandError) else _one_line(error)
        errors.print(f"aalconvert inspect: error: {message}", soft_wrap=True, markup=False)
        return code
    return 0


def write_report(report: Any, args: argparse.Namespace) -> None:
    """The report as --format asks, to --output or stdout (JSON and CSV alone on stdout)."""
    if args.format == "table":
        if args.output is None:
            report.print(depth=args.depth, top=args.top)
            return
        with open(args.output, "w", encoding="utf-8") as file:
            report.print(depth=args.depth, top=args.top, file=file)
        return
    text = report.to_json() + "\n" if args.format == "json" else report.to_csv()
    if args.output is None:
        sys.stdout.write(text)
        return
    args.output.write_text(text, encoding="utf-8")


def check_numbers(args: argparse.Namespace) -> None:
    """--batch-size, --top and --depth in range, before any work."""
    if args.batch_size < 1 or (args.top is not None and args.top < 1) or (
            args.depth is not None and args.depth < 0):
        raise CommandError("--batch-size and --top must be >= 1 and --depth >= 0", code=2)


def load_target(args: argparse.Namespace, errors: Any) -> tuple[dict[str, Any], Any, Any]:
    """TARGET's namespace, its model (cast to --dtype) and the dtype (progress on stderr)."""
    with errors.status(f"loading {args.target}"):
        import torch

        namespace, attribute = load_namespace(args.target)
        model = pick_model(namespace, args.model or attribute or None, args.target)
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else torch.float32
        if args.dtype:
            model = model.to(dtype)
    return namespace, model, dtype


def build_inspect_report(args: argparse.Namespace, errors: Any) -> Any:
    """Check the command line, load TARGET, build inputs and run aalconvert.inspect (progress on stderr)."""
    check_numbers(args)
    rules = check_rules(args.rules)
    shapes = [parse_shape(text) for text in args.input_shape or ()]
    import aalconvert

    namespace, model, dtype = load_target(args, errors)
    inputs = find_inputs(namespace, model, args, shapes, dtype, lambda text: errors.print(f"note: {text}", markup=False))
    with errors.status(f"planning and estimating {type(model).__name__} on fake tensors"):
        return aalconvert.inspect(model, inputs, rules[0] if len(rules) == 1 else rules,
                                  optimizer=args.optimizer, labels=None if args.labels == "none" else "auto")


if __name__ == "__main__":
    sys.exit(main())
