"""Train any example model on real data, converted with any rule set, next to plain backprop.

    python -m examples.train resnet_basic --rules auto --compare-bp
    python -m examples.train gpt --rules auto+approx4 --steps 200 --seed 1
    python -m examples.train transformer --rules bp --smoke

Tasks (data in ``examples/data.py``): the image models classify scikit-learn's
digits (test accuracy, %); ``bert`` is a masked-LM and ``gpt`` a next-byte model on
standard-library source (validation loss, nats per token; perplexity = exp(loss));
``transformer`` reverses digit sequences (token accuracy with teacher forcing, %).

Each run prints the held-out metric, the bytes the forward keeps for backward
(``measure_saved`` on the first step) and the median step time, and logs every
ARA/ASA layer's learning indicator (mean and min per logging interval).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aalconvert
from aalconvert.memory import measure_saved
from aalconvert.nn.indicator import auxiliary_layers, record_learning_indicators
from examples import EXAMPLES
from examples import data as datasets

BP = "bp"  # the rule-set name for plain, unconverted backprop


class Task(Protocol):
    """What the training loop needs from a task: batches, a loss and a held-out metric."""

    metric: str  # name and unit of the held-out metric
    higher_is_better: bool

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        """Model inputs and targets for one training step, drawn with ``generator`` (CPU tensors)."""

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Scalar training loss."""

    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        """The metric on the fixed held-out data (the model is already in eval mode)."""


class ImageClassification:
    """Digits classification; metric: test accuracy (%) over the held-out split."""

    metric = "test accuracy (%)"
    higher_is_better = True

    def __init__(self, image_size: int, in_channels: int, eval_limit: int | None):
        self.split = datasets.digits(image_size, in_channels)
        self.eval_limit = eval_limit

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        index = torch.randint(0, len(self.split.train_labels), (batch_size,), generator=generator)
        return (self.split.train_images[index],), self.split.train_labels[index]

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        images, labels = self.split.test_images[: self.eval_limit], self.split.test_labels[: self.eval_limit]
        correct = sum(
            (model(chunk.to(device)).argmax(-1).cpu() == target).sum().item()
            for chunk, target in zip(images.split(256), labels.split(256))
        )
        return 100.0 * correct / len(labels)


class LanguageModelling:
    """Byte-level LM on stdlib source; ``masked`` picks masked-LM (15% masked) over next-token.

    Metric: validation loss (nats per predicted token) on fixed windows of held-out text.
    """

    metric = "validation loss (nats/token)"
    higher_is_better = False
    mask_probability = 0.15

    def __init__(self, seq_len: int, masked: bool, eval_windows: int):
        self.text = datasets.stdlib_text()
        self.seq_len = seq_len
        self.masked = masked
        window = seq_len if masked else seq_len + 1
        windows = datasets.consecutive_windows(self.text.validation, eval_windows, window)
        if masked:
            self.validation = datasets.mask_tokens(windows, self.mask_probability, torch.Generator().manual_seed(0))
        else:
            self.validation = (windows[:, :-1], windows[:, 1:])

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        if self.masked:
            windows = datasets.random_windows(self.text.train, batch_size, self.seq_len, generator)
            inputs, targets = datasets.mask_tokens(windows, self.mask_probability, generator)
            return (inputs,), targets
        windows = datasets.random_windows(self.text.train, batch_size, self.seq_len + 1, generator)
        return (windows[:, :-1],), windows[:, 1:]

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output.flatten(0, 1), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        inputs, targets = self.validation
        total, count = 0.0, 0
        for chunk, target in zip(inputs.split(128), targets.split(128)):
            logits = model(chunk.to(device)).float().cpu()
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += (target != -100).sum().item()
        return total / count


