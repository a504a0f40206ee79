"""Report: what a forward keeps for backward, module by module, before and after conversion.

Built by ``aalconvert.inspect()`` from the conversion plan and two fake-tensor
forwards (ordinary backprop and the converted model). Every number is in
bytes; the rich table shows KiB/MiB/GiB, JSON and CSV keep exact bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.memory import SavedByModule
from aalconvert.plan import Plan
from aalconvert.rules.base import COVERS, ROUTED_BY, Site
from aalconvert.trace import Untraced

# Optimizer state per trainable parameter byte: SGD keeps nothing, momentum one
# buffer, Adam/AdamW two (exp_avg, exp_avg_sq), each the parameter's size.
OPTIMIZER_STATE_PER_PARAMETER: dict[str | None, int] = {
    None: 0, "sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2,
}

_SHORT_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
}


def optimizer_step_bytes(optimizer: str | None, trainable: list[torch.Tensor]) -> int:
    """Temporaries of one optimizer step, as torch's default implementation makes them (bytes).

    Adam and AdamW make a square root of ``exp_avg_sq`` per parameter: for all
    of them at once on CUDA (the foreach implementation), one parameter at a
    time elsewhere (with one more temporary of its size). SGD, with or without
    momentum, works in place.
    """
    if optimizer not in ("adam", "adamw") or not trainable:
        return 0
    sizes = [p.numel() * p.element_size() for p in trainable]
    return sum(sizes) if trainable[0].device.type == "cuda" else 2 * max(sizes)


def optimizer_state_factor(optimizer: str | None) -> int:
    """Optimizer state bytes per trainable parameter byte; raises on an unknown name."""
    if optimizer not in OPTIMIZER_STATE_PER_PARAMETER:
        allowed = ", ".join(str(name) for name in OPTIMIZER_STATE_PER_PARAMETER)
        raise ConversionError(f"unknown optimizer {optimizer!r}; allowed: {allowed}")
    return OPTIMIZER_STATE_PER_PARAMETER[optimizer]


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name as the CLI spells it (fp32, bf16, ...), else torch's name (int64)."""
    return _SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def format_bytes(count: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (one decimal)."""
    size = float(abs(count))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    text = f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
    return f"-{text}" if count < 0 else text


def format_shape(shape: tuple[int, ...] | None) -> str:
    """``(4, 3, 32, 32)`` -> ``"4x3x32x32"`` ("" when unknown)."""
    return "" if shape is None else "x".join(map(str, shape))


def display_name(name: str) -> str:
    """A qualified module name as shown to people: the root ("") is ``<root>``."""
    return name or "<root>"


@dataclass(frozen=True)
class Row:
    """One module that keeps something for backward (bytes), under BP and after conversion."""

    name: str
    op: str
    output_shape: tuple[int, ...] | None
    dtype: str | None
    bytes_bp: int
    bytes_converted: int
    rule: str
    explanation: str

    @property
    def bytes_saved(self) -> int:
        """BP bytes minus converted bytes (negative when this row now holds a shared tensor)."""
        return self.bytes_bp - self.bytes_converted


@dataclass(frozen=True)
class Totals:
    """Whole-model figures for one training step, all in bytes.

    ``peak_*`` = parameters + optimizer state + the most bytes a simulated
    step allocates above its start (``*_step_bytes``: activations, gradients
    and every transient of the forward, a stand-in loss and backward, on fake
    tensors; ``aalconvert.step_memory``), or, when more, the gradients and the
    optimizer step's temporaries (``optimizer_step_bytes``). Where backward
    could not be simulated (``*_step_bytes`` None), the step's bytes are taken
    as activations kept + gradients + the largest transient, twice the
    largest module output. A model-level estimate: it ignores allocator
    rounding, fragmentation and workspace buffers.
    """

    bp_bytes: int
    converted_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer: str | None
    optimizer_state_bytes: int
    largest_transient_bytes: int
    bp_step_bytes: int | None = None
    converted_step_bytes: int | None = None
    optimizer_step_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Converted / BP bytes kept for backward (1.0 for a model that keeps nothing)."""
        return self.converted_bytes / self.bp_bytes if self.bp_bytes else 1.0

    @property
    def fixed_bytes(self) -> int:
        """What the step holds whatever the batch: parameters, gradients, optimizer state."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes

    def _peak(self, kept_bytes: int, step_bytes: int | None) -> int:
        if step_bytes is None:
            step_bytes = kept_bytes + self.gradient_bytes + self.largest_transient_bytes
        optimizer_step = self.gradient_bytes + self.optimizer_step_bytes
        return self.parameter_bytes + self.optimizer_state_bytes + max(step_bytes, optimizer_step)

    @property
    def peak_bp_bytes(self) -> int:
        return self._peak(self.bp_bytes, self.bp_step_bytes)

    @property
    def peak_converted_bytes(self) -> int:
        return self._peak(self.converted_bytes, self.converted_step_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Every field and derived figure (ratio, peaks), bytes as exact integers."""
        return {**asdict(self), "ratio": self.ratio, "peak_bp_bytes": self.peak_bp_bytes,
                "peak_converted_bytes": self.peak_converted_bytes}


@dataclass
class Report:
    """Per-module rows (sorted by bytes saved), totals, untraced modules and how it was estimated."""

    model: str
    rules: list[str]
    rows: list[Row]
    totals: Totals
    untraced: list[Untraced]
    estimated_on: str
    notes: list[str] = field(default_factory=list)
    module_info: dict[str, tuple[str, tuple[int, ...] | None, str | None]] = field(
        default_factory=dict, repr=False)
    """Every module's (class, output shape, dtype), for rows aggregated by depth."""

    def aggregated(self, depth: int | None = None) -> list[Row]:
        """Rows summed over module-name prefixes of ``depth`` parts (None: one row per module)."""
        if depth is None:
            return list(self.rows)
        if depth < 0:
            raise ConversionError(f"depth must be >= 0, got {depth}")
        groups: dict[str, list[Row]] = {}
        for row in self.rows:
            prefix = ".".join(row.name.split(".")[:depth]) if row.name else ""
            groups.setdefault(prefix, []).append(row)
        merged = []
        for prefix, rows in groups.items():
            if len(rows) == 1 and rows[0].name == prefix:
                merged.append(rows[0])
                continue
            op, shape, dtype = self.module_info.get(prefix, ("", None, None))
            rules = ", ".join(sorted({row.rule for row in rows if row.rule}))
            merged.append(Row(prefix, op, shape, dtype, sum(r.bytes_bp for r in rows),
                              sum(r.bytes_converted for r in rows), rules,
                              f"{len(rows)} modules under {display_name(prefix)}"))
        return sorted(merged, key=_largest_saving_first)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, exact bytes: model, rules, estimated_on, notes, totals, rows, untraced."""
        return {
            "model": self.model,
            "rules": list(self.rules),
            "estimated_on": self.estimated_on,
            "notes": list(self.notes),
            "totals": self.totals.to_dict(),
            "rows": [
                {**asdict(row),
                 "output_shape": None if row.output_shape is None else list(row.output_shape),
                 "bytes_saved": row.bytes_saved}
                for row in self.rows
            ],
            "untraced": [{"name": u.name, "type": u.type_name, "reason": u.reason}
                         for u in self.untraced],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """One line per row with exact bytes; the shape is written as ``4x3x32x32``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["name", "op", "output_shape", "dtype", "bytes_bp", "bytes_converted",
                         "bytes_saved", "rule", "explanation"])
        for row in self.rows:
            writer.writerow([row.name, row.op, format_shape(row.output_shape), row.dtype or "",
                             row.bytes_bp, row.bytes_converted, row.bytes_saved, row.rule,
                             row.explanation])
        return buffer.getvalue()

    def print(self, depth: int | None = None, top: int | None = None, *,
              file: IO[str] | None = None) -> None:
        """Render with rich: the table sorted by bytes saved, then the totals panel.

        ``depth`` sums rows by module-name prefix of that many parts; ``top``
        keeps the first rows. ``file`` defaults to stdout.
        """
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table

        if top is not None and top < 1:
            raise ConversionError(f"top must be >= 1, got {top}")
        console = Console(file=file)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 180  # wide enough for the explanations in a file or pipe
        rows = self.aggregated(depth)
        shown = rows[:top] if top is not None else rows
        title = f"{self.model}: bytes kept for backward, BP vs {'+'.join(self.rules)}"
        table = Table(title=title)
        for column, justify in (("module", "left"), ("op", "left"), ("output", "left"),
                                ("dtype", "left"), ("BP", "right"), ("converted", "right"),
                                ("saved", "right"), ("rule", "left"), ("why", "left")):
            table.add_column(column, justify=justify)
        for row in shown:
            table.add_row(display_name(row.name), row.op, format_shape(row.output_shape),
                          row.dtype or "", format_bytes(row.bytes_bp),
                          format_bytes(row.bytes_converted), format_bytes(row.bytes_saved),
                          row.rule, row.explanation)
        if len(shown) < len(rows):
            hidden = len(rows) - len(shown)
            table.caption = f"{hidden} more row{'s' if hidden > 1 else ''} not shown (top={top})"
        console.print(table)
        totals = Table.grid(padding=(0, 2))
        for label, value in self._totals_lines():
            totals.add_row(label, value)
        console.print(Panel(totals, title="totals (one training step)", expand=False))
        if self.untraced:
            listed = "; ".join(f"{display_name(u.name)} ({u.type_name}): {u.reason}"
                               for u in self.untraced[:5])
            more = f" and {len(self.untraced) - 5} more" if len(self.untraced) > 5 else ""
            console.print(f"untraced: {listed}{more}", highlight=False)
        for note in self.notes:
            console.print(f"note: {note}", highlight=False)

    def _totals_lines(self) -> list[tuple[str, str]]:
        t = self.totals
        saved = format_bytes(t.bp_bytes - t.converted_bytes)
        return [
            ("activations kept, BP", format_bytes(t.bp_bytes)),
            ("activations kept, converted",
             f"{format_bytes(t.converted_bytes)}  (ratio {t.ratio:.3f}, saved {saved})"),
            ("parameters", format_bytes(t.parameter_bytes)),
            ("gradients", format_bytes(t.gradient_bytes)),
            (f"optimizer state ({t.optimizer or 'none given'})", format_bytes(t.optimizer_state_bytes)),
            ("largest transient", format_bytes(t.largest_transient_bytes)),
            ("optimizer step's temporaries", format_bytes(t.optimizer_step_bytes)),
            ("simulated step above its start, BP", _step_line(t.bp_step_bytes)),
            ("simulated step above its start, converted", _step_line(t.converted_step_bytes)),
            ("predicted peak, BP", format_bytes(t.peak_bp_bytes)),
            ("predicted peak, converted", format_bytes(t.peak_converted_bytes)),
            ("estimated on", self.estimated_on),
        ]


