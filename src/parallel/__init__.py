"""Parallelism applied to single-device models: the mesh and, per axis, one module."""
