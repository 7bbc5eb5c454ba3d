"""Benchmarks. Each compares pocketgpt against a reference measured in the same run
(HF transformers `generate`, a plain PyTorch training loop) and prints a ratio."""
