"""The last reach of the exact and approx rules: whatever else torch's ops save in the model.

One site on the model's root (``aalconvert.nn.saved_pack``): while the root's
forward runs, every mask an op saves is kept in 1 bit (exact rule), and under
an approx rule every large activation as a k-bit copy too, unless a converted variant saved it (its own decision: an ARA
anchor, a recompute chain's input, a loss head's hidden states) or it was saved
inside a module the user named in ``skip=``. Attention written with
``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention``, Hugging Face
attention, layer scale and other functional ops are reached this way, by any
caller.

Only a call of the root packs: a submodule called directly runs as BP does.
Under torch.compile the hooks stand aside (Dynamo traces module hooks, and the
saved-tensor hooks would be pushed at trace time, not at run time), so a
compiled model keeps what its leaf variants keep and no more.
"""

import itertools
import threading

import torch
from torch import nn

from aalconvert.facts import ModelFacts
from aalconvert.memory import tensors_in
from aalconvert.nn import CONVERTED_TYPES
from aalconvert.nn.approx_common import ApproxOptions, functorch_active
from aalconvert.nn.lossless import MASK_ACTIVATIONS, CompactMaxPool2d, MaskDropout
from aalconvert.nn.routed_linear import RoutedLinears
from aalconvert.nn.saved_pack import SavedTensorPacker
from aalconvert.nn.traced_forward import TracedForwardVariant
from aalconvert.rules.base import COVERS, SKIPPED, Site, Skip
from aalconvert.rules.wiring import _PerThread, _Wiring, wiring_of

PAYLOAD_KEY = "saved_pack"
# Variants that need no pass-through: traced and routed forwards are the user's code (their own
# calls save what they decide, the rest is packed), and mask variants save bits only. No hook of the packer
# then sits on a dropout that a fused attention core must find hook-free.
_NOTHING_TO_KEEP = (TracedForwardVariant, RoutedLinears, *MASK_ACTIVATIONS.values(), MaskDropout, CompactMaxPool2d)


class SavedPackScope(_Wiring):
    """Starts the packer when the root's forward starts and stops it when it ends (also on error).

    Converted variants and the modules in ``skipped`` get hooks that make the
    packer pass their saves through; they are found at the first packed
    forward, when every site of the conversion has been applied.
    """

    def __init__(self, options: ApproxOptions | None, skipped: tuple[str, ...]) -> None:
        self.packer = SavedTensorPacker(options)
        self.skipped = skipped
        self.handles = []
        self.state = _PerThread()
        self._armed = False
        self._arming = threading.Lock()

    def wire(self, root: nn.Module) -> None:
        self.handles.append(root.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.handles.append(root.register_forward_hook(self._end, always_call=True))

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            return
        packing = torch.is_grad_enabled() and not functorch_active()  # transforms: plain torch
        self._calls().append(packing)
        if packing:
            self._arm(module)
            self.packer.begin(itertools.chain(
                module.parameters(), module.buffers(), tensors_in(args), tensors_in(kwargs)))

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        calls = self._calls()
        if calls and calls.pop():
            self.packer.end()

    def _calls(self) -> list[bool]:
        """This thread's open root calls, each with whether it packs (grad mode was on)."""
        state = self.state.get()
        if not hasattr(state, "calls"):
            state.calls = []
        return state.calls

    def _arm(self, root: nn.Module) -> None:
        if self._armed:
            return
        with self._arming:
            if self._armed:
                return
            for name, module in root.named_modules():
                own_saves = isinstance(module, CONVERTED_TYPES) and not isinstance(module, _NOTHING_TO_KEEP)
                if own_saves or name in self.skipped:
                    self.handles.append(module.register_forward_pre_hook(self._keep))
                    self.handles.append(module.register_forward_hook(self._keep_end, always_call=True))
            self._armed = True

    def _keep(self, module: nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            self.packer.keep()

    def _keep_end(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.compiler.is_compiling():
            self.packer.end()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_arming": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arming = threading.Lock()


def saved_pack_site(
    facts: ModelFacts, rule: str, bits: int | None, claimed: set[str]
) -> tuple[list[Site], list[Skip]]:
    """The root site that packs what no other site keeps (``bits`` None: only what 1 bit holds
    exactly), or why there is none."""
    if "" in claimed:
        return [], [Skip(rule, "", "the root module is converted itself; nothing wraps its forward")]
    if any(isinstance(owner, SavedPackScope) for owner in wiring_of(facts.model)):
        return [], [Skip(rule, "", "an earlier conversion already packs what the model's ops save")]
    if bits is None:
        covers = (f"masks its ops save are kept in 1 bit and dropped attention probabilities rebuilt, "
                  f"exact ({rule} on <root>)")
        reason = ("keeps every mask torch's ops save in the model (dropout, masked_fill, where) in 1 bit: "
                  "bool masks and 0-or-one-value tensors, and rebuilds in backward a saved product of "
                  "tensors kept anyway (softmax output times dropout noise), exact (saved-tensor hooks)")
    else:
        covers = f"its ops' saved activations are kept as {bits}-bit copies ({rule} on <root>)"
        reason = (
            f"keeps {bits}-bit copies of every other activation torch's ops save in the model "
            "(functional attention, SDPA, norms and functional ops: saved-tensor hooks), masks in 1 bit"
        )
    return [Site(rule, "", reason, payload={PAYLOAD_KEY: True, COVERS: covers})], []


def apply_saved_pack_site(model: nn.Module, site: Site, options: ApproxOptions | None) -> nn.Module:
    """Wire the packer's hooks on the root (nothing is swapped)."""
    SavedPackScope(options, tuple(site.payload.get(SKIPPED, ()))).wire(model)
    return model
