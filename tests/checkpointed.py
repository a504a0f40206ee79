"""A module wrapper for the activation-checkpointing tests."""

from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint`` (non-reentrant), as users wrap blocks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)
