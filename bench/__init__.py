"""Benchmarks and a load check. decode, serve and train each compare pocketgpt against a
reference measured in the same run (HF transformers `generate`, a plain PyTorch training
loop) and print a ratio; load drives a server with a request mix and checks it holds up."""
