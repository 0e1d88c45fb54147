"""Analyses of a model: activation outliers."""
