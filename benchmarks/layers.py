"""Each layer variant against its plain torch layer: forward+backward time and bytes kept for backward.

Sizes are those of ResNet-50 (stage convs, bottleneck 1x1 convs, batch norm,
ReLU, stem max-pool) and ViT-B/16 (q/k/v, projection, MLP linears, layer norm,
GELU, attention softmax) at batch 64, plus a few labelled stand-in shapes for
variants those two models do not use (Conv1d, Conv3d, BatchNorm1d, SiLU,
dropout). Every variant is timed interleaved with the torch layer of the same
shape (warm-up, then the median of ``--repeats`` runs; CUDA is synchronized
around each run). Bytes kept are measured with ``aalconvert.memory.measure_saved``
on one forward, parameters and buffers excluded; tensors that the surrounding
model keeps anyway are excluded too and named in the row's ``not_counted``:
the ARA anchor (kept once per group by the group's first block) and the chain
input of a recomputing layer (kept by the norm or activation that reads it).

On CUDA the rows carry the issue's targets (ARA, ASA and lossless variants at
most 1.05x the torch layer's time, 4-bit approximate variants at most 1.25x).
On CPU the kernels are the torch references of ``aalconvert.kernels``, so the
times there say nothing about the targets.

    python benchmarks/layers.py                      # cuda if available, else cpu
    python benchmarks/layers.py --quick              # tiny sizes, a few seconds on CPU
    python benchmarks/layers.py --json benchmarks/results/layers.json
"""

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from aalconvert.memory import measure_saved
from aalconvert.nn.approx import (
    ApproxBatchNorm1d,
    ApproxBatchNorm2d,
    ApproxConv1d,
    ApproxConv2d,
    ApproxGELU,
    ApproxLayerNorm,
    ApproxLinear,
    ApproxReLU,
    ApproxSiLU,
    ApproxSoftmax,
)
from aalconvert.nn.approx_shared_relu import SharedCopyReLU
from aalconvert.nn.approx_weighted import ApproxTransposedLinear
from aalconvert.nn.ara import ARAConv1d, ARAConv2d, ARALinear
from aalconvert.nn.asa import ASAConv1d, ASAConv2d, ASALinear, ASATransposedLinear
from aalconvert.nn.lossless import (
    CompactMaxPool2d,
    MaskDropout,
    MaskHardtanh,
    MaskLeakyReLU,
    MaskReLU,
    MaskReLU6,
)
from aalconvert.nn.recompute import (
    RecomputedInputConv1d,
    RecomputedInputConv2d,
    RecomputedInputConv3d,
    RecomputedInputLinear,
    RecomputedInputTransposedLinear,
)

EXACT_KERNEL_TARGET = 1.05
"""Issue target on a GPU: ARA, ASA and lossless variants, variant time / torch time."""
APPROX_4BIT_TARGET = 1.25
"""Issue target on a GPU: 4-bit approximate variants, variant time / torch time."""
APPROX_BITS = 4
WARMUP_RUNS = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Chain = Callable[[nn.Module], tuple[nn.Module, ...]]


# ------------------------------------------------------------------ what is measured


@dataclass(frozen=True)
class Variant:
    """One variant class and how a layer calls it.

    ``calling``: "plain" ``m(x)``; "anchor" ``m(x, anchor)`` (ARA); "chain"
    ``m(chain(z), z)`` (recompute), with ``chain`` building the norm/activation
    modules that make the layer's input from ``z``.
    """

    cls: type[nn.Module]
    options: dict
    target: float | None
    calling: str = "plain"
    chain: Chain | None = None
    chain_label: str = ""

    @property
    def label(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.options.items())
        detail = settings or (f"chain {self.chain_label}" if self.chain_label else "")
        return f"{self.cls.__name__} ({detail})" if detail else self.cls.__name__

    def convert(self, module: nn.Module, chain: tuple[nn.Module, ...]) -> nn.Module:
        """The variant of ``module`` (``chain``: the modules making its input, "chain" calling)."""
        if self.calling == "chain":
            return self.cls.from_module(module, chain=chain)
        return self.cls.from_module(module, **self.options)


