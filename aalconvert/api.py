"""convert(), revert() and inspect(): thin orchestration of trace -> facts -> plan -> apply (-> report)."""

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.func import functional_call

from aalconvert.checkpointing import remove_checkpoints
from aalconvert.errors import ConversionError
from aalconvert.example_inputs import self_described_inputs
from aalconvert.facts import ModelFacts, gather_facts
from aalconvert.hf_masks import causal_masks_as_in_eager, masks_of_ones_followed, passes_positions
from aalconvert.memory import (
    SavedByModule,
    TwoValuedStorages,
    fake_copy,
    fake_inputs,
    saved_by_module,
    tensors_in,
)
from aalconvert.nn import CONVERTED_TYPES
from aalconvert.plan import Plan, SkipFilter, make_plan, skip_filter
from aalconvert.report import Report, build_report, optimizer_state_factor
from aalconvert.step_memory import StepSimulation, backward_of
from aalconvert.rules.base import SERVES, Rule, Skip
from aalconvert.rules.loss_head import output_projection
from aalconvert.rules.registry import PRECEDENCE, resolve
from aalconvert.rules.wiring import remove_wiring, swap_module
from aalconvert.trace import _one_line

if TYPE_CHECKING:
    from aalconvert.budget import BudgetPlan  # budget imports this module: only for the annotation


