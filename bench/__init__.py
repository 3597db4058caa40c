"""Benchmarks, sample images and the demo."""
