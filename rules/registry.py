"""Rule names, the ``auto`` recipe, and the precedence that settles conflicts.

Every rule set includes ``exact``: its masks change no number and never keep
more, so leaving them out would only waste memory. ``auto`` is ``loss_head`` +
``ara`` + ``asa`` + ``recompute`` + ``exact``; next to an
``approx*`` rule it drops ``ara`` (k-bit copies of a group's block inputs keep
less than one full-precision anchor). Explicitly named rules are always kept.

Precedence (first wins when two rules claim one module): ``loss_head`` >
``ara`` > ``asa`` > ``exact`` > ``approx*`` > ``recompute``. The loss head comes
first: it drops a tokens x vocabulary tensor, far more than any rule saves on
the head's input. The learning rules come next because
they drop a weighted layer's input outright; a 1-bit ``exact`` mask beats a
k-bit copy of the same tensor; ``approx*`` beats ``recompute``, whose layers
rely on a norm keeping its input in full, where k-bit copies of both keep less.
"""

from collections.abc import Callable, Sequence
from typing import Any

from aalconvert.errors import ConversionError
from aalconvert.rules.approx import ApproxRule
from aalconvert.rules.ara import ARARule
from aalconvert.rules.asa import ASARule
from aalconvert.rules.base import Rule
from aalconvert.rules.exact import ExactRule
from aalconvert.rules.loss_head import LossHeadRule
from aalconvert.rules.recompute import RecomputeRule

AUTO = ("loss_head", "ara", "asa", "recompute", "exact")
PRECEDENCE = ("loss_head", "ara", "asa", "exact", "approx", "recompute")
APPROX_BITS = (8, 4, 2)  # bit widths of the approx rules: approx8, approx4, approx2

_FACTORIES: dict[str, Callable[[dict[str, Any]], Rule]] = {
    "exact": lambda options: ExactRule.from_options(options),
    "loss_head": lambda options: LossHeadRule.from_options(options),
    "recompute": lambda options: RecomputeRule.from_options(options),
    "ara": lambda options: ARARule.from_options(options),
    "asa": lambda options: ASARule.from_options(options),
    **{f"approx{bits}": (lambda options, bits=bits: ApproxRule.from_options(options, bits=bits))
       for bits in APPROX_BITS},
}
NAMES = ("auto", *_FACTORIES)

# Which convert() keyword options each rule reads; an option no chosen rule reads is an error.
OPTIONS_BY_RULE: dict[str, tuple[str, ...]] = {
    "loss_head": ("loss_head_gradients",),
    "ara": ("ara_group",),
    "asa": ("asa_eps", "asa_lr_expansion", "asa_variant"),
    "approx": ("bits", "stochastic", "group_size", "min_numel", "scale_dtype", "companding"),
}


def build_rule(name: str, options: dict[str, Any]) -> Rule:
    """The Rule object for one registered name (not ``auto``), built from convert() options."""
    return _FACTORIES[name](options)


def available() -> dict[str, str]:
    """Every rule name with its one-line description (``auto`` included)."""
    described = {"auto": "the paper's recipe: " + " + ".join(AUTO)}
    for name in _FACTORIES:
        described[name] = build_rule(name, {}).description
    return described


def _rules_problem(given: str) -> ConversionError:
    return ConversionError(
        f"rules must be a rule name or a list of rule names (or Rule objects), got {given}; "
        f"available rules: {', '.join(NAMES)}"
    )


def _names(rules: str | Rule | Sequence[str | Rule]) -> list[str | Rule]:
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    if not isinstance(rules, (list, tuple)):
        raise _rules_problem(f"{type(rules).__name__} {rules!r}")
    if not rules:
        raise ConversionError(
            f"rules is an empty list: name at least one rule (e.g. 'exact' for lossless masks "
            f"only, or 'auto'); available rules: {', '.join(NAMES)}"
        )
    for rule in rules:
        if not isinstance(rule, (str, Rule)):
            raise _rules_problem(f"a list holding {type(rule).__name__} {rule!r}")
    quantizing = any(
        (isinstance(r, Rule) and r.name.startswith("approx")) or str(r).startswith("approx")
        for r in rules
    )
    expanded: list[str | Rule] = []
    for rule in rules:
        if rule == "auto":
            # One full-precision anchor per group keeps more than k-bit copies of the
            # group's block inputs would, so auto leaves ARA out next to an approx rule.
            expanded.extend(name for name in AUTO if not (quantizing and name == "ara"))
        elif isinstance(rule, Rule) or rule in _FACTORIES:
            expanded.append(rule)
        else:
            raise ConversionError(
                f"unknown rule {rule!r}; choose from {', '.join(NAMES)} or pass a Rule object"
            )
    if not any(r == "exact" or isinstance(r, ExactRule) for r in expanded):
        expanded.append("exact")  # the lossless base tier of every rule set
    return expanded