def _check_model(model: Any, caller: str = "convert") -> None:
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"{caller}() takes a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (not a state_dict or a class)"
        )
    on_meta = [name or "<root>" for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ConversionError(
            f"the model's parameters are on the meta device (e.g. {on_meta[0]}); convert a "
            "materialised model, or use aalconvert.inspect() to study a meta-device model"
        )


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A new module tree that shares every Parameter and buffer with ``model``."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def plan_conversion(
    model: nn.Module,
    rules: str | Rule | Sequence[str | Rule] = "auto",
    *,
    example_inputs: tuple | None = None,
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> tuple[Plan, ModelFacts]:
    """Validate everything and decide every rewrite, without modifying ``model``.

    Without ``example_inputs``, a model that describes its own input (Hugging
    Face token and image models) is traced on that (``self_described_inputs``).
    """
    _check_model(model)
    chosen = resolve(rules, rule_options)
    _check_not_converted_by_other_rules(model, chosen)
    if example_inputs is None:
        facts = _facts_on_self_described_inputs(model)
    else:
        facts = gather_facts(model, example_inputs)
    plan = make_plan(facts, chosen, skip_filter(skip, facts))
    _drop_sites_that_fail(plan, facts, model)
    return plan, facts


def _facts_on_self_described_inputs(model: nn.Module) -> ModelFacts:
    """``gather_facts`` on the inputs ``model`` describes itself (none: traced without values); a model
    that fails on them says that they were its own, not the caller's."""
    example_inputs = self_described_inputs(model)
    try:
        return gather_facts(model, example_inputs)
    except ConversionError as error:
        if example_inputs is None:
            raise
        shapes = ", ".join("None" if x is None else f"{tuple(x.shape)}" for x in example_inputs)
        raise ConversionError(
            f"no example_inputs were given, so the model was run on its own dummy_inputs ({shapes}, "
            f"positional), and it failed ({_one_line(error.__cause__ or error)}); pass "
            "example_inputs=(...) with the positional arguments model(*example_inputs) takes in training"
        ) from error


def _drop_sites_that_fail(plan: Plan, facts: ModelFacts, model: nn.Module) -> None:
    """Rehearse ``plan`` on a throwaway copy of ``model``; a site whose rewrite fails becomes a skip.

    One module a rule cannot take after all (a geometry, an in-place op or an
    untraceable forward its finder did not foresee) must not fail the whole
    conversion, nor leave the user's model half converted: it stays as it is,
    and the plan and the report say why.
    """
    try:
        rehearsal = _shallow_copy(model)
    except Exception:  # a model deepcopy cannot copy: nothing to rehearse on
        return
    for name, site in list(plan.sites.items()):
        rule = next(r for r in plan.rules if r.name == site.rule)
        try:
            rehearsal = rule.apply(rehearsal, site, facts)
        except Exception as error:  # noqa: BLE001 -- any failure of one site only skips that site
            reason = f"converting it failed ({_one_line(error)})"
            for dropped in [name, *(n for n, s in plan.sites.items() if s.payload.get(SERVES) == name)]:
                plan.sites.pop(dropped)
                plan.skips.append(Skip(site.rule, dropped, reason if dropped == name else f"{name}: {reason}"))


_RULES_ATTRIBUTE = "_aalconvert_rules"  # on a converted root: the rule names applied to its tree


def _earlier_conversion(model: nn.Module) -> tuple[set[str], str | None]:
    """The rule names recorded by earlier convert() calls in ``model``'s tree, and a converted module's name."""
    recorded: set[str] = set()
    converted = None
    for name, module in model.named_modules():
        recorded.update(module.__dict__.get(_RULES_ATTRIBUTE, ()))
        if converted is None and isinstance(module, CONVERTED_TYPES):
            converted = name
    return recorded, converted


def _check_not_converted_by_other_rules(model: nn.Module, chosen: Sequence[Rule]) -> None:
    """Refuse to add rules to a converted model: its variants would stay, keeping more than one pass.

    A second convert() cannot turn a variant of one rule into another rule's
    (a recompute layer into a k-bit one), so ``convert(convert(m, "recompute"),
    "approx4")`` keeps more than ``convert(m, ["recompute", "approx4"])``.
    Converting again with rules already applied is allowed (and changes nothing).
    """
    earlier, converted = _earlier_conversion(model)
    names = [rule.name for rule in chosen]
    added = [name for name in names if name not in earlier]
    if not earlier or not added:
        return
    wanted = [name for name in (*sorted(earlier, key=_precedence), *added) if name != "exact"]
    example = ""
    if converted is not None:
        example = f" (e.g. {converted or '<root>'!r} is a {type(model.get_submodule(converted)).__name__})"
    raise ConversionError(
        f"the model is already converted with {', '.join(sorted(earlier, key=_precedence))}"
        f"{example}; converting it again with "
        f"{', '.join(added)} would leave those variants as they are and keep more memory than one "
        f"conversion: convert the original model once with all rules, e.g. "
        f"aalconvert.convert(model, {wanted or ['exact']!r}) (aalconvert.revert() gives the plain "
        f"model back)"
    )


def _precedence(name: str) -> int:
    family = "approx" if name.startswith("approx") else name
    return PRECEDENCE.index(family) if family in PRECEDENCE else len(PRECEDENCE)


def convert(
    model: nn.Module,
    rules: str | Rule | Sequence[str | Rule] = "auto",
    *,
    example_inputs: tuple | None = None,
    inplace: bool = False,
    skip: Iterable[str] | SkipFilter | None = None,
    budget: "str | int | BudgetPlan | None" = None,
    kept_budget: str | int | float | None = None,
    optimizer: str | None = None,
    **rule_options: Any,
) -> nn.Module:
    """Return ``model`` rewritten to keep less for backward.

    ``rules``: a name (``"auto"``, ``"exact"``, ``"recompute"``, ``"ara"``,
    ``"asa"``, ``"approx8"``, ``"approx4"``, ``"approx2"``), a list of them, or
    Rule objects; see ``aalconvert.rules.available()``. ``rule_options``:
    ``ara_group`` (k, one k per stage, or ``"stage"``), ``asa_eps``,
    ``asa_lr_expansion``, ``asa_variant``, ``loss_head_gradients`` ("forward" or
    "backward"), ``bits``, ``stochastic``,
    ``group_size``, ``min_numel``, ``scale_dtype``, ``companding``. ``skip``: module names or a predicate
    ``(module, name) -> bool``. ``example_inputs`` give shapes (else structure is used).
    The result shares the original Parameter objects (same state_dict keys);
    converting a converted model changes nothing. Unless ``inplace``, the
    original module tree is left as it was.

    ``budget`` ("10GiB", "512MiB", "1.5GB" or bytes): instead of ``rules``, a
    rule per module chosen so that the predicted peak of one training step
    with ``optimizer`` fits (see :func:`aalconvert.plan`); ``example_inputs``
    is then required and ``rules`` must stay at its default. ``kept_budget``
    (a size, or a fraction of what BP keeps: 0.25, "25%"): the most the
    forward may keep for backward, instead of ``budget`` or beside it.
    ``budget`` may also be a plan from :func:`aalconvert.plan` for this model:
    converted as it decided, without planning again (it carries its options).
    """
    _check_model(model)
    from aalconvert.budget import BudgetPlan, convert_to_budget, convert_with_plan

    if isinstance(budget, BudgetPlan):
        given = [name for name, value in (("rules", rules != "auto"), ("kept_budget", kept_budget is not None),
                                          ("optimizer", optimizer is not None), ("skip", skip is not None),
                                          *((option, True) for option in rule_options)) if value]
        if given:
            raise ConversionError(
                f"budget= is a plan, which already decided {', '.join(given)}: pass them to aalconvert.plan(...)")
        return convert_with_plan(model, budget, example_inputs, inplace=inplace)
    if budget is not None or kept_budget is not None or optimizer is not None:
        if rules != "auto":
            raise ConversionError(
                f"rules={rules!r} with budget=: the planner chooses the rules itself; to limit them, "
                "call aalconvert.budget.convert_to_budget(model, budget, example_inputs, rules=[...])")
        return convert_to_budget(model, budget, example_inputs, kept_budget=kept_budget, optimizer=optimizer,
                                 inplace=inplace, skip=skip, **rule_options)
    target = model if inplace else _shallow_copy(model)
    plan, facts = plan_conversion(
        target, rules, example_inputs=example_inputs, skip=skip, **rule_options
    )
    for site in plan.sites.values():
        rule = next(r for r in plan.rules if r.name == site.rule)
        target = rule.apply(target, site, facts)
    if plan.sites:
        earlier, _ = _earlier_conversion(target)
        setattr(target, _RULES_ATTRIBUTE, tuple(sorted(earlier | {r.name for r in plan.rules},
                                                       key=_precedence)))
    return target


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Give back plain torch modules sharing the same Parameters.

    ASA's forward change (``W (x + eps*s)``) is dropped: the reverted model
    computes ``W x`` again, so its outputs differ slightly from the ASA model's.
    """
    _check_model(model, "revert")
    target = model if inplace else _shallow_copy(model)
    # Unwire first: a slot's handles point at the hook dicts of the modules it was wired on,
    # so once a variant is swapped out (to_module() may carry its hooks over) they miss.
    remove_wiring(target)
    remove_checkpoints(target)  # blocks the budget planner checkpointed
    for name, module in list(target.named_modules()):
        if isinstance(module, CONVERTED_TYPES):
            target = swap_module(target, name, module.to_module())
    for module in target.modules():
        module.__dict__.pop(_RULES_ATTRIBUTE, None)
    return target


def inspect(
    model: nn.Module,
    example_inputs: tuple,
    rules: str | Rule | Sequence[str | Rule] = "auto",
    *,
    optimizer: str | None = None,
    labels: torch.Tensor | str | None = "auto",
    skip: Iterable[str] | SkipFilter | None = None,
    **rule_options: Any,
) -> Report:
    """What conversion would save, module by module, without running the real computation.

    Plans the conversion on a fake copy of ``model`` (``model`` itself is not
    touched) and runs a training-mode forward of that copy under ordinary
    backprop, then applies the plan to the copy and runs it again: fake
    tensors carry shapes and dtypes only (no memory, no compute), so a model
    on the meta device or larger than the machine works. Every tensor kept for
    backward is attributed to the module that kept it. If an op fails on fake
    tensors, the forward runs on the meta device instead (the report says so).
    ``optimizer`` (None, "sgd", "sgd_momentum", "adam", "adamw") adds its
    state (0, 0, 1x, 2x, 2x the trainable parameter bytes) to the predicted
    peak of one step = parameters + gradients + optimizer state + activations
    kept + twice the largest module output (see ``Report.totals``).
    ``labels``: passed to the forward as ``labels=`` so that a language model's
    loss head (logits, log-softmax) is counted as a training step keeps it;
    ``"auto"`` passes the first example input (the token ids) to Hugging Face
    ``*ForCausalLM``/``*ForMaskedLM`` models and nothing to other models, None
    never passes labels. ``rules``, ``skip`` and ``rule_options`` are as for
    :func:`convert`. All figures are bytes.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"inspect() takes a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (not a state_dict or a class)"
        )
    if not isinstance(example_inputs, tuple):
        raise ConversionError(
            f"example_inputs must be a tuple of the model's positional arguments, got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (tensor,)"
        )
    optimizer_state_factor(optimizer)
    labels, labels_note = _forward_labels(model, example_inputs, labels)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = _estimate_device(model, example_inputs)
    target = fake_copy(model, fake_mode, device).train()
    inputs = fake_inputs(example_inputs, fake_mode, device)
    keywords = {} if labels is None else {"labels": fake_inputs((labels,), fake_mode, device)[0]}
    plan, facts = plan_conversion(target, rules, example_inputs=inputs, skip=skip, **rule_options)
    notes: list[str] = []
    bp = _saved_by_module(target, inputs, keywords, fake_mode, notes)
    # The copy is ours: apply the very plan the report shows, as convert(inplace=True) would.
    for site in plan.sites.values():
        rule = next(r for r in plan.rules if r.name == site.rule)
        target = rule.apply(target, site, facts)
    kept = _saved_by_module(target, inputs, keywords, fake_mode, notes)
    return build_report(
        facts, plan, bp, kept, optimizer=optimizer,
        estimated_on=_estimated_on(notes),
        notes=notes[:1] + ([labels_note] if labels_note else []),
    )


