"""Benchmarks: the packed runner against hand-written nested loops and the compute limit."""
