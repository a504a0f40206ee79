"""Trainable layer variants: one file per technique."""
