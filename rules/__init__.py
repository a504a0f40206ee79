"""Conversion rules: one file per rule, plus the Rule interface and the registry."""