class Reversal:
    """Reverse a digit sequence; metric: token accuracy (%) with teacher forcing on a fixed test set."""

    metric = "token accuracy (%)"
    higher_is_better = True
    test_seed = 10_000  # the test sequences are the same for every training seed

    def __init__(self, length: int, eval_sequences: int):
        self.length = length
        self.test = datasets.reversal_batch(eval_sequences, length, torch.Generator().manual_seed(self.test_seed))

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
        source, decoder_input, target = datasets.reversal_batch(batch_size, self.length, generator)
        return (source, decoder_input), target

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> float:
        source, decoder_input, target = self.test
        predicted = model(source.to(device), decoder_input.to(device)).argmax(-1).cpu()
        return 100.0 * (predicted == target).float().mean().item()


@dataclass(frozen=True)
class TrainConfig:
    """How one example trains: its task, model config overrides and defaults (full and ``--smoke``).

    ``make_task(smoke)`` builds the task (data loaded once per call); ``lr`` is AdamW's peak learning rate.
    ``converged_steps``: a run length at which BP's held-out metric has stopped improving (checked by
    ``benchmarks/fidelity.py --converged``, whose BP rows show the change over the last quarter); None
    where no such length was measured. ``steps`` stays short so a first try takes minutes.
    """

    make_task: Callable[[bool], Task]
    overrides: dict
    smoke_overrides: dict
    steps: int
    batch_size: int
    lr: float
    smoke_steps: int = 5
    smoke_batch_size: int = 8
    converged_steps: int | None = None


def _image(image_size: int, smoke_size: int) -> Callable[[bool], ImageClassification]:
    return lambda smoke: ImageClassification(smoke_size if smoke else image_size, 1, 32 if smoke else None)


def _text(seq_len: int, smoke_len: int, masked: bool) -> Callable[[bool], LanguageModelling]:
    return lambda smoke: LanguageModelling(smoke_len if smoke else seq_len, masked, 4 if smoke else 128)


TINY_RESNET = dict(width=4, layers=(2, 1, 1, 1), image_size=16)  # two blocks in layer1: one ARA group (groups stay inside a stage)
TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "resnet_basic": TrainConfig(
        _image(32, 16), dict(in_channels=1, image_size=32), dict(in_channels=1, **TINY_RESNET),
        steps=300, batch_size=64, lr=2e-3),
    "resnet_bottleneck": TrainConfig(
        _image(32, 16), dict(in_channels=1, image_size=32), dict(in_channels=1, **TINY_RESNET),
        steps=300, batch_size=64, lr=2e-3, converged_steps=800),
    "vit": TrainConfig(
        _image(16, 8), dict(in_channels=1, image_size=16, patch_size=4),
        dict(in_channels=1, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2),
        steps=400, batch_size=64, lr=1e-3),
    "mixer": TrainConfig(
        _image(16, 8), dict(in_channels=1, image_size=16, patch_size=4),
        dict(in_channels=1, image_size=8, patch_size=4, dim=16, depth=1, tokens_hidden_dim=8,
             channels_hidden_dim=16),
        steps=400, batch_size=64, lr=1e-3),
    "bert": TrainConfig(
        _text(32, 8, masked=True), dict(vocab_size=257, seq_len=32),
        dict(vocab_size=257, seq_len=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=32),
        steps=400, batch_size=32, lr=1e-3),
    "gpt": TrainConfig(
        _text(32, 8, masked=False), dict(vocab_size=257, seq_len=32),
        dict(vocab_size=257, seq_len=8, n_embd=16, n_layer=1, n_head=2),
        steps=400, batch_size=32, lr=1e-3),
    "transformer": TrainConfig(
        lambda smoke: Reversal(6 if smoke else 12, 16 if smoke else 512),
        dict(src_vocab_size=datasets.SEQ2SEQ_VOCAB, tgt_vocab_size=datasets.SEQ2SEQ_VOCAB, src_len=12, tgt_len=12),
        dict(src_vocab_size=datasets.SEQ2SEQ_VOCAB, tgt_vocab_size=datasets.SEQ2SEQ_VOCAB, src_len=6, tgt_len=6,
             d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1),
        steps=400, batch_size=64, lr=1e-3, converged_steps=1200),
}
"""Every entry of ``examples.EXAMPLES`` has one; the defaults take a few minutes per run on one CPU core."""


