"""``nn.MultiheadAttention`` whose in-projection rebuilds its input from the chain before it.

torchvision's ViT calls ``self_attention(x, x, x)`` on ``x = ln_1(input)``.
``F.multi_head_attention_forward`` projects ``x`` with a functional ``linear``
on the module's ``in_proj_weight``, so no leaf swap reaches it, and that
``linear`` keeps its input for the weight gradient: ``x`` itself (a view),
or, for ``batch_first`` modules, a contiguous copy of ``x.transpose(1, 0)``
made by ``matmul``'s reshape. The LayerNorm keeps its own input ``z`` anyway,
so that copy is one more tensor of the block's width per layer.

``RecomputedInputMultiheadAttention`` runs torch's own forward unchanged
inside a saved-tensor hook that recognises that one save -- a tensor over
``x``'s storage, or the contiguous copy of a transpose of ``x`` (checked on the
autograd nodes between them, which also works on fake tensors) -- and keeps
``z`` instead (no memory: the chain start keeps it) with a note of how to get
the saved tensor back: in backward the chain runs again on ``z`` (the same ops
on the same values: bit-identical, ``recompute._ChainRecord``) and the same
view or transposed copy is taken. Every other save passes to the hooks active
outside (the model's mask packer, a memory measurement, checkpointing)
untouched. Autograd's graph is torch's own, so gradients and their summation
order are BP's.

``chain_input`` / ``chain_output`` arrive as keywords from the chain wiring
(``rules.wiring.ChainSlot``), as for the other recompute layers. Without them,
when query, key and value are not the very chain output, under torch.compile
or functorch, the module is plain ``nn.MultiheadAttention``.
"""

from typing import Any

import torch
from torch import nn

from aalconvert.errors import ConversionError
from aalconvert.memory import storage_key
from aalconvert.nn.approx_common import functorch_active
from aalconvert.nn.rebuild import rebuild_as
from aalconvert.nn.recompute import _ChainRecord, chain_rebuildable, with_chain

_COPY_PATH = ("UnsafeViewBackward0", "CloneBackward0", "TransposeBackward0")  # matmul's reshape of x.T


class _Rebuilt:
    """A saved tensor given back as ``how`` applied to the chain rebuilt from ``z``."""

    def __init__(self, z: Any, outer: Any, record: _ChainRecord, how: tuple) -> None:
        self.z, self.outer, self.record, self.how = z, outer, record, how

    def unpack(self) -> torch.Tensor:
        z = self.z if self.outer is None else self.outer[1](self.z)
        x = self.record.rebuild(z, "RecomputedInputMultiheadAttention")
        if self.how[0] == "view":
            _, size, stride, offset = self.how
            return x.as_strided(size, stride, x.storage_offset() + offset)
        _, dim0, dim1, size = self.how
        return x.transpose(dim0, dim1).reshape(size)


class _PassedOn:
    def __init__(self, packed: Any, unpack_hook: Any) -> None:
        self.packed, self.unpack_hook = packed, unpack_hook

    def unpack(self) -> torch.Tensor:
        return self.unpack_hook(self.packed)


class _InProjectionHooks:
    """The saved-tensor hooks of one forward: ``x``'s in-projection save becomes a rebuild note."""

    def __init__(self, x: torch.Tensor, z: torch.Tensor, record: _ChainRecord) -> None:
        self.x, self.z, self.record = x, z, record
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def _how(self, t: torch.Tensor) -> tuple | None:
        x = self.x
        if t.dtype != x.dtype or t.device != x.device or t._version != x._version:
            return None
        if storage_key(t.untyped_storage()) == storage_key(x.untyped_storage()):
            # a view of x (same storage, unchanged since): the rebuilt x has x's layout
            return ("view", tuple(t.shape), tuple(t.stride()), t.storage_offset() - x.storage_offset())
        node = t.grad_fn
        if node is None or t.numel() != x.numel() or not t.is_contiguous():
            return None
        path = []
        while node is not None and node is not x.grad_fn and len(path) < len(_COPY_PATH):
            path.append(node)
            node = node.next_functions[0][0] if node.next_functions else None
        if node is not x.grad_fn or tuple(n.name() for n in path) != _COPY_PATH:
            return None
        transpose = path[-1]
        dim0, dim1 = transpose._saved_dim0, transpose._saved_dim1
        return ("copy", dim0, dim1, tuple(t.shape))

    def pack(self, t: torch.Tensor) -> Any:
        how = self._how(t)
        if how is not None:
            z = self.z  # kept with its graph, as BP keeps x: backward with create_graph differentiates it
            return _Rebuilt(z if self.outer is None else self.outer[0](z), self.outer, self.record, how)
        if self.outer is None:
            return t
        return _PassedOn(self.outer[0](t), self.outer[1])

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()


class RecomputedInputMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` keeping its chain's input instead of its in-projection's input."""

    chain: tuple[nn.Module, ...] = ()

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, chain: tuple[nn.Module, ...] = ()
                    ) -> "RecomputedInputMultiheadAttention":
        """Build from a plain ``nn.MultiheadAttention`` sharing its Parameters; ``chain``: the
        norm/activation modules that turn the chain input into query = key = value."""
        if type(module) is not nn.MultiheadAttention:
            raise ConversionError(
                f"{cls.__name__}.from_module expects an nn.MultiheadAttention, got {type(module).__name__}"
            )
        return with_chain(cls, module, chain)

    def to_module(self) -> nn.MultiheadAttention:
        """The plain module with the same Parameter objects (the chain is dropped)."""
        return rebuild_as(nn.MultiheadAttention, self, drop=("chain",))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                chain_input: torch.Tensor | None = None, chain_output: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        plain = nn.MultiheadAttention.forward
        if (
            chain_input is None
            or chain_output is None
            or not (query is chain_output and key is query and value is query)
            or not self.chain
            or not chain_rebuildable(self.chain)
            or not torch.is_grad_enabled()
            or self.in_proj_weight is None
            or not self.in_proj_weight.requires_grad
            or torch.compiler.is_compiling()
            or functorch_active(query, chain_input)
            or any(p.device != query.device for m in self.chain for p in m.parameters())
        ):
            return plain(self, query, key, value, *args, **kwargs)
        hooks = _InProjectionHooks(query, chain_input, _ChainRecord(self.chain, query))
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return plain(self, query, key, value, *args, **kwargs)

    def extra_repr(self) -> str:
        chain = " -> ".join(type(module).__name__ for module in self.chain) or "unset"
        return f"rebuilds the in-projection's input from chain={chain}"
