"""Real zoo models (torchvision, timm, Hugging Face): what each rule set keeps for backward, next to BP.

The zoo: every torchvision classification model
(``torchvision.models.list_models(module=torchvision.models)``), a list of timm
models from many families (``TIMM_MODELS``) and Hugging Face architectures
built from small random-init configs in code (``HF_ARCHITECTURES``) with their
*default* attention implementation. Nothing is downloaded: ``weights=None`` /
``pretrained=False``. Default constructor arguments otherwise (dropout and
drop-path rates as the library sets them), train mode, fp32, CPU.

Two input sizes, because CPU time is the constraint:
- Bytes kept are measured at the size users train at and the issue measured:
  vision batch 2 at 224x224 (Inception v3 at 299; Hugging Face vision configs
  at 224 with 16-pixel patches for ViT/DeiT), text 4 x 128 tokens. A separate
  forward per rule set, converted with these inputs as ``example_inputs``.
- The training step (gradients, timing) runs smaller: vision batch 2 at 64x64
  (299 for Inception v3, whose auxiliary head needs it; 224 for MaxViT, whose
  partition sizes fix it; torchvision and timm ViT/Mixer-style models are built
  for the input size with their own ``image_size``/``img_size`` argument, widths
  untouched), Hugging Face vision configs at 32x32, text 4 x 128 tokens. Its
  bytes kept are recorded too (``ratio_step``): at 64 px many tensors are under
  ``min_numel`` (4096 elements) and stay exact under ``approx*``, which real
  sizes never see. Models over 100M parameters (RegNetY-32GF/128GF, ViT-L/H)
  are measured at the step size only (``memory_skipped`` says so): their tensors
  are far above ``min_numel`` there, and at 224 px they would not fit in memory.
Language models (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``) train
as they are trained: ``labels=`` the token ids, and the gradients are those of
their own loss; every other model's are those of the mean square of its outputs.

Per model and rule set it records, on real tensors, with one seeded forward
and backward of the same model object (the converted model shares its
Parameters; the RNG is seeded the same before every forward, so dropout and
stochastic depth draw the same):
- whether ``aalconvert.convert(model, rules, example_inputs=...)`` converts (else the error);
- bytes kept for backward (``aalconvert.memory.measure_saved``: distinct
  storages saved by autograd, parameters excluded), converted / BP, at the
  memory size (``ratio``) and at the step size (``ratio_step``);
- forward output bit-equal to BP where every rule of the set is forward-exact;
- gradients bit-identical to BP (``torch.equal`` on every parameter's
  gradient) where every rule of the set is gradient-exact (exact, recompute);
- all gradients finite, their cosine to BP's, and the forward+backward time
  ratio of this one step (a single CPU measurement: noisy).

    python benchmarks/zoo.py --setup          # once: builds .zoo-venv/ (torch, torchvision, timm, transformers)
    python benchmarks/zoo.py --save           # the whole zoo; re-runs itself in .zoo-venv/ when that exists
    python benchmarks/zoo.py --quick          # a smoke subset (HF only where torchvision/timm are missing)
    python benchmarks/zoo.py --family timm --rules exact,auto+approx4 --json out.json
    python benchmarks/zoo.py --readme benchmarks/results/zoo_2026-11-29.json   # README table from a run
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZOO_VENV = ROOT / ".zoo-venv"
RESULTS = ROOT / "benchmarks" / "results"
RULE_SETS = ["exact", "recompute", "asa", "ara", "approx4", "auto", "auto+approx4"]
SETUP_PACKAGES = ["torch", "torchvision", "timm", "transformers"]
README_START, README_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


# --------------------------------------------------------------------------- setup (stdlib only)

def _venv_python(venv: Path = ZOO_VENV) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path = ZOO_VENV) -> None:
    """Create ``venv`` with the registry's default torch wheel, torchvision, timm, transformers and aalconvert (editable)."""
    started = time.time()

    def step(message: str, command: list[str]) -> None:
        print(f"[setup {time.time() - started:6.0f}s] {message}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)

    if not _venv_python(venv).exists():
        step("creating the venv", [sys.executable, "-m", "venv", str(venv)])
    python = str(_venv_python(venv))
    step("upgrading pip", [python, "-m", "pip", "install", "--upgrade", "pip"])
    step("installing the zoo (the default torch wheel is the CUDA build; it runs on CPU too)",
         [python, "-m", "pip", "install", *SETUP_PACKAGES])
    step("installing aalconvert itself, editable", [python, "-m", "pip", "install", "-e", str(ROOT)])
    check = "import torch, torchvision, timm, transformers, aalconvert; print('torch', torch.__version__, " \
            "'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
    step("checking the imports", [python, "-c", check])
    print(f"[setup {time.time() - started:6.0f}s] done: run `python benchmarks/zoo.py` (it re-runs itself in {venv})",
          flush=True)


def reexec_in_zoo_venv(script: str, argv: list[str]) -> None:
    """Re-run ``script`` (a benchmark's ``__file__``) under the zoo venv when it exists and this is
    another interpreter; ``--no-venv`` (and ``--setup``) keep it here."""
    python = _venv_python()
    if "--no-venv" in argv or "--setup" in argv or not python.exists() or Path(sys.prefix).resolve() == ZOO_VENV.resolve():
        return
    print(f"(running in {ZOO_VENV}; pass --no-venv to use this interpreter)", flush=True)
    os.execv(str(python), [str(python), str(Path(script).resolve()), *argv])


def package_versions() -> dict[str, str]:
    """torch's version, and torchvision's, timm's and transformers' where they import."""
    import torch

    versions = {"torch": torch.__version__}
    for name in ("torchvision", "timm", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


# --------------------------------------------------------------------------- the zoo

@dataclass
class Entry:
    """One zoo model: ``build()`` gives (model, example inputs) from a seeded RNG."""

    name: str  # "torchvision/resnet18", "timm/convnext_atto", "hf/bert"
    source: str  # torchvision | timm | hf
    family: str
    build: Callable[[], tuple[Any, tuple]]
    quick: bool = False
    # (model, inputs) at the memory size, where the step runs smaller; None: the step's size is it.
    build_for_memory: Callable[[], tuple[Any, tuple]] | None = None


def _images(size: int, batch: int = 2):
    import torch

    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)),)


