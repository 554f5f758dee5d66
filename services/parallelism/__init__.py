"""Parallelism services: how tensors are laid out and moved between workers."""