@dataclass(frozen=True)
class Layer:
    """A plain torch layer at one shape and the variants compared with it."""

    model: str
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Sizes:
    """Shapes of the benchmark (elements); ``full`` is ResNet-50 / ViT-B/16 at a given batch."""

    batch: int
    stages: tuple[tuple[int, int], ...]  # ResNet-50 stage (channels, side) of the 3x3 convs
    bottlenecks: tuple[tuple[int, int, int], ...]  # 1x1 convs: (in channels, out channels, side)
    stem: tuple[int, int]  # (channels, side) entering the stem max-pool
    tokens: int
    dim: int
    mlp: int
    heads: int
    conv1d: tuple[int, int]  # (channels, length), stand-in shape
    conv3d: tuple[int, int, int]  # (channels, depth, side), stand-in shape

    @classmethod
    def full(cls, batch: int) -> "Sizes":
        return cls(
            batch=batch,
            stages=((64, 56), (128, 28), (256, 14), (512, 7)),
            bottlenecks=((256, 64, 56), (64, 256, 56), (1024, 256, 14)),
            stem=(64, 112),
            tokens=197, dim=768, mlp=3072, heads=12,
            conv1d=(256, 197),
            conv3d=(32, 8, 14),
        )

    @classmethod
    def quick(cls, batch: int) -> "Sizes":
        """Tiny shapes whose activations still have >= 4096 elements at batch 2
        (smaller ones are kept exact by the approximate variants) and awkward sizes."""
        return cls(
            batch=batch,
            stages=((8, 17), (16, 12)),
            bottlenecks=((32, 8, 17),),
            stem=(8, 34),
            tokens=37, dim=130, mlp=520, heads=2,
            conv1d=(24, 97),
            conv3d=(8, 4, 12),
        )


def _approx(cls: type[nn.Module]) -> Variant:
    return Variant(cls, {"bits": APPROX_BITS}, APPROX_4BIT_TARGET)


def _exact(cls: type[nn.Module], calling: str = "plain") -> Variant:
    return Variant(cls, {}, EXACT_KERNEL_TARGET, calling)


def _recompute(cls: type[nn.Module], chain: Chain, label: str) -> Variant:
    return Variant(cls, {}, None, "chain", chain, label)


def _bn_relu_2d(conv: nn.Module) -> tuple[nn.Module, ...]:
    return nn.BatchNorm2d(conv.in_channels), nn.ReLU()


def _bn_relu_1d(conv: nn.Module) -> tuple[nn.Module, ...]:
    return nn.BatchNorm1d(conv.in_channels), nn.ReLU()


def _bn_relu_3d(conv: nn.Module) -> tuple[nn.Module, ...]:
    return nn.BatchNorm3d(conv.in_channels), nn.ReLU()


def _layer_norm(linear: nn.Module) -> tuple[nn.Module, ...]:
    return (nn.LayerNorm(linear.in_features),)


def _gelu(linear: nn.Module) -> tuple[nn.Module, ...]:
    return (nn.GELU(),)


def _weighted_variants(ara, asa, approx, recompute: Variant | None = None) -> tuple[Variant, ...]:
    """ARA (with an anchor), ASA, 4-bit approximate and, where the input is rebuildable, recompute."""
    variants = (_exact(ara, "anchor"), _exact(asa), _approx(approx))
    return variants + ((recompute,) if recompute else ())


def _conv2d_variants() -> tuple[Variant, ...]:
    return _weighted_variants(
        ARAConv2d, ASAConv2d, ApproxConv2d,
        _recompute(RecomputedInputConv2d, _bn_relu_2d, "BN->ReLU"),
    )


def _linear_variants(recompute: Variant | None = None) -> tuple[Variant, ...]:
    return _weighted_variants(ARALinear, ASALinear, ApproxLinear, recompute)