TORCHVISION_QUICK = {"resnet18", "mobilenet_v3_small", "vit_b_32"}
MEMORY_SIZE = 224  # px: the side at which bytes kept are measured (Inception v3: 299)
# Larger models keep their step-size figures: RegNetY-128GF (645M) at 224 px took over 20 GB of a
# 24 GB machine. 120M takes in EfficientNetV2-L (118.5M; about 1 GB kept by BP at 224 px, from
# 78 MB at 64 px) and RegNetX-32GF (108M); activations alone would not tell RegNetY-128GF apart
# (an estimated 1.3 GB at 224 px): its parameters and their copies are what fill the memory.
MEMORY_SIZE_PARAMETER_LIMIT = 120_000_000


def _torchvision_input(name: str) -> tuple[int, dict]:
    """Input side (px) and constructor arguments for a torchvision classifier."""
    if name == "inception_v3":
        return 299, {}
    if name == "maxvit_t":
        return 224, {}
    if name.startswith("vit_"):
        size = 112 if name.endswith("_14") else 64
        return size, {"image_size": size}
    return 64, {}


def torchvision_entries() -> list[Entry]:
    import torchvision

    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        family = builder.__module__.rsplit(".", 1)[-1]
        size, kwargs = _torchvision_input(name)

        def build(builder=builder, size=size, kwargs=kwargs):
            return builder(weights=None, **kwargs), _images(size)

        def build_for_memory(builder=builder):
            return builder(weights=None), _images(MEMORY_SIZE)

        entries.append(Entry(f"torchvision/{name}", "torchvision", family, build, name in TORCHVISION_QUICK,
                             None if size >= MEMORY_SIZE else build_for_memory))
    return entries


# name -> (input side, extra constructor arguments); img_size where the model bakes in its input size.
TIMM_MODELS: dict[str, tuple[int, dict]] = {
    "resnet18": (64, {}),
    "resnet50d": (64, {}),
    "seresnext26d_32x4d": (64, {}),
    "resnetv2_50": (64, {}),
    "res2net50_26w_4s": (64, {}),
    "efficientnet_b0": (64, {}),
    "mobilenetv2_100": (64, {}),
    "mobilenetv3_large_100": (64, {}),
    "tf_efficientnetv2_b0": (64, {}),
    "ghostnet_100": (64, {}),
    "rexnet_100": (64, {}),
    "regnetx_002": (64, {}),
    "regnety_002": (64, {}),
    "densenet121": (64, {}),
    "dpn68": (64, {}),
    "cspdarknet53": (64, {}),
    "cspresnet50": (64, {}),
    "repvgg_a0": (64, {}),
    "hrnet_w18_small": (64, {}),
    "dla34": (64, {}),
    "nf_resnet26": (64, {}),
    "convnext_atto": (64, {}),
    "convnextv2_atto": (64, {}),
    "poolformer_s12": (64, {}),
    "edgenext_xx_small": (64, {}),
    "mobilevit_xxs": (64, {}),
    "vit_tiny_patch16_224": (64, {"img_size": 64}),
    "vit_small_patch16_224": (64, {"img_size": 64}),
    "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "cait_xxs24_224": (64, {"img_size": 64}),
    "mixer_s16_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (112, {"img_size": 112}),
    "levit_128s": (128, {"img_size": 128}),
    "pit_ti_224": (64, {"img_size": 64}),
    "xcit_nano_12_p16_224": (64, {"img_size": 64}),
    "efficientformer_l1": (224, {}),
    "tiny_vit_5m_224": (64, {}),
}
TIMM_QUICK = {"resnet18", "convnext_atto", "vit_tiny_patch16_224"}


