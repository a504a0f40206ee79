"""Functional forms of aalconvert's variants, for code that calls ops rather than modules.

``aalconvert.nn.functional`` mirrors ``torch.nn.functional``: the same computation as a torch
functional op with less kept for backward. Rules that rewrite a model's forward (the loss head of
a Hugging Face causal LM) call these.
"""

from aalconvert.nn.linear_cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
