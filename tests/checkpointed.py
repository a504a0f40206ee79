"""A module wrapper for the activation-checkpointing tests."""

from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint`` (non-reentrant unless asked), as users wrap blocks."""

    def __init__(self, inner: nn.Module, reentrant: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=self.reentrant)