def timm_entries() -> list[Entry]:
    import timm

    entries = []
    for name, (size, kwargs) in TIMM_MODELS.items():
        module = timm.models.model_entrypoint(name).__module__ if timm.models.is_model(name) else "unknown"
        family = module.rsplit(".", 1)[-1].lstrip("_")

        def build(name=name, size=size, kwargs=kwargs):
            return timm.create_model(name, pretrained=False, **kwargs), _images(size)

        def build_for_memory(name=name):
            return timm.create_model(name, pretrained=False), _images(MEMORY_SIZE)

        entries.append(Entry(f"timm/{name}", "timm", family, build, name in TIMM_QUICK,
                             None if size >= MEMORY_SIZE else build_for_memory))
    return entries


HF_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
HF_DECODER = {"vocab_size": 100, "num_key_value_heads": 2, "bos_token_id": 0, "eos_token_id": 0,
              "pad_token_id": 0, **HF_SIZES}
# name -> (model class, config class, config fields, input kind)
HF_ARCHITECTURES: dict[str, tuple[str, str, dict, str]] = {
    "bert": ("BertForMaskedLM", "BertConfig", {"vocab_size": 100, **HF_SIZES}, "text"),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", {"vocab_size": 100, **HF_SIZES}, "text"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertConfig",
                   {"vocab_size": 100, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}, "text"),
    "albert": ("AlbertForMaskedLM", "AlbertConfig", {"vocab_size": 100, "embedding_size": 32, **HF_SIZES}, "text"),
    "electra": ("ElectraForMaskedLM", "ElectraConfig", {"vocab_size": 100, "embedding_size": 32, **HF_SIZES},
                "text"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             {"vocab_size": 100, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 128, "n_positions": 128,
              "bos_token_id": 0, "eos_token_id": 0}, "text"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", HF_DECODER, "text"),
    "mistral": ("MistralForCausalLM", "MistralConfig", HF_DECODER, "text"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", HF_DECODER, "text"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16, **HF_DECODER}, "text"),
    "phi": ("PhiForCausalLM", "PhiConfig",
            {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, **HF_SIZES}, "text"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                 {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0, **HF_SIZES}, "text"),
    "opt": ("OPTForCausalLM", "OPTConfig",
            {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "ffn_dim": 128, "word_embed_proj_dim": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
            "text"),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           {"vocab_size": 100, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
           "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             {"vocab_size": 100, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128}, "seq2seq"),
    "vit": ("ViTForImageClassification", "ViTConfig",
            {"image_size": 32, "patch_size": 4, "num_labels": 10, **HF_SIZES}, "image"),
    "deit": ("DeiTForImageClassification", "DeiTConfig",
             {"image_size": 32, "patch_size": 4, "num_labels": 10, **HF_SIZES}, "image"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
              "window_size": 4, "num_labels": 10}, "image"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "num_labels": 10}, "image"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10}, "image"),
}
HF_QUICK = {"bert", "gpt2", "llama", "vit"}
TEXT_SHAPE = (4, 128)  # batch, tokens


# Config fields for the memory size: 224 px, with the 16-pixel patches real ViT/DeiT configs use.
HF_MEMORY_FIELDS = {"vit": {"image_size": MEMORY_SIZE, "patch_size": 16},
                    "deit": {"image_size": MEMORY_SIZE, "patch_size": 16},
                    "swin": {"image_size": MEMORY_SIZE, "window_size": 7}}


def hf_inputs(kind: str, size: int = 32) -> tuple:
    import torch

    if kind == "image":
        return _images(size)
    ids = torch.randint(0, 100, TEXT_SHAPE, generator=torch.Generator().manual_seed(1))
    return (ids, None, ids) if kind == "seq2seq" else (ids,)  # input_ids, attention_mask, decoder_input_ids


def hf_build(name: str, for_memory: bool = False) -> tuple[Any, tuple]:
    """A random-init Hugging Face model of ``name`` with its default attention, and its inputs
    (vision models at the memory size when ``for_memory``)."""
    import transformers

    model_class, config_class, fields, kind = HF_ARCHITECTURES[name]
    if for_memory:
        fields = {**fields, **HF_MEMORY_FIELDS.get(name, {})}
    config = getattr(transformers, config_class)(**fields)
    inputs = hf_inputs(kind, MEMORY_SIZE if for_memory else 32)
    return getattr(transformers, model_class)(config), inputs


def hf_entries() -> list[Entry]:
    return [Entry(f"hf/{name}", "hf", name, lambda name=name: hf_build(name), name in HF_QUICK,
                  (lambda name=name: hf_build(name, for_memory=True)) if kind == "image" else None)
            for name, (_, _, _, kind) in HF_ARCHITECTURES.items()]


