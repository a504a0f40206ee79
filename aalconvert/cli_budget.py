"""``aalconvert inspect --budget SIZE`` / ``--kept-budget``, and ``--max-batch --memory SIZE``: the planner
and the batch search.

Everything the user typed is checked (sizes, flag combinations, format)
before the model is loaded; progress goes to stderr, the result alone to
stdout (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aalconvert.budget_limits import check_kept_budget
from aalconvert.cli import CommandError, check_numbers, find_inputs, load_target, parse_shape
from aalconvert.errors import ConversionError
from aalconvert.report import format_bytes
from aalconvert.sizes import parse_size


def check_budget_flags(args: argparse.Namespace) -> None:
    """Flag combinations and sizes, before anything is loaded (exit 2 on a bad command line)."""
    check_numbers(args)
    planning = args.budget is not None or args.kept_budget is not None
    if planning and args.max_batch:
        raise CommandError("--budget / --kept-budget and --max-batch are separate questions: pass one of them",
                           code=2)
    if args.max_batch and args.memory is None:
        raise CommandError("--max-batch needs --memory SIZE (e.g. --memory 24GiB)", code=2)
    if args.memory is not None and not args.max_batch:
        raise CommandError("--memory is the size --max-batch fits: add --max-batch (or use --budget SIZE)",
                           code=2)
    if args.format == "csv":
        raise CommandError("--budget and --max-batch write a table or JSON: use --format table or json",
                           code=2)
    if planning and args.rules != "auto":
        raise CommandError("--budget and --kept-budget choose the rules themselves: leave --rules out", code=2)
    for flag, size, check in (("--budget", args.budget, parse_size), ("--memory", args.memory, parse_size),
                              ("--kept-budget", args.kept_budget, check_kept_budget)):
        if size is not None:
            try:
                check(size)
            except ConversionError as error:
                raise CommandError(f"{flag}: {error}", code=2) from error


def run_budget_commands(args: argparse.Namespace, errors: Any) -> None:
    """Check, load TARGET, then plan for --budget or search for --max-batch; write the result."""
    check_budget_flags(args)
    shapes = [parse_shape(text) for text in args.input_shape or ()]
    namespace, model, dtype = load_target(args, errors)
    labels = None if args.labels == "none" else "auto"
    notes: list[str] = []

    def inputs_for_batch(batch: int) -> tuple:
        resized = [(batch, *shape[1:]) for shape in shapes]
        batch_args = argparse.Namespace(**{**vars(args), "batch_size": batch})
        inputs = find_inputs(namespace, model, batch_args, resized, dtype, notes.append)
        if not shapes and "example_inputs" in namespace and _batch_of(inputs) != batch:
            raise CommandError(
                f"{args.target}'s example_inputs do not take a batch_size, so the batch cannot change: "
                "define example_inputs(batch_size) or input_shape, or pass --input-shape", code=2)
        return inputs

    if args.budget is not None or args.kept_budget is not None:
        text = _budget_text(args, model, inputs_for_batch, labels, errors)
    else:
        text = _max_batch_text(args, model, inputs_for_batch, labels, errors)
    for note in dict.fromkeys(notes):
        errors.print(f"note: {note}", markup=False)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        errors.print(f"wrote {args.output}", markup=False, soft_wrap=True)  # a path unbroken


def _batch_of(inputs: tuple) -> int | None:
    import torch

    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _budget_text(args: argparse.Namespace, model: Any, inputs_for_batch: Any, labels: Any,
                 errors: Any) -> str:
    import aalconvert
    from aalconvert.budget_view import asked_text, print_budget_plan

    inputs = inputs_for_batch(args.batch_size)
    asked = asked_text(args.budget, args.kept_budget, show=str)
    with errors.status(f"planning {type(model).__name__} for {asked} on fake tensors"):
        plan = aalconvert.plan(model, args.budget, inputs, kept_budget=args.kept_budget, optimizer=args.optimizer,
                               labels=labels)
    if args.format == "json":
        return json.dumps(plan.to_dict(), indent=2) + "\n"
    from io import StringIO

    buffer = StringIO()
    print_budget_plan(plan, file=buffer, top=args.top)
    return buffer.getvalue()


def _max_batch_text(args: argparse.Namespace, model: Any, inputs_for_batch: Any, labels: Any,
                    errors: Any) -> str:
    from aalconvert.max_batch import fit_batches

    with errors.status("searching the largest batch") as status:
        fits = fit_batches(model, inputs_for_batch, args.memory, optimizer=args.optimizer, labels=labels,
                           batch_size=args.batch_size,
                           progress=lambda line: status.update(f"searching the largest batch: {line}"))
    memory = parse_size(args.memory)
    if args.format == "json":
        return json.dumps({
            "memory_bytes": memory, "optimizer": args.optimizer,
            "rule_sets": [{"rules": f.rules, "largest_batch": f.largest_batch, "peak_bytes": f.peak_bytes,
                           "probes": f.probes} for f in fits]}, indent=2) + "\n"
    width = max(len(f.rules) for f in fits)
    lines = [f"largest batch whose predicted training-step peak fits {format_bytes(memory)} "
             f"(optimizer: {args.optimizer or 'none given'}; fake-tensor estimates):"]
    for f in fits:
        peak = f"predicted peak {format_bytes(f.peak_bytes)}" if f.largest_batch else "not even batch 1 fits"
        lines.append(f"  {f.rules:<{width}}  {f.largest_batch:>8}  {peak}")
    return "\n".join(lines) + "\n"
