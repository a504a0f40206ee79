"""``loss_head``: a language model's output projection forms its logits only inside the loss.

Applies to Hugging Face language models (``*ForCausalLM``, ``*LMHeadModel``,
``*ForMaskedLM``): the module ``model.get_output_embeddings()`` returns, an
``nn.Linear``, becomes a ``LossHeadLinear`` (``aalconvert.nn.loss_head``). The
model's own forward and loss function stay as they are: whatever shifts,
flattens, upcasts and softcaps the logits works on deferred logits, and the
final ``F.cross_entropy`` runs chunk by chunk without a tokens x vocabulary
tensor. Any other use of the logits computes them as before. Loss and
gradients equal the unfused head's up to fp32 rounding (the sums run per chunk).

Option ``loss_head_gradients``: "backward" (default) keeps only the head's input
and forms the logits again in backward (one more tokens x hidden x vocabulary
matmul); "forward" forms the head's gradients while the loss is computed (as
many matmuls as the plain head, so a faster step) and keeps a gradient the size
of the head's weight until backward: the step's peak does not rise (backward
would allocate it first thing; a few per-token vectors aside), but more is kept,
a second backward through one loss (``retain_graph=True``) raises, and several
forwards before one backward keep one each (``nn/linear_cross_entropy.py``).
"""

from dataclasses import dataclass
from typing import Any

from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.facts import ModelFacts
from aalconvert.nn.loss_head import LossHeadLinear
from aalconvert.rules.base import Rule, Site, Skip
from aalconvert.rules.wiring import swap_module

LANGUAGE_MODEL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM")


GRADIENTS = ("forward", "backward")


@dataclass(frozen=True)
class LossHeadOptions:
    """When a summed loss forms the head's gradients: "forward" or "backward" (``loss_head_gradients``)."""

    gradients: str = "backward"


def output_projection(model: nn.Module) -> tuple[str, nn.Module] | str:
    """The name and module of ``model``'s vocabulary projection, or why there is none (in words)."""
    cls = type(model).__name__
    if not cls.endswith(LANGUAGE_MODEL_SUFFIXES):
        return f"{cls} is not a language model with a loss head (a class named ...ForCausalLM or ...ForMaskedLM)"
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return f"{cls}.get_output_embeddings() names no output projection"
    if type(head) is not nn.Linear:
        return f"{cls}'s output projection is a {type(head).__name__}, not an nn.Linear"
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None:
        return f"{cls}'s output projection is not a submodule of the model"
    return name, head


class LossHeadRule(Rule):
    name = "loss_head"
    description = (
        "a language model's logits are formed only inside its cross-entropy, chunk by chunk: "
        "no tokens x vocabulary tensor kept (equal up to fp32 rounding)"
    )
    forward_exact = False  # the loss is summed per chunk: equal up to rounding, not bit for bit
    gradient_exact = False

    def __init__(self, options: LossHeadOptions | None = None) -> None:
        self.options = options or LossHeadOptions()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "LossHeadRule":
        gradients = options.get("loss_head_gradients", "backward")
        if gradients not in GRADIENTS:
            raise ConversionError(
                f"loss_head_gradients={gradients!r} must be 'backward' (the default: logits formed again "
                "in backward) or 'forward' (gradients made with the loss: a faster step, a weight-sized "
                "gradient kept until backward)")
        return cls(LossHeadOptions(gradients))

    def find(self, facts: ModelFacts) -> tuple[list[Site], list[Skip]]:
        found = output_projection(facts.model)
        if isinstance(found, str):
            return [], [Skip(self.name, "", found)]
        name, head = found
        reason = (
            f"logits ({head.out_features} classes per token) formed only inside the loss, in chunks "
            "of tokens: no log-softmax of tokens x vocabulary kept"
        )
        return [Site(self.name, name, reason)], []

    def apply(self, model: nn.Module, site: Site, facts: ModelFacts) -> nn.Module:
        module = model.get_submodule(site.module_name)
        head = LossHeadLinear.from_module(module, gradients_in_forward=self.options.gradients == "forward")
        return swap_module(model, site.module_name, head)
