"""Serves checkpoints over HTTP: continuous batching, SSE streaming, Prometheus metrics."""
