"""What a variant's ``autograd.Function`` hands back: a tensor of its own, never a view.

``F.linear`` on an input of more than two dimensions, ``torch.matmul`` on
batched operands and ``view`` calls return a view of the product they made. A
custom Function's output that is such a view cannot be modified in place
afterwards (autograd refuses: "Output 0 of ...Function is a view and is being
modified inplace"), where the plain op's output can: an ``nn.ReLU(inplace=True)``
or a ``+=`` after a layer is everyday model code.
"""

import torch


def own_output(y: torch.Tensor) -> torch.Tensor:
    """``y`` itself (same storage, sizes and strides, no copy) as a tensor that is no view."""
    return torch.ops.aten._unsafe_view(y, y.shape)