@dataclass
class RunResult:
    """One training run. Times in seconds, memory in bytes, metric in the task's unit."""

    example: str
    rules: str
    seed: int
    steps: int
    batch_size: int
    device: str
    metric: str
    higher_is_better: bool
    final_metric: float
    kept_bytes: int  # bytes the forward of the first step kept for backward (measure_saved)
    step_time_s: float  # median forward+backward+optimizer time over the timed steps
    auxiliary_layers: int  # ARA/ASA layers the rules put in
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out metric)
    losses: list[float] = field(default_factory=list)  # training loss of every step
    # per logging interval: {"step": steps done, "layers": {name: {"mean": LI, "min": LI}}}
    indicators: list[dict] = field(default_factory=list)

    @property
    def min_indicator(self) -> float | None:
        """Smallest per-sample learning indicator seen in any ARA/ASA layer; None without such layers."""
        values = [layer["min"] for interval in self.indicators for layer in interval["layers"].values()]
        return min(values) if values else None


def rule_list(rules: str) -> list[str]:
    """``"auto+approx4"`` -> ``["auto", "approx4"]``; ``"bp"`` -> ``[]`` (no conversion)."""
    names = [name for name in rules.split("+") if name]
    if not names:
        raise ValueError(f"--rules: empty rule set {rules!r}; give rule names joined by '+', or 'bp'")
    if BP in names and names != [BP]:
        raise ValueError(f"--rules: 'bp' means no conversion and cannot be combined with rules, got {rules!r}")
    return [] if names == [BP] else names