def resnet50_layers(s: Sizes) -> list[Layer]:
    """Stage 3x3 convs, bottleneck 1x1 convs, BN and ReLU at stage shapes, MobileNet-style
    ReLU6/Hardtanh/LeakyReLU at the first stage shape, stem max-pool."""
    b = s.batch
    layers = [
        Layer("ResNet-50", f"conv3x3 {c}ch {side}x{side}",
              lambda c=c: nn.Conv2d(c, c, 3, padding=1, bias=False), (b, c, side, side), _conv2d_variants())
        for c, side in s.stages
    ]
    layers += [
        Layer("ResNet-50", f"conv1x1 {cin}->{cout}ch {side}x{side}",
              lambda cin=cin, cout=cout: nn.Conv2d(cin, cout, 1, bias=False),
              (b, cin, side, side), _conv2d_variants())
        for cin, cout, side in s.bottlenecks
    ]
    layers += [
        Layer("ResNet-50", f"BatchNorm2d {c}ch {side}x{side}", lambda c=c: nn.BatchNorm2d(c),
              (b, c, side, side), (_approx(ApproxBatchNorm2d),))
        for c, side in s.stages
    ]
    layers += [
        Layer("ResNet-50", f"ReLU {c}ch {side}x{side}", nn.ReLU, (b, c, side, side),
              (_exact(MaskReLU), _approx(ApproxReLU), _approx(SharedCopyReLU)))
        for c, side in s.stages
    ]
    c, side = s.stages[0]  # the piecewise-linear activations of MobileNet-style nets, at a stage shape
    layers += [
        Layer("ResNet-50", f"{label} {c}ch {side}x{side}", make, (b, c, side, side), (_exact(variant),))
        for label, make, variant in (
            ("ReLU6", nn.ReLU6, MaskReLU6),
            ("Hardtanh(-1, 1)", nn.Hardtanh, MaskHardtanh),
            ("LeakyReLU(0.1)", lambda: nn.LeakyReLU(0.1), MaskLeakyReLU),
        )
    ]
    c, side = s.stem
    layers.append(
        Layer("ResNet-50", f"max-pool 3x3/2 {c}ch {side}x{side}",
              lambda: nn.MaxPool2d(3, stride=2, padding=1), (b, c, side, side),
              (_exact(CompactMaxPool2d),))
    )
    return layers


def vit_b16_layers(s: Sizes) -> list[Layer]:
    """q/k/v, projection and MLP linears, layer norm, GELU, attention softmax, MLP dropout."""
    tokens = (s.batch, s.tokens)
    after_norm = _recompute(RecomputedInputLinear, _layer_norm, "LayerNorm")
    after_gelu = _recompute(RecomputedInputLinear, _gelu, "GELU")
    d, m = s.dim, s.mlp
    return [
        Layer("ViT-B/16", f"qkv {d}->{3 * d}", lambda: nn.Linear(d, 3 * d), (*tokens, d),
              _linear_variants(after_norm)),
        Layer("ViT-B/16", f"proj {d}->{d}", lambda: nn.Linear(d, d), (*tokens, d), _linear_variants()),
        Layer("ViT-B/16", f"fc1 {d}->{m}", lambda: nn.Linear(d, m), (*tokens, d),
              _linear_variants(after_norm)),
        Layer("ViT-B/16", f"fc2 {m}->{d}", lambda: nn.Linear(m, d), (*tokens, m),
              _linear_variants(after_gelu)),
        Layer("ViT-B/16", f"LayerNorm {d}", lambda: nn.LayerNorm(d), (*tokens, d),
              (_approx(ApproxLayerNorm),)),
        Layer("ViT-B/16", f"GELU {m}", nn.GELU, (*tokens, m), (_approx(ApproxGELU),)),
        Layer("ViT-B/16", f"softmax {s.heads}x{s.tokens}x{s.tokens}", lambda: nn.Softmax(dim=-1),
              (s.batch, s.heads, s.tokens, s.tokens), (_approx(ApproxSoftmax),)),
        Layer("ViT-B/16", f"dropout p=0.1 {m}", lambda: nn.Dropout(0.1), (*tokens, m),
              (_exact(MaskDropout),)),
    ]


def other_layers(s: Sizes) -> list[Layer]:
    """Stand-in shapes for variants neither model above uses (labelled as such)."""
    b = s.batch
    c1, length = s.conv1d
    c3, depth, side = s.conv3d
    m = s.mlp
    return [
        Layer("stand-in", f"conv1d k3 {c1}ch L{length}",
              lambda: nn.Conv1d(c1, c1, 3, padding=1, bias=False), (b, c1, length),
              _weighted_variants(ARAConv1d, ASAConv1d, ApproxConv1d,
                                 _recompute(RecomputedInputConv1d, _bn_relu_1d, "BN->ReLU"))),
        Layer("stand-in", f"BatchNorm1d {c1}ch L{length}", lambda: nn.BatchNorm1d(c1),
              (b, c1, length), (_approx(ApproxBatchNorm1d),)),
        Layer("stand-in", f"SiLU {s.tokens}x{m}", nn.SiLU, (b, s.tokens, m),
              (_approx(ApproxSiLU),)),
        Layer("stand-in", f"conv3d k3 {c3}ch {depth}x{side}x{side}",
              lambda: nn.Conv3d(c3, c3, 3, padding=1, bias=False), (b, c3, depth, side, side),
              (_recompute(RecomputedInputConv3d, _bn_relu_3d, "BN->ReLU"),)),
    ]