def _step_line(step_bytes: int | None) -> str:
    return "not simulated (see the notes)" if step_bytes is None else format_bytes(step_bytes)


def _largest_saving_first(row: Row) -> tuple[int, int, str]:
    return (-row.bytes_saved, -row.bytes_bp, row.name)


def _explanation(name: str, module: nn.Module, plan: Plan, untraced: dict[str, Untraced]) -> str:
    """Why ``name`` keeps what it keeps: the site's reason, a rule's skip, or what BP does."""
    if name in plan.sites:
        return plan.sites[name].reason
    if name in untraced:
        return f"not traced ({untraced[name].reason}); kept as is"
    if any(True for _ in module.children()):
        return f"functional ops in {display_name(name)} (not rewritten)"
    skips = [skip for skip in plan.skips if skip.module_name == name]
    if skips:
        return f"left as is by {skips[0].rule}: {skips[0].reason}"
    return f"kept as is: no chosen rule converts {type(module).__name__}; its backward needs what it keeps"


def _routed_sites(plan: Plan) -> dict[str, list[Site]]:
    """Per parent, the sites whose ``F.linear`` calls its own forward makes and hands to them (``ROUTED_BY``)."""
    routed: dict[str, list[Site]] = {}
    for site in plan.sites.values():
        if ROUTED_BY in site.payload:
            routed.setdefault(site.payload[ROUTED_BY], []).append(site)
    return routed