def _family(rule: Rule) -> str:
    return "approx" if rule.name.startswith("approx") else rule.name


def _precedence(rule: Rule) -> int:
    """Where ``rule`` goes among the chosen: the built-in families in PRECEDENCE, then any other
    Rule object (a user's own, checkpointing) after them, in the order given (the sort is stable)."""
    family = _family(rule)
    return PRECEDENCE.index(family) if family in PRECEDENCE else len(PRECEDENCE)


def resolve(rules: str | Rule | Sequence[str | Rule], options: dict[str, Any]) -> list[Rule]:
    """Turn names and Rule objects into Rule objects in precedence order.

    ``options`` are convert()'s keyword options; each is checked against the
    rules chosen, so a misspelt or irrelevant option fails before any change.
    """
    names = _names(rules)
    if "bits" in options and options["bits"] not in APPROX_BITS:
        raise ConversionError(
            f"bits={options['bits']!r} is not an allowed bit width; allowed: "
            + ", ".join(f"{bits} (rule 'approx{bits}')" for bits in APPROX_BITS)
        )
    chosen: list[Rule] = []
    for rule in names:
        built = rule if isinstance(rule, Rule) else build_rule(rule, options)
        if _family(built) in {_family(r) for r in chosen}:
            if any(r.name == built.name for r in chosen):
                continue
            raise ConversionError(
                f"rules {built.name!r} and {[r.name for r in chosen if _family(r) == _family(built)][0]!r} "
                "both quantize the same tensors; choose one"
            )
        chosen.append(built)
    families = {_family(rule) for rule in chosen}
    allowed = {"skip"} | {o for f in families for o in OPTIONS_BY_RULE.get(f, ())}
    for option in options:
        if option not in allowed:
            known = sorted({"skip"} | {o for opts in OPTIONS_BY_RULE.values() for o in opts})
            if option in known:
                raise ConversionError(
                    f"option {option}= only applies to a rule you did not choose "
                    f"(chosen: {', '.join(r.name for r in chosen)})"
                )
            raise ConversionError(f"unknown option {option}=; allowed options: {', '.join(known)}")
    chosen.sort(key=_precedence)
    coordinate(chosen)
    return chosen


def coordinate(chosen: list[Rule]) -> None:
    """Settle what one rule leaves to another of the same set.

    Next to an approx rule, ``exact`` packs no masks on the root (the approx
    rule's packer does, with its k-bit copies), and ``asa`` leaves the layers
    whose input a chain rebuilds: they share the chain start's k-bit copy
    there, keeping less than a 1-bit sign. Next to ``recompute`` alone (``auto``)
    ASA leaves the layers whose chain starts at a norm or activation that saves
    ``z`` itself and that no rule before recompute converts (LayerNorm, RMSNorm,
    GroupNorm, GELU, SiLU, Hardswish, zoo norms and activations; not batch norms,
    whose 1x1 convolutions keep the paper's ASA): the layer then keeps nothing,
    exactly, where ASA keeps a 1-bit sign and changes the forward. Next to an approx
    rule, ``recompute`` leaves fused batch-norm activations to its packer, which keeps
    their input and copy in k bits (a variant's own saves would pass it in full).
    """
    families = [_family(rule) for rule in chosen]
    rebuilding = next((rule.name for rule in chosen if _family(rule) == "approx"), None)
    if rebuilding is None and "recompute" in families:
        rebuilding = "recompute"
    for rule in chosen:
        if isinstance(rule, ExactRule) and not isinstance(rule, ApproxRule):
            rule.pack_masks = "approx" not in families
        if isinstance(rule, ASARule):
            rule.leave_chains = rebuilding
        if isinstance(rule, RecomputeRule):
            rule.beside_approx = "approx" in families