def _estimated_on(notes: list[str]) -> str:
    """Where the estimate ran, for the report: the meta device when fake tensors failed (noted), else fake tensors."""
    return "the meta device" if any("meta device" in note for note in notes) else "fake tensors"


def _forward_labels(
    model: nn.Module, example_inputs: tuple, labels: torch.Tensor | str | None
) -> tuple[torch.Tensor | None, str | None]:
    """The ``labels=`` inspect passes to the forward, and a note saying so (or None, None)."""
    if labels is None or isinstance(labels, torch.Tensor):
        return labels, None if labels is None else "forward run with the labels given"
    if labels != "auto":
        raise ConversionError(
            f"labels must be 'auto', None or a tensor of class ids, got {labels!r}"
        )
    first = example_inputs[0] if example_inputs else None
    is_language_model = not isinstance(output_projection(model), str)
    if not is_language_model or not isinstance(first, torch.Tensor) or first.is_floating_point():
        return None, None
    return first, (
        "forward run with labels = the input ids, so the loss head (logits, log-softmax) counts as "
        "in a training step; pass labels=None (CLI: --labels none) to leave it out"
    )


def _saved_by_module(
    model: nn.Module, inputs: tuple, keywords: dict, fake_mode: FakeTensorMode, notes: list[str]
) -> SavedByModule:
    """What a training forward of ``model`` keeps and its step's peak, on fake tensors, else on the
    meta device (noted)."""
    try:
        with fake_mode, causal_masks_as_in_eager(passes_positions(model, inputs, keywords)):
            return _simulated_step(model, lambda: model(*inputs, **keywords), tuple(model.parameters()),
                                   (*model.parameters(), *model.buffers(), *tensors_in((inputs, keywords))), notes)
    except Exception as error:  # an op without a fake implementation: the meta device may do
        notes.append(f"fake tensors failed ({_one_line(error)}); estimated on the meta device")
        return _saved_on_meta(model, inputs, keywords, error, notes)


