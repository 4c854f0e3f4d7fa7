"""Benchmarks of training speed and memory, run as `python -m gptjax.bench`; product code never
imports this package."""
