"""Take the saved-tensor packer off a converted model's root, for tests that measure one variant.

The packer (``rules/saved_pack.py``) also packs what a plain module saves, so a
test comparing a variant with the plain module it replaced removes it first;
``tests/test_saved_pack.py`` checks the packer itself.
"""

from torch import nn

from aalconvert.rules.saved_pack import SavedPackScope
from aalconvert.rules.wiring import wiring_of


def without_root_packer(model: nn.Module) -> nn.Module:
    """``model`` with its root's saved-tensor packer removed (in place)."""
    for owner in wiring_of(model):
        if isinstance(owner, SavedPackScope):
            owner.remove()
    return model
