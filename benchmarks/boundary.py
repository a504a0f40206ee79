"""How far checkpointed blocks recomputed from k-bit copies of their inputs move the gradient.

Every block (the planner's: members with children and parameters of an
``nn.Sequential`` / ``nn.ModuleList``) runs under ``CheckpointedForward`` with
its inputs kept as 8- or 4-bit copies (``aalconvert.checkpointing``); backward
runs each block again on the decoded copies. Per model: the cosine between
that gradient (all parameters, float64) and BP's on the same batch and dropout
draws, train mode, fp32, and how many blocks the planner's ``checkpoint4``
leaves with full inputs (batch norm or ReLU inside: ``why_not_copied``). The seven examples at
batch 16 always; with torchvision, timm and transformers importable
(``.zoo-venv``) also real models: timm ViT-S/16 at 160 px, torchvision
ResNet-50 and timm ConvNeXt-atto at 128 px, timm Swin-T at 224 px (batch 4, 4,
4, 2) and Hugging Face Llama, GPT-2, BERT and OPT (4 layers of 256, 4 x 128
tokens, their own loss with ``labels=``).

    python benchmarks/boundary.py --json benchmarks/results/boundary_examples.json
    .zoo-venv/bin/python benchmarks/boundary.py --zoo --json benchmarks/results/boundary_zoo.json
"""

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aalconvert.checkpointing import CheckpointedForward, block_names, why_not_copied  # noqa: E402
from aalconvert.facts import gather_facts  # noqa: E402
from aalconvert.nn.approx_common import ApproxOptions  # noqa: E402

BITS = (8, 4)


def loss_of(model: torch.nn.Module, inputs: tuple, labels: torch.Tensor | None) -> torch.Tensor:
    output = model(*inputs, **({"labels": labels} if labels is not None else {}))
    if getattr(output, "loss", None) is not None:
        return output.loss
    logits = output.logits if hasattr(output, "logits") else output
    return logits.float().logsumexp(-1).mean()


def gradient(model: torch.nn.Module, inputs: tuple, labels: torch.Tensor | None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws for every variant
    loss_of(model, inputs, labels).backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def measure(name: str, model: torch.nn.Module, inputs: tuple, labels: torch.Tensor | None = None) -> dict:
    """Gradient cosine to BP with every block checkpointed from k-bit copies, per width."""
    model.train()
    blocks = block_names(gather_facts(model, inputs))
    kept_in_full = sum(why_not_copied(model.get_submodule(block)) is not None for block in blocks)
    reference = gradient(model, inputs, labels)
    row = {"model": name, "blocks": len(blocks), "blocks_checkpoint4_keeps_in_full": kept_in_full}
    for bits in BITS:
        variant = copy.deepcopy(model)
        for block in blocks:
            module = variant.get_submodule(block)
            module.forward = CheckpointedForward(module, ApproxOptions(bits=bits))
        row[f"cosine_{bits}bit"] = float(F.cosine_similarity(reference, gradient(variant, inputs, labels), dim=0))
    print(f"{name}: {len(blocks)} blocks ({kept_in_full} that checkpoint4 keeps in full), "
          + ", ".join(f"{bits}-bit cosine {row[f'cosine_{bits}bit']:.5f}" for bits in BITS), flush=True)
    return row


def examples() -> list[dict]:
    from examples import EXAMPLES
    rows = []
    for name, example in EXAMPLES.items():
        torch.manual_seed(0)
        rows.append(measure(name, example.build_model(), example.example_inputs(batch_size=16)))
    return rows


def zoo() -> list[dict]:
    import timm
    import torchvision
    import transformers
    rows = []
    vision = [("timm/vit_small_patch16_224", lambda: timm.create_model("vit_small_patch16_224", img_size=160), 4, 160),
              ("torchvision/resnet50", torchvision.models.resnet50, 4, 128),
              ("timm/convnext_atto", lambda: timm.create_model("convnext_atto"), 4, 128),
              ("timm/swin_tiny_patch4_window7_224", lambda: timm.create_model("swin_tiny_patch4_window7_224"), 2, 224)]
    for name, build, batch, side in vision:
        torch.manual_seed(0)
        rows.append(measure(name, build(), (torch.randn(batch, 3, side, side),)))
    sizes = dict(vocab_size=1000, num_hidden_layers=4)
    text = [("hf/llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(
                hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4, **sizes)),
            ("hf/gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config(
                vocab_size=1000, n_embd=256, n_layer=4, n_head=4)),
            ("hf/bert", transformers.BertForMaskedLM, transformers.BertConfig(
                hidden_size=256, num_attention_heads=4, intermediate_size=1024, **sizes)),
            ("hf/opt", transformers.OPTForCausalLM, transformers.OPTConfig(
                hidden_size=256, ffn_dim=1024, num_attention_heads=4, **sizes))]
    for name, model_class, config in text:
        torch.manual_seed(0)
        ids = torch.randint(0, 1000, (4, 128))
        rows.append(measure(name, model_class(config), (ids,), labels=ids))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="store_true", help="real models (needs .zoo-venv) instead of the examples")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = zoo() if args.zoo else examples()
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/boundary.py" + (" --zoo" if args.zoo else ""),
            "machine": platform.machine(), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
