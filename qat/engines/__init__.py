"""Inference engines, one adapter file each, all built from the canonical integer model."""