def _lr_factor(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _summarise_indicators(steps_done: int, window: dict[str, list[Tensor]]) -> dict:
    """Mean and min of the per-sample LI gathered in one logging interval, per layer."""
    layers = {}
    for name, values in window.items():
        merged = torch.cat(values)
        layers[name] = {"mean": merged.mean().item(), "min": merged.min().item()}
    return {"step": steps_done, "layers": layers}


def train(
    example: str,
    rules: str = BP,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    smoke: bool = False,
    lr: float | None = None,
    eval_points: int = 10,
    indicator_every: int = 5,
    task: Task | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``example`` converted with ``rules`` ('+'-joined names, or 'bp') and return the record.

    The same ``seed`` gives the same initial weights, batches and dropout draws for
    every rule set (the global RNG is re-seeded after conversion). The learning
    indicator is recorded on every ``indicator_every``-th step; those steps, the
    first step (memory measurement) and two warm-up steps are left out of the step
    time, so the hooks never count. ``task`` reuses loaded data across runs.
    """
    if example not in TRAIN_CONFIGS:
        raise ValueError(f"unknown example {example!r}; choose from {sorted(TRAIN_CONFIGS)}")
    config = TRAIN_CONFIGS[example]
    overrides = config.smoke_overrides if smoke else config.overrides
    steps = steps or (config.smoke_steps if smoke else config.steps)
    batch_size = batch_size or (config.smoke_batch_size if smoke else config.batch_size)
    names = rule_list(rules)
    target = torch.device(device)
    task = task or config.make_task(smoke)
    batches = torch.Generator().manual_seed(seed)

    torch.manual_seed(seed)
    model = EXAMPLES[example].build_model(**overrides).to(target)
    if names:
        inputs, _ = task.batch(2, torch.Generator().manual_seed(seed))
        model = aalconvert.convert(model, names, example_inputs=tuple(x.to(target) for x in inputs))
    torch.manual_seed(seed)
    watched = auxiliary_layers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr or config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(steps))
    eval_steps = {round(steps * (i + 1) / eval_points) - 1 for i in range(eval_points)}
    log_every = max(1, steps // eval_points)

    result = RunResult(example, rules, seed, steps, batch_size, str(target), task.metric,
                       task.higher_is_better, math.nan, 0, math.nan, len(watched))
    step_times: list[float] = []
    window: dict[str, list[Tensor]] = {}
    for step in range(steps):
        inputs, targets = task.batch(batch_size, batches)
        inputs, targets = tuple(x.to(target) for x in inputs), targets.to(target)
        model.train()
        record = bool(watched) and step % indicator_every == 0
        timed = step >= 3 and not record
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        start = time.perf_counter()
        with record_learning_indicators(watched if record else {}) as indicators:
            if step == 0:
                saved = measure_saved(lambda: model(*inputs), model.parameters())
                result.kept_bytes, output = saved.nbytes, saved.output
            else:
                output = model(*inputs)
        loss = task.loss(output, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        if timed:
            step_times.append(time.perf_counter() - start)
        result.losses.append(loss.item())
        for name, values in indicators.items():
            window.setdefault(name, []).append(values.cpu())
        if window and ((step + 1) % log_every == 0 or step == steps - 1):
            result.indicators.append(_summarise_indicators(step + 1, window))
            window = {}
        if step in eval_steps:
            model.eval()
            result.curve.append((step + 1, task.evaluate(model, target)))
            if log:
                log(f"[{example} {rules} seed {seed}] step {step + 1}/{steps}  train loss {loss.item():.4f}  "
                    f"{task.metric} {result.curve[-1][1]:.3f}{_indicator_text(result.indicators)}")
    result.final_metric = result.curve[-1][1]
    result.step_time_s = statistics.median(step_times) if step_times else math.nan
    return result


def _indicator_text(intervals: list[dict]) -> str:
    """Mean and min LI over the layers of the latest logging interval, for progress lines."""
    if not intervals:
        return ""
    layers = intervals[-1]["layers"].values()
    return f"  LI mean {statistics.fmean(v['mean'] for v in layers):.3f} min {min(v['min'] for v in layers):.3f}"


def _describe(result: RunResult) -> str:
    text = (f"{result.example} [{result.rules}] seed {result.seed}: {result.metric} {result.final_metric:.3f}, "
            f"forward kept {result.kept_bytes / 2**20:.2f} MiB, step {result.step_time_s * 1e3:.1f} ms")
    if result.metric.startswith("validation loss"):
        text += f", perplexity {math.exp(result.final_metric):.2f}"
    if result.auxiliary_layers:
        text += f", {result.auxiliary_layers} ARA/ASA layers, min learning indicator {result.min_indicator:.4f}"
    return text


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=sorted(TRAIN_CONFIGS))
    parser.add_argument("--rules", default="auto", help="rule names joined by '+' (e.g. auto+approx4), or 'bp'")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the example's, or 3 with --smoke)")
    parser.add_argument("--batch-size", type=int, help="samples per step (default: the example's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the example's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (for tests)")
    parser.add_argument("--compare-bp", action="store_true", help="also train plain backprop in this process")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the run records here")
    args = parser.parse_args(argv)
    try:
        rule_list(args.rules)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    config = TRAIN_CONFIGS[args.example]
    task = config.make_task(args.smoke)
    options = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device,
                   smoke=args.smoke, lr=args.lr, task=task, log=print)
    results = [train(args.example, args.rules, **options)]
    if args.compare_bp and args.rules != BP:
        results.append(train(args.example, BP, **options))
    for result in results:
        print(_describe(result))
    if len(results) == 2:
        converted, plain = results
        print(f"{args.rules} / bp: forward kept {converted.kept_bytes / plain.kept_bytes:.3f}x, "
              f"step time {converted.step_time_s / plain.step_time_s:.3f}x, "
              f"{converted.metric} {converted.final_metric:.3f} vs {plain.final_metric:.3f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
