"""Bytes kept for backward by Hugging Face models, converted / BP, per rule set.

Small random-init configs of BERT, ViT, GPT-2 and Llama (nothing downloaded),
eager attention, train mode (dropout on), fp32, CPU; measured on real tensors
(aalconvert.memory.measure_saved: every storage a saved tensor points to, once,
parameters excluded). The examples in benchmarks/memory.py are written with
torch modules; these show what the converter reaches on zoo code, where
activations, RMS norms and attention are the zoo's own classes and functions.

    python benchmarks/zoo.py
    python benchmarks/zoo.py --models gpt2,llama --rules approx4 --json out.json
"""

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aalconvert  # noqa: E402
from aalconvert.memory import measure_saved  # noqa: E402

RULE_SETS = ["exact", "recompute", "asa", "approx4", "auto", "auto+approx4"]
SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
         "attn_implementation": "eager"}


def _models() -> dict[str, Callable[[], tuple[torch.nn.Module, tuple]]]:
    import transformers  # a test extra, not a dependency of the library

    def bert():
        config = transformers.BertConfig(vocab_size=100, **SIZES)
        return transformers.BertForMaskedLM(config), (torch.randint(0, 100, (8, 64)),)

    def vit():
        config = transformers.ViTConfig(image_size=32, patch_size=4, num_labels=10, **SIZES)
        return transformers.ViTForImageClassification(config), (torch.randn(8, 3, 32, 32),)

    def gpt2():
        config = transformers.GPT2Config(vocab_size=100, n_layer=2, n_embd=64, n_head=4, n_inner=256,
                                         n_positions=64, bos_token_id=0, eos_token_id=0,
                                         attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config), (torch.randint(0, 100, (8, 64)),)

    def llama():
        config = transformers.LlamaConfig(vocab_size=100, bos_token_id=0, eos_token_id=0, **SIZES)
        return transformers.LlamaForCausalLM(config), (torch.randint(0, 100, (8, 64)),)

    return {"bert": bert, "vit": vit, "gpt2": gpt2, "llama": llama}


def kept_bytes(model: torch.nn.Module, inputs: tuple) -> int:
    model.train()
    torch.manual_seed(1)  # the same dropout draws for every rule set
    return measure_saved(lambda: model(*inputs).logits, model.parameters()).nbytes


def main(argv: list[str] | None = None) -> dict:
    models = _models()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated, from {list(models)}")
    parser.add_argument("--rules", default=",".join(RULE_SETS), help="comma-separated rule sets ('+'-joined)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    names, rule_sets = args.models.split(","), args.rules.split(",")
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(models)}")

    rows = []
    for name in names:
        torch.manual_seed(0)
        model, inputs = models[name]()
        baseline = kept_bytes(model, inputs)
        for rules in rule_sets:
            torch.manual_seed(0)
            model, inputs = models[name]()
            converted = aalconvert.convert(model, rules.split("+"), example_inputs=inputs)
            kept = kept_bytes(converted, inputs)
            rows.append({"model": name, "rules": rules, "bp_bytes": baseline, "converted_bytes": kept,
                         "ratio": kept / baseline})

    table = Table(title="Hugging Face models: bytes kept for backward, converted / BP (fp32, CPU, batch 8)")
    table.add_column("model")
    for rules in rule_sets:
        table.add_column(rules, justify="right")
    for name in names:
        ratios = {r["rules"]: r["ratio"] for r in rows if r["model"] == name}
        table.add_row(name, *(f"{ratios[r]:.3f}" for r in rule_sets))
    Console(width=160).print(table)
    import transformers

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "transformers": transformers.__version__, "machine": platform.machine(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