def zoo() -> tuple[list[Entry], list[str]]:
    """Every entry whose library imports here, and a note per library that does not."""
    entries, missing = [], []
    for source, make in (("torchvision", torchvision_entries), ("timm", timm_entries), ("hf", hf_entries)):
        try:
            entries += make()
        except Exception as error:  # ImportError, or a binary mismatch with this torch
            missing.append(f"{source}: not importable here ({error}); run `python benchmarks/zoo.py --setup`")
    return entries, missing


# --------------------------------------------------------------------------- measuring

def output_tensors(output: Any) -> list:
    """The floating tensors a model returns: HF ``.logits``, tuples (GoogLeNet/Inception aux heads), a tensor."""
    import torch

    if isinstance(output, tuple) and hasattr(output, "_fields"):  # GoogLeNetOutputs, InceptionOutputs
        return [t for item in output for t in output_tensors(item)]
    if hasattr(output, "logits"):
        output = output.logits
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


@dataclass
class Step:
    nbytes: int
    outputs: list
    grads: list
    seconds: float


def training_keywords(model: Any, inputs: tuple) -> dict:
    """``labels=`` the token ids for a language model (it then computes its own loss), else nothing."""
    from aalconvert.rules.loss_head import LANGUAGE_MODEL_SUFFIXES

    return {"labels": inputs[0]} if type(model).__name__.endswith(LANGUAGE_MODEL_SUFFIXES) else {}


def run_step(model: Any, inputs: tuple, params: list, keywords: dict | None = None) -> Step:
    """One seeded train-mode forward (bytes kept measured) and backward; gradients w.r.t. ``params``.

    With ``labels`` in ``keywords`` the model's own loss is the objective (and
    the output compared), else the mean square of its outputs.
    """
    import torch

    from aalconvert.memory import measure_saved

    keywords = keywords or {}
    model.train()
    torch.manual_seed(1)  # the same dropout / drop-path draws for BP and every rule set
    start = time.perf_counter()
    saved = measure_saved(lambda: model(*inputs, **keywords), params)
    if "labels" in keywords:
        outputs = [saved.output.loss]
        loss = saved.output.loss
    else:
        outputs = output_tensors(saved.output)
        loss = sum(t.float().square().mean() for t in outputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    seconds = time.perf_counter() - start
    return Step(saved.nbytes, [t.detach() for t in outputs], list(grads), seconds)


def promises(rules: str, labels: bool = False) -> tuple[bool, bool]:
    """(forward exact, gradients exact) as every rule of the set promises.

    A language model's loss taken by a loss head (``loss_head``, and the approx
    rules, which take it too) is summed per chunk: equal up to rounding, not bit
    for bit, so with ``labels`` such a set promises no bit-equal forward.
    """
    from aalconvert.rules.registry import resolve

    resolved = resolve(rules.split("+"), {})
    takes_loss_head = any(r.name == "loss_head" or r.name.startswith("approx") for r in resolved)
    forward = all(r.forward_exact for r in resolved) and not (labels and takes_loss_head)
    return forward, all(r.gradient_exact for r in resolved)


def compare(bp: Step, converted: Step) -> dict:
    """Forward and gradient agreement of a converted step with BP's."""
    import torch

    forward_equal = len(bp.outputs) == len(converted.outputs) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(bp.outputs, converted.outputs))
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(bp.outputs, converted.outputs)
                if a.shape == b.shape), default=math.nan)
    grads_equal, finite, dot, norm_bp, norm_conv, missing = True, True, 0.0, 0.0, 0.0, 0
    for expected, actual in zip(bp.grads, converted.grads, strict=True):
        if expected is None or actual is None:
            grads_equal &= expected is None and actual is None
            missing += (expected is None) != (actual is None)
            continue
        grads_equal &= torch.equal(expected, actual)
        e, a = expected.detach().float().reshape(-1), actual.detach().float().reshape(-1)
        norm = float(torch.dot(a, a))
        finite &= math.isfinite(norm)  # a non-finite entry makes the sum of squares non-finite
        dot += float(torch.dot(e, a))
        norm_bp += float(torch.dot(e, e))
        norm_conv += norm
    cosine = dot / math.sqrt(norm_bp * norm_conv) if norm_bp > 0 and 0 < norm_conv < math.inf else math.nan
    return {"forward_equal": forward_equal, "forward_max_abs_diff": diff, "grads_equal": grads_equal,
            "grads_finite": finite, "grad_cosine": cosine, "grads_missing": missing}


