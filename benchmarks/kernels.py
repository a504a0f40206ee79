"""Throughput of the packing kernels next to tensor.clone(), as a table and JSON.

GB/s counts bytes read plus bytes written (GB = 1e9 bytes) per call, the
minimum time over repeats. 1 bit is ``pack_bits``/``unpack_bits`` (sign
decoding); 2/4/8 bits are ``quantize``/``dequantize`` (nearest rounding, groups
of 256, fp16 scales). On CUDA the Triton kernels run; on CPU the CPU path
(``aalconvert/kernels/quantize_cpu.py``) for k bits and the torch reference for 1 bit.

    python benchmarks/kernels.py --quick                 # a few small sizes, CPU, < 30 s
    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels_h100.json
"""

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aalconvert.kernels import dequantize, pack_bits, quantize, quantized_nbytes, unpack_bits
from aalconvert.kernels.dispatch import use_cpu_path, use_triton

MIB = 2**20
DEFAULT_SIZES = "1MB,4MB,16MB,64MB,256MB,1GB"
QUICK_SIZES = "1MB,4MB"
GROUP_SIZE = 256


def parse_size(text: str) -> int:
    """'16MB' or '1GB' (binary units: MB = 2**20 bytes) -> bytes of input."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    text = text.strip().upper()
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    raise argparse.ArgumentTypeError(f"size {text!r} must end in KB, MB or GB, e.g. 16MB")


def seconds_per_call(fn, device: torch.device, repeats: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            start_time = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start_time)
    return best


def measure(size_bytes: int, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict]:
    """One row per (op, bits) for an input of ``size_bytes`` bytes of ``dtype``."""
    element_size = torch.empty((), dtype=dtype).element_size()
    numel = size_bytes // element_size
    x = torch.randn(numel, device=device).to(dtype)
    input_bytes = numel * element_size
    rows = []

    def add(op: str, bits: int, fn, moved_bytes: int) -> None:
        seconds = seconds_per_call(fn, device, repeats)
        rows.append(
            dict(op=op, bits=bits, input_bytes=input_bytes, moved_bytes=moved_bytes,
                 ms=seconds * 1e3, gbps=moved_bytes / seconds / 1e9)
        )  # fmt: skip

    add("clone", 0, x.clone, 2 * input_bytes)
    packed = pack_bits(x)
    add("pack", 1, lambda: pack_bits(x), input_bytes + packed.numel())
    add("unpack", 1,
        lambda: unpack_bits(packed, x.shape, decode="sign", dtype=dtype),
        packed.numel() + input_bytes)  # fmt: skip
    for bits in (2, 4, 8):
        stored = quantized_nbytes(numel, bits, GROUP_SIZE)
        q = quantize(x, bits, group_size=GROUP_SIZE)
        encode = lambda: quantize(x, bits, group_size=GROUP_SIZE)  # noqa: E731
        add("quantize", bits, encode, input_bytes + stored)
        add("dequantize", bits, lambda: dequantize(q), stored + input_bytes)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, threads={torch.get_num_threads()})"


def render(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for name in ("size (MiB)", "op", "bits", "ms", "GB/s", "x clone"):
        table.add_column(name, justify="right")
    clone_gbps = {r["input_bytes"]: r["gbps"] for r in rows if r["op"] == "clone"}
    for r in rows:
        table.add_row(
            f"{r['input_bytes'] / MIB:g}", r["op"], str(r["bits"]) if r["bits"] else "-",
            f"{r['ms']:.3f}", f"{r['gbps']:.1f}", f"{r['gbps'] / clone_gbps[r['input_bytes']]:.2f}",
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated input sizes (default {DEFAULT_SIZES})")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per op (min kept)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fast run: sizes {QUICK_SIZES}, 5 repeats")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: steady on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    size_list = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    sizes = [parse_size(s) for s in size_list.split(",")]
    repeats = args.repeats or (5 if args.quick else 10)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = [row for size in sizes for row in measure(size, dtype, device, repeats)]

    probe = torch.empty(0, device=device)
    backend = "triton" if use_triton(probe, "auto") else "cpu" if use_cpu_path(probe, "auto") else "reference"
    title = f"aalconvert kernels, {args.dtype} input, {backend} on {device_name(device)}"
    Console().print(render(rows, title))
    if args.json:
        result = dict(
            device=device_name(device),
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            backend=backend, dtype=args.dtype, cpu_threads=args.threads,
            group_size=GROUP_SIZE, repeats=repeats,
            torch=torch.__version__, rows=rows,
        )  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