def _zoo_layer_norm(conv1d: nn.Module) -> tuple[nn.Module, ...]:
    return (nn.LayerNorm(conv1d.weight.shape[0]),)


def gpt2_layers(s: Sizes) -> list[Layer]:
    """The MLP input layer of GPT-2, a transformers Conv1D (weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D  # the test extra; imported only here

    d, m = s.dim, s.mlp
    return [
        Layer("GPT-2", f"Conv1D c_fc {d}->{m}", lambda: Conv1D(m, d), (s.batch, s.tokens, d),
              (_exact(ASATransposedLinear), _approx(ApproxTransposedLinear),
               _recompute(RecomputedInputTransposedLinear, _zoo_layer_norm, "LayerNorm"))),
    ]


def all_layers(sizes: Sizes) -> list[Layer]:
    return resnet50_layers(sizes) + vit_b16_layers(sizes) + gpt2_layers(sizes) + other_layers(sizes)


# ---------------------------------------------------------------------- measuring


class Runner:
    """One module at one shape, ready to run forward+backward repeatedly on fixed inputs."""

    def __init__(self, module: nn.Module, layer: Layer, calling: str, extra: Sequence[nn.Module],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.module = module
        self.input = torch.randn(layer.input_shape, device=device, dtype=dtype)
        self.args: tuple[torch.Tensor, ...] = ()
        self.not_counted: list[torch.Tensor] = []
        self.not_counted_note = ""
        if calling == "anchor":
            anchor = torch.randn_like(self.input)
            self.args, self.not_counted = (anchor,), [anchor]
            self.not_counted_note = "anchor (kept once per group by its first block)"
        elif calling == "chain":
            z = torch.randn_like(self.input)
            with torch.no_grad():
                self.input = z
                for step in extra:
                    self.input = step(self.input)
            self.args, self.not_counted = (z,), [z]
            self.not_counted_note = "chain input (kept by the chain's norm/activation)"
        self.input.requires_grad_(True)
        self.state = [*module.parameters(), *module.buffers()]
        for step in extra:
            self.state += [*step.parameters(), *step.buffers()]
        # Bytes one forward keeps for backward: parameters, buffers and not_counted excluded.
        saved = measure_saved(self.forward, exclude=[*self.state, *self.not_counted])
        self.saved_bytes = saved.nbytes
        self.output_shape = tuple(saved.output.shape)
        self.grad_output = torch.randn_like(saved.output)

    def forward(self) -> torch.Tensor:
        return self.module(self.input, *self.args)

    def step(self) -> None:
        """One forward and backward; gradients are cleared first so none accumulate."""
        self.input.grad = None
        for tensor in self.state:
            tensor.grad = None
        torch.autograd.backward(self.forward(), self.grad_output)


def _build(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).train()


def make_runners(layer: Layer, device: torch.device, dtype: torch.dtype) -> list[Runner]:
    """The torch layer's runner first, then one per variant, each on its own copy of the layer."""
    runners = [Runner(_build(layer.make(), device, dtype), layer, "plain", (), device, dtype)]
    for variant in layer.variants:
        plain = layer.make()
        chain = tuple(_build(m, device, dtype) for m in variant.chain(plain)) if variant.chain else ()
        converted = variant.convert(_build(plain, device, dtype), chain)
        runners.append(Runner(converted, layer, variant.calling, chain, device, dtype))
    return runners