def _routed_explanation(routed: list[Site]) -> str:
    layers = ", ".join(display_name(site.module_name) for site in routed)
    return f"its own F.linear calls on {layers} run as {routed[0].rule}: {routed[0].reason.split(';')[0]}"


def _covering_site(name: str, plan: Plan) -> Site | None:
    """The nearest ancestor's site whose rewrite reaches into ``name`` (``COVERS``), when ``name`` has none."""
    if name in plan.sites or not name:
        return None
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        site = plan.sites.get(".".join(parts[:depth]))
        if site is not None and COVERS in site.payload:
            return site
    return None


def _shared_note(name: str, bp: SavedByModule, converted: SavedByModule) -> str:
    """Why a row keeps more after conversion: a tensor BP counted at another module is counted here now."""
    owner = bp.counted_at.get(name)
    if owner is None or converted.bytes_by_module.get(name, 0) <= bp.bytes_by_module.get(name, 0):
        return ""
    return f"; BP counted this tensor at {display_name(owner)} (shared), so the extra is not new memory"


def build_report(
    facts: ModelFacts,
    plan: Plan,
    bp: SavedByModule,
    converted: SavedByModule,
    *,
    optimizer: str | None = None,
    estimated_on: str = "fake tensors",
    notes: list[str] | None = None,
) -> Report:
    """Rows for every module that keeps anything under BP or converted, and the totals.

    ``facts`` describe the model as planned (before any rewrite): its modules
    name the rows and its parameters give the parameter, gradient and
    optimizer-state bytes.
    """
    factor = optimizer_state_factor(optimizer)
    modules = facts.modules
    untraced = {u.name: u for u in facts.trace.untraced}
    info = {
        name: (type(module).__name__, *_output_of(bp, name))
        for name, module in modules.items()
    }
    routed_by_parent = _routed_sites(plan)
    rows = []
    for name in sorted(set(bp.bytes_by_module) | set(converted.bytes_by_module)):
        op, shape, dtype = info.get(name, ("", None, None))
        before, after = bp.bytes_by_module.get(name, 0), converted.bytes_by_module.get(name, 0)
        covering = _covering_site(name, plan) if after < before else None
        rule = plan.sites[name].rule if name in plan.sites else covering.rule if covering else ""
        explanation = (covering.payload[COVERS] if covering else
                       _explanation(name, modules.get(name, facts.model), plan, untraced))
        routed = routed_by_parent.get(name)
        if routed and name not in plan.sites:
            rule = ",".join(dict.fromkeys([routed[0].rule, *([rule] if covering else [])]))
            explanation = _routed_explanation(routed) + (f"; {explanation}" if covering else "")
        rows.append(Row(name, op, shape, dtype, before, after, rule,
                        explanation + _shared_note(name, bp, converted)))
    rows.sort(key=_largest_saving_first)
    parameters = list(modules[""].parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    trainable = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    largest_output = max(
        (math.prod(shape) * dtype.itemsize for shape, dtype in bp.outputs.values()), default=0)
    totals = Totals(
        bp_bytes=bp.nbytes,
        converted_bytes=converted.nbytes,
        parameter_bytes=parameter_bytes,
        gradient_bytes=trainable,
        optimizer=optimizer,
        optimizer_state_bytes=factor * trainable,
        largest_transient_bytes=2 * largest_output,
        optimizer_step_bytes=optimizer_step_bytes(optimizer, [p for p in parameters if p.requires_grad]),
        bp_step_bytes=bp.step_bytes,
        converted_step_bytes=converted.step_bytes,
    )
    return Report(
        model=type(modules[""]).__name__,
        rules=[rule.name for rule in plan.rules],
        rows=rows,
        totals=totals,
        untraced=list(facts.trace.untraced),
        estimated_on=estimated_on,
        notes=list(notes or ()),
        module_info=info,
    )


def _output_of(saved: SavedByModule, name: str) -> tuple[tuple[int, ...] | None, str | None]:
    if name not in saved.outputs:
        return None, None
    shape, dtype = saved.outputs[name]
    return shape, dtype_name(dtype)
