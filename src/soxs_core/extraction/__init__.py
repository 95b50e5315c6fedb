"""Spectrum extraction from a stare frame: sky model, object trace, optimal extraction."""