def time_runners(runners: list[Runner], repeats: int, device: torch.device) -> list[float]:
    """Median forward+backward time of each runner (ms), the runners interleaved every round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(WARMUP_RUNS):
        for runner in runners:
            runner.step()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for runner, samples in zip(runners, times):
            sync()
            start = time.perf_counter()
            runner.step()
            sync()
            samples.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(samples) for samples in times]


def measure_layer(layer: Layer, device: torch.device, dtype: torch.dtype, repeats: int,
                  on_cuda: bool) -> list[dict]:
    """One JSON row per variant of ``layer``."""
    runners = make_runners(layer, device, dtype)
    times = time_runners(runners, repeats, device)
    torch_bytes = runners[0].saved_bytes
    rows = []
    for variant, runner, ms in zip(layer.variants, runners[1:], times[1:]):
        kept = runner.saved_bytes
        ratio = ms / times[0]
        rows.append({
            "model": layer.model,
            "layer": layer.name,
            "variant": variant.cls.__name__,
            "label": variant.label,
            "options": variant.options,
            "input_shape": list(layer.input_shape),
            "input_numel": math.prod(layer.input_shape),
            "output_shape": list(runner.output_shape),
            "torch_ms": times[0],
            "variant_ms": ms,
            "time_ratio": ratio,
            "torch_bytes": torch_bytes,
            "variant_bytes": kept,
            "kept_ratio": kept / torch_bytes if torch_bytes else None,
            "not_counted": runner.not_counted_note,
            "target_time_ratio": variant.target,
            "meets_target": (ratio <= variant.target) if on_cuda and variant.target else None,
        })
    return rows


# ------------------------------------------------------------------------ output


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


def render(result: dict, console: Console) -> None:
    on_cuda = result["device"] == "cuda"
    table = Table(title=f"Layer variants vs torch, forward+backward, batch {result['batch']}, "
                        f"{result['dtype']}, {result['device_name']}")
    for column in ("variant", "shape", "torch ms", "variant ms", "ratio", "bytes torch",
                   "bytes variant", "kept ratio"):
        table.add_column(column, justify="left" if column in ("variant", "shape") else "right")
    if on_cuda:
        table.add_column("target", justify="right")
    for row in result["rows"]:
        kept = "-" if row["kept_ratio"] is None else f"{row['kept_ratio']:.3f}"
        if row["not_counted"]:
            kept += " *"
        cells = [row["label"], f"{row['model']}: {row['layer']}", f"{row['torch_ms']:.3f}",
                 f"{row['variant_ms']:.3f}", f"{row['time_ratio']:.2f}x",
                 _mib(row["torch_bytes"]), _mib(row["variant_bytes"]), kept]
        if on_cuda:
            target = row["target_time_ratio"]
            verdict = "pass" if row["meets_target"] else "[red]miss[/red]"
            cells.append("-" if target is None else f"<= {target}x {verdict}")
        table.add_row(*cells)
    console.print(table)
    console.print("* not counted (kept by the model anyway): the ARA anchor, kept once per group "
                  "by the group's first block; a recomputing layer's chain input, kept by the "
                  "norm or activation that reads it.")
    if on_cuda:
        judged = [row["meets_target"] for row in result["rows"] if row["meets_target"] is not None]
        console.print(f"{sum(judged)} of {len(judged)} rows with a target meet it.")
    else:
        console.print(f"{result['device_name']}: these timings are of the torch reference kernels "
                      "(no Triton); the issue's targets (<= 1.05x ARA/ASA/lossless, <= 1.25x "
                      "approximate 4-bit) apply on a GPU.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 64, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes at batch 2: a CPU smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per layer, median reported "
                             "(default 10 on CUDA, 3 on CPU, 2 with --quick)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own, or 1 with --quick, "
                             "where tiny ops only lose time to thread start-up and contention)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write the result (rows, device, torch version, date) here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if args.batch is None:
        args.batch = 2 if args.quick else 64
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10 if args.device == "cuda" else 3
    if args.threads is None:
        args.threads = 1 if args.quick else torch.get_num_threads()
    if min(args.batch, args.repeats, args.threads) < 1:
        parser.error(f"--batch, --repeats and --threads must be >= 1, got {args.batch}, "
                     f"{args.repeats} and {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, write JSON if asked; returns the JSON document."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    sizes = Sizes.quick(args.batch) if args.quick else Sizes.full(args.batch)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with console.status("measuring") as status:
            for layer in all_layers(sizes):
                status.update(f"measuring {layer.model} {layer.name}")
                rows += measure_layer(layer, device, dtype, args.repeats, on_cuda)
    finally:
        torch.set_num_threads(threads)
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if on_cuda
        else f"CPU ({platform.processor() or platform.machine()}, torch threads: {args.threads})",
        "kernels": "triton" if on_cuda else "torch reference",
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch,
        "quick": args.quick,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": args.threads,
        "warmup_runs": WARMUP_RUNS,
        "bytes_note": "bytes kept for backward by one forward (aalconvert.memory.measure_saved), "
                      "parameters and buffers excluded, plus the row's not_counted tensor",
        "rows": rows,
    }
    render(result, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
