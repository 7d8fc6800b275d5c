"""Triton kernels of our own (imported by their modules, not here: they need triton and fla)."""
