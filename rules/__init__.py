"""Conversion rules: one file per rule, plus the Rule interface and the registry."""

from aalconvert.rules.base import Rule, Site, Skip
from aalconvert.rules.registry import available

__all__ = ["Rule", "Site", "Skip", "available"]