def measure_model(entry: Entry, rule_sets: list[str]) -> dict:
    """BP and every rule set on one zoo model: a record with one row per rule set."""
    import torch

    import aalconvert

    record: dict[str, Any] = {"model": entry.name, "source": entry.source, "family": entry.family, "rows": []}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs = entry.build()
        params = [p for p in model.parameters() if p.requires_grad]
        record["inputs"] = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        record["parameters"] = sum(p.numel() for p in params)
        keywords = training_keywords(model, inputs)
        record["labels"] = bool(keywords)
        bp = run_step(model, inputs, params, keywords)
    except Exception as error:  # a model the zoo cannot even run under BP: recorded, never silent
        record.update(status="skipped", error=f"BP run failed: {type(error).__name__}: {error}"[:500],
                      seconds=time.perf_counter() - start)
        return record
    record.update(status="ok", bp_bytes=bp.nbytes, bp_step_s=bp.seconds)
    for rules in rule_sets:
        forward_promised, gradient_promised = promises(rules, bool(keywords))
        row: dict[str, Any] = {"rules": rules, "forward_promised": forward_promised,
                               "gradient_promised": gradient_promised}
        converted = None
        try:
            converting = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = aalconvert.convert(model, rules.split("+"), example_inputs=inputs)
            row["convert_s"] = time.perf_counter() - converting
        except Exception as error:
            row.update(status="convert_error", error=f"{type(error).__name__}: {error}"[:500])
            record["rows"].append(row)
            continue
        try:
            step = run_step(converted, inputs, params, keywords)
        except Exception as error:
            row.update(status="run_error", error=f"{type(error).__name__}: {error}"[:500])
            record["rows"].append(row)
            continue
        finally:
            del converted
        ratio_step = step.nbytes / bp.nbytes if bp.nbytes else math.nan
        row.update(status="ok", converted_bytes=step.nbytes, ratio=ratio_step, ratio_step=ratio_step,
                   step_time_ratio=step.seconds / bp.seconds, **compare(bp, step))
        del step
        record["rows"].append(row)
    del model, bp
    gc.collect()
    if entry.build_for_memory is not None and record["parameters"] > MEMORY_SIZE_PARAMETER_LIMIT:
        record["memory_skipped"] = (f"{record['parameters'] / 1e6:.0f}M parameters: bytes at the step size "
                                    f"(a second forward at {MEMORY_SIZE} px would not fit in this machine's memory)")
    elif entry.build_for_memory is not None:
        measure_memory(entry, record)
    record["seconds"] = time.perf_counter() - start
    return record


