"""COMPACT's data generator: k-capability questions about your own images.

The recipe (`recipe.py`, `prompts.py`) samples capability sets per image, asks a
vision-language model for one question needing exactly them, filters, verifies the
question *with the image*, and assembles LLaVA/COMPACT records. The engine
(`engine.py`) runs it against a backend (`backends/`: the tiny world's oracle,
Gemini, or any OpenAI-compatible server) with bounded concurrency, rate limits,
retries, budgets, a response cache and crash-safe resume. `mix.py` merges shards
and mixes the result with a LLaVA-665K-format file. Stages: `stages.py`.
"""
