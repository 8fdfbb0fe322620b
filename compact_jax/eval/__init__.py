"""Evaluation: greedy decoding with a KV cache (``decode``), benchmarks, metrics, by-k analysis."""