def measure_memory(entry: Entry, record: dict) -> None:
    """Bytes kept at the memory size, BP and each rule set that ran: into ``record`` and its rows.

    One seeded forward each (no backward), converted with the memory-size inputs.
    A rule set that fails here gets ``memory_error`` and keeps its step-size ratio out
    of the medians (``summary`` lists it as a failure).
    """
    import torch

    import aalconvert
    from aalconvert.memory import measure_saved

    def kept(module: Any, inputs: tuple, params: list) -> int:
        module.train()
        torch.manual_seed(1)
        return measure_saved(lambda: module(*inputs), params).nbytes

    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs = entry.build_for_memory()
        params = list(model.parameters())
        bp_bytes = kept(model, inputs, params)
    except Exception as error:
        for row in record["rows"]:
            row["memory_error"] = f"BP at the memory size failed: {type(error).__name__}: {error}"[:500]
        return
    record.update(memory_inputs=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
                  bp_bytes_memory=bp_bytes)
    for row in record["rows"]:
        if row["status"] != "ok":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = aalconvert.convert(model, row["rules"].split("+"), example_inputs=inputs)
            row["ratio"] = kept(converted, inputs, params) / bp_bytes
        except Exception as error:
            row["memory_error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            converted = None
            gc.collect()
    del model
    gc.collect()


# --------------------------------------------------------------------------- reporting

def _ok_rows(records: list[dict], rules: str) -> list[dict]:
    return [r for rec in records if rec.get("status") == "ok" for r in rec["rows"]
            if r["rules"] == rules and r["status"] == "ok" and "memory_error" not in r]


def summary(result: dict) -> dict:
    """The figures the README and the final note quote: medians, failures, > BP, exact mismatches."""
    records, rule_sets = result["records"], result["rule_sets"]
    medians = {rules: statistics.median([r["ratio"] for r in _ok_rows(records, rules)])
               if _ok_rows(records, rules) else None for rules in rule_sets}
    failures, above_bp, grad_mismatch, forward_mismatch, not_finite = [], [], [], [], []
    for rec in records:
        for row in rec.get("rows", []):
            where = f"{rec['model']} [{row['rules']}]"
            if row["status"] != "ok":
                failures.append(f"{where}: {row['status']}: {row['error']}")
                continue
            if "memory_error" in row:
                failures.append(f"{where}: at the memory size: {row['memory_error']}")
            elif row["ratio"] > 1.0:
                above_bp.append(f"{where}: {row['ratio']:.4f}")
            if row.get("ratio_step", 0.0) > 1.0:
                above_bp.append(f"{where}: {row['ratio_step']:.4f} at the step size")
            if row["gradient_promised"] and not row["grads_equal"]:
                grad_mismatch.append(f"{where}: gradient cosine {row['grad_cosine']:.6f}")
            if row["forward_promised"] and not row["forward_equal"]:
                forward_mismatch.append(f"{where}: max |diff| {row['forward_max_abs_diff']:.3g}")
            if not row["grads_finite"]:
                not_finite.append(where)
    skipped = [f"{rec['model']}: {rec['error']}" for rec in records if rec.get("status") != "ok"]
    return {"medians": medians, "models": len(records), "failures": failures, "above_bp": above_bp,
            "gradient_mismatches": grad_mismatch, "forward_mismatches": forward_mismatch,
            "non_finite_gradients": not_finite, "skipped": skipped}


def _cell(record: dict, rules: str) -> str:
    row = next((r for r in record.get("rows", []) if r["rules"] == rules), None)
    if row is None:
        return ""
    if row["status"] != "ok":
        return "fails" if row["status"] == "convert_error" else "run fails"
    if "memory_error" in row:
        return "fails at memory size"
    marks = ("" if not row["gradient_promised"] or row["grads_equal"] else " ≠grad") + \
            ("" if not row["forward_promised"] or row["forward_equal"] else " ≠fwd") + \
            ("" if row["grads_finite"] else " nan")
    return f"{row['ratio']:.3f}{marks}"


# The transformer models issue 11's `auto` median is taken over: families by source (the Hugging
# Face ones are every architecture but the convolutional two).
TRANSFORMER_FAMILIES = {
    "torchvision": {"vision_transformer", "swin_transformer", "maxvit"},
    "timm": {"vision_transformer", "deit", "cait", "swin_transformer", "levit", "pit", "xcit", "efficientformer",
             "tiny_vit", "mobilevit"},
}
CONVOLUTIONAL_HF = {"convnext", "resnet"}


def is_transformer(record: dict) -> bool:
    """Whether a zoo record is one of the transformer models (``TRANSFORMER_FAMILIES``)."""
    if record["source"] == "hf":
        return record["family"] not in CONVOLUTIONAL_HF
    return record["family"] in TRANSFORMER_FAMILIES.get(record["source"], set())


def transformer_records(result: dict) -> list[dict]:
    """The records of ``result`` that are transformer models."""
    return [rec for rec in result["records"] if is_transformer(rec)]


def _rounded(medians: dict) -> dict:
    return {k: round(v, 3) if v is not None else None for k, v in medians.items()}


def family_table(result: dict) -> list[str]:
    """Per source/family: models, then the median ratio per rule set (failures counted beside)."""
    rule_sets, groups = result["rule_sets"], {}
    for rec in result["records"]:
        groups.setdefault(f"{rec['source']}/{rec['family']}", []).append(rec)
    lines = ["| family | models | " + " | ".join(rule_sets) + " |", "| --- | ---: |" + " ---: |" * len(rule_sets)]
    for family, records in sorted(groups.items()):
        cells = []
        for rules in rule_sets:
            ok = _ok_rows(records, rules)
            failed = sum(1 for rec in records for r in rec.get("rows", []) if r["rules"] == rules
                         and r["status"] != "ok")
            cell = f"{statistics.median(r['ratio'] for r in ok):.3f}" if ok else "-"
            cells.append(cell + (f" ({failed} fail)" if failed else ""))
        lines.append(f"| {family} | {len(records)} | " + " | ".join(cells) + " |")
    sources = {}
    for rec in result["records"]:
        sources.setdefault(rec["source"], []).append(rec)
    pooled = [*sorted(sources.items()), ("transformers", transformer_records(result)), ("all", result["records"])]
    for source, records in pooled:
        if not records:
            continue
        medians = summary({"records": records, "rule_sets": rule_sets})["medians"]
        lines.append(f"| **{source} (median)** | {len(records)} | "
                     + " | ".join(f"**{medians[r]:.3f}**" if medians[r] is not None else "-" for r in rule_sets)
                     + " |")
    return lines


def merge_shards(results: list[dict]) -> dict:
    """One result from shards run side by side; a model run again in a later shard takes the
    later record, in the earlier one's place. Each shard's library state is kept."""
    result = results[0]
    if len(results) == 1:
        return result
    result["shards"] = [r["command"] for r in results]
    result["command"] = f"python benchmarks/zoo.py, as {len(results)} shards run side by side"
    libraries = [r.get("library", "?") for r in results]
    if len(set(libraries)) > 1:
        result["library"] = ", ".join(f"{library} (shard {i})" for i, library in enumerate(libraries, 1))
    records = {}
    for shard in results:
        for record in shard["records"]:
            records[record["model"]] = record
    result["records"] = list(records.values())
    result["seconds"] = sum(r["seconds"] for r in results)
    result["not_run"] = sorted(set().union(*(r["not_run"] for r in results)))
    return result


def markdown(result: dict) -> str:
    """The full report: setup, medians, per-family and per-model tables, and every problem found."""
    rule_sets, found = result["rule_sets"], summary(result)
    how = f"`{result['command']}`" if "shards" not in result else \
        result["command"] + " (" + "; ".join(f"`{c}`" for c in result["shards"]) + ")"
    lines = [f"# Zoo: bytes kept for backward, converted / BP ({result['date'][:10]})", "",
             f"{how}: {found['models']} models, {result['seconds'] / 60:.0f} min"
             f"{' (summed over shards)' if 'shards' in result else ''} on "
             f"{result['machine']} ({result['threads']} threads); torch {result['versions'].get('torch')}, "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "torch") + ".",
             *([f"aalconvert: {result['library']}."] if result.get("library") else []),
             *result.get("notes", []),
             "Train mode, fp32, default dropout/drop-path (same seed for BP and each rule set). Bytes kept "
             f"(the cells) at vision batch 2 at {MEMORY_SIZE} px (Inception v3 299; HF ViT/DeiT configs with "
             f"16-px patches), text {TEXT_SHAPE[0]} x {TEXT_SHAPE[1]} tokens (language models train on their own "
             "loss, labels= the tokens). Gradients and step time from a step at vision batch 2 at 64 px "
             "(Inception v3 299, MaxViT 224, timm Swin 112, LeViT 128, torchvision ViT-H/14 112), HF vision 32 px; "
             "the bytes of that step are the `ratio_step` figures in the JSON. Inputs marked * (models over "
             f"{MEMORY_SIZE_PARAMETER_LIMIT // 10**6}M parameters) are measured at the step size only. "
             "Cells: converted / BP; `fails`: convert() raised; `≠grad`: a gradient-exact "
             "rule set whose gradients are not bit-identical to BP; `≠fwd`: a forward-exact rule set whose "
             "output differs; `nan`: a non-finite gradient. Medians are over the models where the rule set "
             "converts.", "",
             "## Per family (median over the family's models)", "", *family_table(result), "",
             "## Per model", "",
             "| model | input | BP MiB | " + " | ".join(rule_sets) + " | step time ratio (" + rule_sets[-1] + ") |",
             "| --- | --- | ---: |" + " ---: |" * (len(rule_sets) + 1)]
    for rec in result["records"]:
        if rec.get("status") != "ok":
            lines.append(f"| {rec['model']} | skipped: {rec['error'][:120]} |" + " |" * (len(rule_sets) + 2))
            continue
        last = next((r for r in rec["rows"] if r["rules"] == rule_sets[-1] and r["status"] == "ok"), None)
        shapes = rec.get("memory_inputs") or rec["inputs"]
        if rec.get("memory_skipped"):
            shapes = [[*shapes[0][:-1], f"{shapes[0][-1]}*"]] if shapes else shapes
        bp_bytes = rec.get("bp_bytes_memory", rec["bp_bytes"])
        lines.append(f"| {rec['model']} | {'x'.join(map(str, shapes[0])) if shapes else ''} | "
                     f"{bp_bytes / 2**20:.1f} | " + " | ".join(_cell(rec, r) for r in rule_sets)
                     + (f" | {last['step_time_ratio']:.2f} |" if last else " | - |"))
    for title, key in (("Conversion or run failures", "failures"), ("Rule sets keeping more than BP", "above_bp"),
                       ("Gradient-exact rule sets whose gradients differ from BP", "gradient_mismatches"),
                       ("Forward-exact rule sets whose output differs from BP", "forward_mismatches"),
                       ("Non-finite gradients", "non_finite_gradients"), ("Models not run", "skipped")):
        lines += ["", f"## {title} ({len(found[key])})", ""] + [f"- {item}" for item in found[key]]
    if result.get("not_run"):
        lines += ["", "## Not in this run", ""] + [f"- {note}" for note in result["not_run"]]
    return "\n".join(lines) + "\n"