def _simulated_step(model: nn.Module, forward: Callable[[], Any], parameters: tuple[torch.Tensor, ...],
                    known: tuple[torch.Tensor, ...], notes: list[str]) -> SavedByModule:
    """``saved_by_module`` of one forward, then its backward under a ``StepSimulation`` for the step's peak.

    A backward that fails on fake tensors leaves ``step_bytes`` None (noted):
    the report then adds kept, gradients and transients instead.
    """
    outputs: list[Any] = []

    def run() -> Any:
        outputs.append(forward())
        return outputs[-1]

    # TwoValuedStorages: the packer of the lossless rules keeps CPU dropout's float mask in 1 bit
    # by reading its values, which fake tensors do not have; the mode tells it how the mask was made.
    with StepSimulation(known) as simulation, TwoValuedStorages(), masks_of_ones_followed(known):
        saved = saved_by_module(model, run, parameters)
        try:
            backward_of(outputs.pop())
            saved.step_bytes = simulation.peak_bytes
        except Exception as error:
            notes.append(f"the step's backward did not run on fake tensors ({_one_line(error)}); its peak "
                         "adds activations kept, gradients and the largest transient")
    for parameter in parameters:  # the next estimate on this copy starts without gradients, as a step does
        parameter.grad = None
    return saved


def _estimate_device(model: nn.Module, example_inputs: tuple) -> torch.device:
    """The device the fake tensors claim: the inputs', else the parameters', else CPU (never meta)."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    for tensor in (*tensors, *model.parameters()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _saved_on_meta(model: nn.Module, inputs: tuple, keywords: dict, fake_error: Exception,
                   notes: list[str]) -> SavedByModule:
    """``saved_by_module`` with every parameter, buffer and input swapped for a meta tensor."""

    def meta(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")

    state = {name: meta(t) for name, t in model.named_parameters(remove_duplicate=False)}
    state.update({name: meta(t) for name, t in model.named_buffers(remove_duplicate=False)})
    for name, parameter in model.named_parameters(remove_duplicate=False):
        state[name].requires_grad_(parameter.requires_grad)
    meta_inputs = tuple(meta(x) if isinstance(x, torch.Tensor) else x for x in inputs)
    meta_keywords = {key: meta(x) for key, x in keywords.items()}
    try:
        return _simulated_step(model, lambda: functional_call(model, state, meta_inputs, meta_keywords),
                               tuple(state.values()),
                               (*state.values(), *tensors_in((meta_inputs, meta_keywords))), notes)
    except Exception as error:
        raise ConversionError(
            f"the model ran neither on fake tensors ({_one_line(fake_error)}) nor on the meta "
            f"device ({_one_line(error)}); use aalconvert.memory.measure_saved on real tensors"
        ) from error
