"""Everything a rule may ask about a model, gathered once before any rule runs.

Rules read these facts and never trace or analyse on their own, so every rule
sees the same graph and the report can explain every decision from them.
"""

from dataclasses import dataclass, field

from torch import fx, nn

from aalconvert.analysis import ResidualBlock, find_residual_blocks, functional_linears
from aalconvert.trace import TraceResult, is_norm_like, trace_model

# Modules whose backward keeps their own input: a tensor they read stays alive anyway.
KEEPS_INPUT: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,  # (adaptive average pooling keeps nothing)
)


def keeps_input(module: nn.Module) -> bool:
    """True when ``module``'s backward keeps its input (torch's listed types, and zoo norms)."""
    return isinstance(module, KEEPS_INPUT) or is_norm_like(module)


@dataclass
class ModelFacts:
    """The traced regions, residual blocks and per-module call sites of one model."""

    model: nn.Module
    trace: TraceResult
    blocks: list[ResidualBlock]
    modules: dict[str, nn.Module]
    call_nodes: dict[str, list[fx.Node]] = field(default_factory=dict)
    # Linear children run only through a function their parent calls (``functional_linears``):
    # child name -> the nodes handing that function the child's weight.
    functional_nodes: dict[str, list[fx.Node]] = field(default_factory=dict)

    def call_count(self, module_name: str) -> int:
        """How many times the traced graphs call ``module_name`` (0 when untraced)."""
        return len(self.call_nodes.get(module_name, ()))

    def input_producer(self, module_name: str) -> nn.Module | None:
        """The module whose output feeds ``module_name``'s only call, if a module."""
        nodes = self.call_nodes.get(module_name, ())
        if len(nodes) != 1 or not nodes[0].args:
            return None
        source = nodes[0].args[0]
        if isinstance(source, fx.Node) and source.op == "call_module":
            return self.modules.get(qualified_name(source))
        return None

    def output_readers(self, module_name: str) -> list[fx.Node] | None:
        """The nodes that read ``module_name``'s output, seen through zero-probability dropouts.

        A dropout with ``p == 0`` hands its input on unchanged, so whatever reads
        its output reads the very same tensor. None when the module is untraced
        or called more than once.
        """
        nodes = self.call_nodes.get(module_name, ())
        if len(nodes) != 1:
            return None
        readers: list[fx.Node] = []
        pending = [(nodes[0], user) for user in nodes[0].users]
        while pending:
            source, node = pending.pop()
            module = self.modules.get(qualified_name(node)) if node.op == "call_module" else None
            if isinstance(module, nn.Dropout) and module.p == 0 and node.args[:1] == (source,):
                pending.extend((node, user) for user in node.users)
            else:
                readers.append(node)
        return readers


def qualified_name(node: fx.Node) -> str:
    """The model-root-relative name of the module a call_module node calls."""
    return node.meta["aalconvert"].qualified_name


def gather_facts(model: nn.Module, example_inputs: tuple | None = None) -> ModelFacts:
    """Trace ``model`` (largest traceable parts), find residual blocks, index call sites."""
    traced = trace_model(model, example_inputs)
    blocks: list[ResidualBlock] = []
    call_nodes: dict[str, list[fx.Node]] = {}
    functional_nodes: dict[str, list[fx.Node]] = {}
    for region in traced.regions:
        blocks.extend(find_residual_blocks(region))
        for node in region.graph_module.graph.nodes:
            if node.op == "call_module":
                call_nodes.setdefault(qualified_name(node), []).append(node)
            for name in functional_linears(region, node):
                functional_nodes.setdefault(name, []).append(node)
    return ModelFacts(
        model=model,
        trace=traced,
        blocks=blocks,
        modules=dict(model.named_modules()),
        call_nodes=call_nodes,
        functional_nodes=functional_nodes,
    )