def update_readme(result: dict, markdown_path: Path, readme: Path = ROOT / "README.md") -> None:
    """Replace the README's zoo table (between the zoo-table markers) with this run's per-family table."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    found = summary(result)
    body = [f"Bytes kept for backward, converted / BP: median per family, {found['models']} models "
            f"({result['date'][:10]}, `{result['command'].split(',')[0]}`, CPU; full per-model table, failures and "
            f"gradient checks in [{markdown_path.relative_to(ROOT)}]({markdown_path.relative_to(ROOT)})).", "",
            *family_table(result), ""]
    readme.write_text(head + README_START + "\n" + "\n".join(body) + README_END + tail)


def library_state() -> str:
    """The aalconvert commit measured, with "+ uncommitted changes" when the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "aalconvert", "kernels",
                                "rules"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


# --------------------------------------------------------------------------- command line

def select(entries: list[Entry], models: str | None, family: str | None, quick: bool, parser) -> list[Entry]:
    if quick:
        entries = [e for e in entries if e.quick]
    if family:
        wanted = set(family.split(","))
        entries = [e for e in entries if e.source in wanted or e.family in wanted or f"{e.source}/{e.family}" in wanted]
    if models:
        wanted = models.split(",")
        unknown = [m for m in wanted if not any(m in (e.name, e.name.split("/", 1)[1]) for e in entries)]
        if unknown:
            parser.error(f"unknown models {unknown}; see --list")
        entries = [e for e in entries if e.name in wanted or e.name.split("/", 1)[1] in wanted]
    return entries


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"create {ZOO_VENV.name}/ with the zoo libraries")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter even if the zoo venv exists")
    parser.add_argument("--models", help="comma-separated names (hf/bert, or bare: bert, resnet18)")
    parser.add_argument("--family", help="comma-separated sources or families (torchvision, timm, hf, resnet, ...)")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets ('+'-joined)")
    parser.add_argument("--quick", action="store_true", help="a smoke subset (HF only without torchvision/timm)")
    parser.add_argument("--list", action="store_true", help="list the zoo and exit")
    parser.add_argument("--json", type=Path, help="write the result as JSON here (after every model)")
    parser.add_argument("--markdown", type=Path, help="write the markdown report here")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/zoo_<date>.json and .md and update the README table")
    parser.add_argument("--resume", action="store_true", help="keep the models already in --json's file")
    parser.add_argument("--readme", type=Path, nargs="+",
                        help="no run: merge these JSON results (in order) into --json (default: the first), "
                             "write its .md and update the README table")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.setup:
        setup()
        return {}
    if args.readme:
        result = merge_shards([json.loads(path.read_text()) for path in args.readme])
        out = args.json or args.readme[0]
        out.write_text(json.dumps(result, indent=1))
        md = out.with_suffix(".md")
        md.write_text(markdown(result))
        update_readme(result, md.resolve())
        return result

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    entries, not_importable = zoo()
    if args.list:
        for entry in entries:
            print(entry.name, entry.family)
        return {}
    entries = select(entries, args.models, args.family, args.quick, parser)
    rule_sets = args.rules.split(",")
    date = datetime.now(timezone.utc)
    if args.save:
        args.json = args.json or RESULTS / f"zoo_{date:%Y-%m-%d}.json"
        args.markdown = args.markdown or args.json.with_suffix(".md")
    result = {"date": date.isoformat(timespec="seconds"), "command": "python benchmarks/zoo.py " + " ".join(argv),
              "library": library_state(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "threads": torch.get_num_threads(), "versions": package_versions(), "rule_sets": rule_sets,
              "not_run": not_importable, "records": [], "seconds": 0.0}
    done: dict[str, dict] = {}
    if args.resume and args.json and args.json.exists():
        previous = json.loads(args.json.read_text())
        done = {rec["model"]: rec for rec in previous["records"] if rec.get("status") == "ok"}
        result["seconds"] = previous.get("seconds", 0.0)
    for note in not_importable:
        print(f"not run: {note}", flush=True)
    start = run_start = time.perf_counter()
    for index, entry in enumerate(entries, 1):
        if entry.name in done:
            result["records"].append(done[entry.name])
            continue
        print(f"[{index}/{len(entries)} {time.perf_counter() - run_start:6.0f}s] {entry.name} ...", flush=True)
        record = measure_model(entry, rule_sets)
        result["records"].append(record)
        cells = "  ".join(f"{r['rules']} {_cell(record, r['rules'])}" for r in record.get("rows", []))
        status = cells if record["status"] == "ok" else record["error"]
        print(f"[{index}/{len(entries)} {time.perf_counter() - run_start:6.0f}s] {entry.name} "
              f"({record.get('seconds', 0):.1f}s, BP {record.get('bp_bytes', 0) / 2**20:.1f} MiB): {status}",
              flush=True)
        if args.json:
            result["seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            args.json.write_text(json.dumps(result, indent=1))
    result["seconds"] += time.perf_counter() - start
    found = summary(result)
    print("medians, converted / BP:", _rounded(found["medians"]))
    transformers = transformer_records(result)
    if transformers:
        medians = summary({"records": transformers, "rule_sets": result["rule_sets"]})["medians"]
        print(f"medians over the {len(transformers)} transformer models:", _rounded(medians))
    for key in ("failures", "above_bp", "gradient_mismatches", "forward_mismatches", "non_finite_gradients", "skipped"):
        print(f"{key}: {len(found[key])}")
        for item in found[key]:
            print(f"  {item}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
        if args.save:
            update_readme(result, args.markdown.resolve())
    return result


if __name__ == "__main__":
    reexec_in_zoo_venv(__file__, sys.argv[1:])
    main()
