"""Facts about traced regions: residual blocks ``x + f(x)``, their chains, and ARA groups.

Everything here reads graphs produced by :mod:`aalconvert.trace` (shapes and
qualified module names come from ``node.meta["aalconvert"]``) and returns
records; nothing is modified. Module names are qualified relative to the model
root, ready for swapping modules in the user's own module tree.

ARA grouping follows methods.md section 1: groups of consecutive chained blocks
whose inputs have the same shape; a group never crosses a shape change. Unlike
the paper, a group also never spans two parent modules (all its blocks sit in
one container, e.g. ``layer2``), so a projection block that opens a stage does
not join the previous stage's group: wrapping each stage (activation
checkpointing, FSDP units) then always holds whole groups. A block input inside a group (not the anchor) is released only if
nothing else keeps it, so a joining block's input must come from a ReLU module
(swappable for a 1-bit-mask ReLU) or directly from the previous residual add
(which keeps nothing); pre-norm blocks never qualify (the norm keeps ``s``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.trace import META_KEY, NodeFacts, Region, is_linear_like, is_norm_like

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_NORM_FUNCTIONS = (F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.rms_norm)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Mish,
                       nn.Hardswish)
_ACTIVATION_FUNCTIONS = _RELU_FUNCTIONS + (F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, torch.tanh)
_METADATA_FUNCTIONS = (torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like,
                       torch.rand_like, torch.randn_like)
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "layout")
_METADATA_METHODS = ("size", "dim", "new_zeros", "new_ones", "new_empty", "new_full")
_PROJECTION_MAX_DEPTH = 8  # nodes walked back from a shortcut operand looking for the block input


@dataclass(frozen=True)
class ResidualBlock:
    """One ``s + f(s)`` (identity shortcut) or ``P(s) + f(s)`` (projection shortcut) in a region.

    ``input`` is ``s``; ``add`` the residual sum; ``output`` what the block hands on
    (the activation or norm applied to the sum alone, else the sum). ``input_producer``
    is "relu", "norm", "add", "input" (a region input) or the op / module class name;
    ``consumers`` are the weighted modules reading ``s`` directly inside the block;
    ``branch_weighted`` every weighted module of ``f`` in graph order, and
    ``branch_calls`` the nodes that call them (a module called again elsewhere,
    as a shared layer is, has further nodes).
    """

    region: str
    input: fx.Node
    add: fx.Node
    output: fx.Node
    input_producer: str
    input_producer_module: str | None
    consumers: tuple[str, ...]
    branch_weighted: tuple[str, ...]
    branch_calls: frozenset[fx.Node]
    shortcut: str
    prenorm: bool

    @property
    def _module_prefix(self) -> str:
        """The common module prefix of the branch's weighted layers ("layer1.0"), "" if none."""
        parts = [name.split(".") for name in self.branch_weighted]
        common: list[str] = []
        for pieces in zip(*parts):
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        if len(self.branch_weighted) == 1:
            common = common[:-1]
        return ".".join(common)

    @property
    def name(self) -> str:
        """A readable name: the common module prefix of the branch's weighted layers ("layer1.0")."""
        prefix = self._module_prefix
        if prefix:
            return prefix
        return f"{self.region}:{self.add.name}" if self.region else self.add.name

    @property
    def parent(self) -> str:
        """The module holding this block ("layer2" for "layer2.1"; "" for the root).

        A block without a module of its own (its layers sit directly in the traced
        region's module) belongs to the region's module.
        """
        prefix = self._module_prefix
        return prefix.rpartition(".")[0] if prefix else self.region

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape of ``s`` (elements per dimension), None when traced without example inputs."""
        return _facts(self.input).shape


@dataclass(frozen=True)
class ARAGroup:
    """Consecutive chained blocks sharing one anchor (the input of the first block).

    ``anchor_consumers``: weighted modules reading the anchor in block 0 (exact BP);
    ``ara_layers``: weighted modules reading the inputs of blocks 1..k-1 (their weight
    gradient uses the anchor); ``mask_relus``: ReLU modules whose output is a block
    input inside the group (they must keep a 1-bit mask, or ARA saves nothing).
    """

    region: str
    blocks: tuple[ResidualBlock, ...]
    anchor: fx.Node
    anchor_consumers: tuple[str, ...]
    ara_layers: tuple[str, ...]
    mask_relus: tuple[str, ...]


@dataclass(frozen=True)
class UngroupedBlock:
    """A residual block that is in no ARA group, and why in words."""

    block: ResidualBlock
    reason: str


def _facts(node: fx.Node) -> NodeFacts:
    facts = node.meta.get(META_KEY)
    if facts is None:
        raise ConversionError(
            f"node {node.format_node()} has no node.meta[{META_KEY!r}]; "
            f"analyse regions returned by aalconvert.trace.trace_model"
        )
    return facts


def _module(region: Region, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return region.graph_module.get_submodule(node.target)


def _is_norm(region: Region, node: fx.Node) -> bool:
    module = _module(region, node)
    if module is not None:
        return is_norm_like(module)
    return node.op == "call_function" and node.target in _NORM_FUNCTIONS


def _is_weighted_module(region: Region, node: fx.Node) -> bool:
    module = _module(region, node)
    return module is not None and is_linear_like(module)


def _is_weighted(region: Region, node: fx.Node) -> bool:
    """A weighted module's call, or a function given a child linear's weight (``functional_linears``)."""
    return _is_weighted_module(region, node) or bool(functional_linears(region, node))


def functional_linears(region: Region, node: fx.Node) -> tuple[str, ...]:
    """Qualified names of the children whose weight ``node`` hands to a function, in argument order.

    torchvision's Swin attention calls ``shifted_window_attention(x, self.qkv.weight,
    self.proj.weight, ...)``: ``qkv`` and ``proj`` are never called as modules, and
    their ``F.linear`` runs inside a function fx keeps whole. Such a child counts
    when its weight is read as an attribute and handed directly to the
    ``call_function`` node, the module whose forward makes the call (its
    ``nn_module_stack``) is the child's own parent, and the region never calls
    the child as a module. (The graph module holds the weight, not the child's
    class: rules check the class on the model.)
    """
    if node.op != "call_function":
        return ()
    stack = node.meta.get("nn_module_stack") or {}
    caller = next(reversed(stack), None) if stack else None
    if caller is None:
        return ()
    names = []
    for argument in (*node.args, *node.kwargs.values()):
        if not (isinstance(argument, fx.Node) and argument.op == "get_attr"):
            continue
        owner, _, attribute = str(argument.target).rpartition(".")
        if attribute != "weight" or owner.rpartition(".")[0] != caller:
            continue
        if not any(n.op == "call_module" and n.target == owner for n in region.graph_module.graph.nodes):
            names.append(f"{region.name}.{owner}" if region.name else owner)
    return tuple(names)


def _weighted_names(region: Region, node: fx.Node) -> tuple[str, ...]:
    """The qualified names of the weighted layers ``node`` runs: its module, or functional linears."""
    if _is_weighted_module(region, node):
        return (_facts(node).qualified_name,)
    return functional_linears(region, node)


def _is_activation(region: Region, node: fx.Node) -> bool:
    module = _module(region, node)
    if module is not None:
        return isinstance(module, _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _producer(region: Region, node: fx.Node) -> tuple[str, str | None]:
    """Category of what produced ``node`` and the qualified module name when it is a module."""
    if node.op == "placeholder":
        return "input", None
    module = _module(region, node)
    if module is not None:
        name = _facts(node).qualified_name
        if isinstance(module, nn.ReLU):
            return "relu", name
        if is_norm_like(module):
            return "norm", name
        return type(module).__name__, name
    if _is_add(node):
        return "add", None
    if (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
            node.op == "call_method" and node.target in _RELU_METHODS):
        return "relu", None
    if _is_norm(region, node):
        return "norm", None
    target = node.target
    return (target if isinstance(target, str) else getattr(target, "__name__", str(target))), None


def _reads_metadata_only(node: fx.Node) -> bool:
    """True for ops that read only shape/dtype/device of their inputs (``ones_like(x)``, ``x.size()``):
    such an edge is no data dependence."""
    if node.op == "call_function":
        return node.target in _METADATA_FUNCTIONS or (
            node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES)
    return node.op == "call_method" and node.target in _METADATA_METHODS


class _Order:
    """Graph positions, so a backward walk can stop at nodes older than its source."""

    def __init__(self, graph: fx.Graph):
        self.index = {node: i for i, node in enumerate(graph.nodes)}

    def between(self, source: fx.Node, sink: fx.Node) -> set[fx.Node]:
        """Nodes on some path source -> sink, ends included; empty if sink does not depend on source."""
        low, high = self.index[source], self.index[sink]
        if low > high:
            return set()
        backward: set[fx.Node] = set()
        stack = [sink]
        while stack:
            node = stack.pop()
            if node in backward or self.index[node] < low:
                continue
            backward.add(node)
            if not _reads_metadata_only(node):
                stack.extend(node.all_input_nodes)
        if source not in backward:
            return set()
        forward: set[fx.Node] = set()
        stack = [source]
        while stack:
            node = stack.pop()
            if node in forward or node not in backward:
                continue
            forward.add(node)
            stack.extend(node.users)
        return forward


def find_residual_blocks(region: Region) -> list[ResidualBlock]:
    """Every residual sum ``s + f(s)`` / ``P(s) + f(s)`` in the region whose branch ``f`` has a weighted layer.

    Adds are ``operator.add``/``iadd``, ``torch.add`` and ``Tensor.add``/``add_``; ``f``
    must reach ``s`` through at least one Linear/Conv/linear-like module, and a
    projection ``P`` is a single-input chain holding a weighted module (e.g. a
    ``downsample`` Sequential(conv, bn)); an ``nn.Identity`` module on the shortcut is
    looked through. Returned in graph order.
    """
    order = _Order(region.graph_module.graph)
    blocks = []
    for node in region.graph_module.graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        left, right = node.args[0], node.args[1]
        if not isinstance(left, fx.Node) or not isinstance(right, fx.Node):
            continue
        left, right = _through_identity(region, left), _through_identity(region, right)
        block = _match_block(region, order, node, left, right)
        if block is not None:
            blocks.append(block)
    return blocks


def _through_identity(region: Region, node: fx.Node) -> fx.Node:
    """The tensor an ``nn.Identity`` call hands on (a shortcut written as ``self.shortcut = nn.Identity()``)."""
    while isinstance(_module(region, node), nn.Identity) and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node


def _match_block(region: Region, order: _Order, add: fx.Node, left: fx.Node,
                 right: fx.Node) -> ResidualBlock | None:
    for shortcut_operand, branch_operand in ((left, right), (right, left)):
        branch = order.between(shortcut_operand, branch_operand)
        if branch and _weighted_in(region, branch - {shortcut_operand}):
            return _block(region, order, add, shortcut_operand, branch, set(), "identity")
    candidates = []
    for shortcut_operand, branch_operand in ((left, right), (right, left)):
        found = _projection(region, order, shortcut_operand, branch_operand)
        if found is not None:
            candidates.append((found, branch_operand))
    if not candidates:
        return None
    # Both operands may walk back to s (conv-bn-relu-conv-bn is a single-input chain too):
    # the projection is the shorter one.
    (block_input, projection), branch_operand = min(candidates, key=lambda c: len(c[0][1]))
    branch = order.between(block_input, branch_operand)
    return _block(region, order, add, block_input, branch, projection, "projection")


def _weighted_in(region: Region, nodes: set[fx.Node]) -> bool:
    return any(_is_weighted(region, node) for node in nodes)


def _projection(region: Region, order: _Order, operand: fx.Node,
                other: fx.Node) -> tuple[fx.Node, set[fx.Node]] | None:
    """Walk back a single-input chain from ``operand`` to a node the other operand depends on
    through a weighted layer; the chain must hold a weighted module itself."""
    chain: set[fx.Node] = set()
    node = operand
    for _ in range(_PROJECTION_MAX_DEPTH):
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if len(inputs) != 1:
            return None
        chain.add(node)
        node = inputs[0]
        branch = order.between(node, other)
        if branch:
            if branch & chain:  # the other operand reads the chain: no separate shortcut
                return None
            if _weighted_in(region, chain) and _weighted_in(region, branch - {node}):
                return node, chain
            return None
    return None


def _block(region: Region, order: _Order, add: fx.Node, block_input: fx.Node, branch: set[fx.Node],
           projection: set[fx.Node], shortcut: str) -> ResidualBlock:
    inside = (branch | projection) - {block_input}
    in_order = sorted(inside, key=order.index.__getitem__)
    consumers = tuple(
        _facts(user).qualified_name for user in sorted(block_input.users, key=order.index.__getitem__)
        if user in inside and _is_weighted_module(region, user)
    )
    branch_weighted = tuple(name for node in in_order if node in branch for name in _weighted_names(region, node))
    branch_calls = frozenset(node for node in in_order if node in branch and _weighted_names(region, node))
    prenorm = any(user in branch and _is_norm(region, user) for user in block_input.users)
    producer, producer_module = _producer(region, block_input)
    return ResidualBlock(
        region=region.name, input=block_input, add=add, output=_handed_on(region, add, prenorm),
        input_producer=producer, input_producer_module=producer_module, consumers=consumers,
        branch_weighted=branch_weighted, branch_calls=branch_calls, shortcut=shortcut, prenorm=prenorm,
    )


def _handed_on(region: Region, add: fx.Node, prenorm: bool) -> fx.Node:
    """The activation (or, post-norm, the norm) applied to the sum and nothing else; else the sum.

    A norm after a pre-norm block's sum belongs to what follows (the next block or
    the final norm), so it is not followed there.
    """
    users = list(add.users)
    if len(users) == 1:
        user = users[0]
        if user.args and user.args[0] is add and (
                _is_activation(region, user) or (not prenorm and _is_norm(region, user))):
            return user
    return add


def shared_input_consumers(region: Region) -> list[tuple[fx.Node, tuple[str, ...]]]:
    """Tensors read directly by two or more weighted modules (Q, K, V; conv1 + downsample), graph order."""
    shared = []
    for node in region.graph_module.graph.nodes:
        readers = tuple(
            _facts(user).qualified_name for user in node.users if _is_weighted_module(region, user)
        )
        if len(readers) >= 2:
            shared.append((node, readers))
    return shared


# ---------------------------------------------------------------- grouping


def _start_problem(block: ResidualBlock) -> str | None:
    """Why ``block`` cannot be in any ARA group, or None."""
    if block.prenorm:
        return "pre-norm block (s + F(norm(s))): the norm keeps s, so ARA saves nothing"
    if not block.consumers:
        return "no Linear/Conv module reads the block input directly"
    for node in block.input.users:
        facts = _facts(node)
        if facts.qualified_name in block.consumers and facts.calls_in_region > 1:
            return (f"module {facts.qualified_name!r} is called {facts.calls_in_region} times in its "
                    f"region; a module used at several places cannot be swapped for one use")
    return None


def _join_problem(previous: ResidualBlock, anchor: ResidualBlock, block: ResidualBlock) -> str | None:
    """Why ``block`` cannot join the group run that ends with ``previous`` (anchor: its first block)."""
    problem = _start_problem(block)
    if problem is not None:
        return problem
    if block.region != previous.region or block.input is not previous.output:
        return "its input is not the output of the previous residual block"
    if block.input_producer == "norm":
        return (f"its input comes from norm {block.input_producer_module or block.input.name!r} "
                f"(post-norm block); only a ReLU module or a residual add releases a block input")
    if block.input_producer == "relu" and block.input_producer_module is None:
        return (f"its input comes from the function {block.input.format_node()}, not a module: "
                f"nothing to swap for a 1-bit-mask ReLU")
    if block.input_producer not in ("relu", "add"):
        return (f"its input comes from {block.input_producer}; only a ReLU module or a residual add "
                f"releases a block input")
    if block.parent != anchor.parent:
        return (f"it lies in module {block.parent or '<root>'!r}, the group's first block "
                f"{anchor.name!r} in {anchor.parent or '<root>'!r}: a group never spans two parent "
                f"modules, so checkpointing or wrapping one of them keeps whole groups")
    anchor_shape, shape = anchor.input_shape, block.input_shape
    if anchor_shape is not None and shape is not None:
        if shape != anchor_shape:
            return f"its input shape {shape} differs from the anchor shape {anchor_shape}"
    elif previous.shortcut == "projection":
        return "the previous block has a projection shortcut (shapes unknown: a projection ends a run)"
    return None


@dataclass
class _Runs:
    """Runs of blocks that could share an anchor, and the reason for every block outside one."""

    runs: list[list[ResidualBlock]]
    alone: list[UngroupedBlock]


def _find_runs(blocks: Sequence[ResidualBlock]) -> _Runs:
    """Greedy scan in model order: a block joins the current run or starts a new one."""
    runs: list[list[ResidualBlock]] = []
    alone: list[UngroupedBlock] = []
    current: list[ResidualBlock] = []
    before = ""  # why current[0] did not join the block before it

    def close(after: str) -> None:
        if len(current) >= 2:
            runs.append(list(current))
        elif current:
            reason = f"alone: cannot join the block before ({before}); the block after cannot join it ({after})"
            alone.append(UngroupedBlock(current[0], reason))

    for index, block in enumerate(blocks):
        join = "the block before is in no group" if index else "no residual block before it"
        if current:
            problem = _join_problem(current[-1], current[0], block)
            if problem is None:
                current.append(block)
                continue
            close(problem)
            current, join = [], problem
        start = _start_problem(block)
        if start is None:
            current, before = [block], join
        else:
            alone.append(UngroupedBlock(block, start))
    close("no residual block after it")
    return _Runs(runs, alone)


def _describe_run(run: list[ResidualBlock]) -> str:
    shape = run[0].input_shape
    shape_text = f", input {tuple(shape)}" if shape is not None else ""
    return f"{run[0].name}..{run[-1].name} ({len(run)} blocks{shape_text})"


def _sizes_per_run(runs: list[list[ResidualBlock]], group_size: int | Sequence[int] | str) -> list[int]:
    """One group size per run, validated."""
    if isinstance(group_size, str):
        if group_size != "stage":
            raise ConversionError(
                f"ara_group={group_size!r} is not allowed; use an int k >= 1, one k per run, or 'stage'")
        return [len(run) for run in runs]
    if isinstance(group_size, int) and not isinstance(group_size, bool):
        sizes = [group_size] * len(runs)
        given = [group_size]
    elif isinstance(group_size, Sequence):
        sizes = list(group_size)
        given = sizes
        if len(sizes) != len(runs):
            listed = "; ".join(_describe_run(run) for run in runs) or "none"
            raise ConversionError(
                f"ara_group={list(sizes)!r} gives {len(sizes)} group sizes but ARA found {len(runs)} "
                f"runs (stages) of chained residual blocks with equal input shape ({listed}); give "
                f"{len(runs)} entries (one k per run, in model order), an int k, or 'stage'")
    else:
        raise ConversionError(
            f"ara_group must be an int k >= 1, a sequence of ints (one per run) or 'stage', "
            f"got {type(group_size).__name__}")
    for k in given:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConversionError(f"ara_group entries must be ints >= 1, got {k!r}")
    return sizes


def _assign(blocks: Sequence[ResidualBlock],
            group_size: int | Sequence[int] | str) -> tuple[list[ARAGroup], list[UngroupedBlock]]:
    found = _find_runs(blocks)
    sizes = _sizes_per_run(found.runs, group_size)
    groups: list[ARAGroup] = []
    ungrouped = list(found.alone)
    for run, k in zip(found.runs, sizes):
        for start in range(0, len(run), k):
            members = run[start:start + k]
            if len(members) >= 2:
                groups.append(_group(members))
            else:
                reason = (f"left over after groups of k={k} in its run {_describe_run(run)}; "
                          f"a group of 1 block saves nothing")
                ungrouped.extend(UngroupedBlock(block, reason) for block in members)
    position = {id(block): i for i, block in enumerate(blocks)}
    ungrouped.sort(key=lambda item: position[id(item.block)])
    return groups, ungrouped


def _group(members: list[ResidualBlock]) -> ARAGroup:
    ara_layers = tuple(name for block in members[1:] for name in block.consumers)
    mask_relus: list[str] = []
    for block in members[1:]:
        if block.input_producer == "relu" and block.input_producer_module not in mask_relus:
            mask_relus.append(block.input_producer_module)
    return ARAGroup(
        region=members[0].region, blocks=tuple(members), anchor=members[0].input,
        anchor_consumers=members[0].consumers, ara_layers=ara_layers, mask_relus=tuple(mask_relus),
    )


def group_blocks(blocks: Sequence[ResidualBlock],
                 group_size: int | Sequence[int] | str = 2) -> list[ARAGroup]:
    """Cut chains of residual blocks into ARA groups (methods.md section 1).

    ``blocks`` in model order (e.g. ``find_residual_blocks`` over every region).
    ``group_size``: k >= 1 blocks per group in every run; a sequence with one k per
    run of >= 2 chainable blocks with equal input shape (ResNet-50: 4 runs, so
    ``(3, 4, 6, 2)``); or "stage" for one group per run. Groups of 1 are omitted.
    Raises ConversionError on an invalid group_size. :func:`ungrouped_blocks` says
    why each remaining block is in no group.
    """
    return _assign(blocks, group_size)[0]


def ungrouped_blocks(blocks: Sequence[ResidualBlock],
                     group_size: int | Sequence[int] | str = 2) -> list[UngroupedBlock]:
    """The blocks :func:`group_blocks` leaves out with the same arguments, each with the reason."""
    return _assign(blocks, group_size)[1]
