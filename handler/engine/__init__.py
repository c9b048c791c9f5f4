"""Continuous-batching engine over a paged KV cache (the worker's in-process API).

Import from the modules (config, params, llm_engine): this package imports nothing itself, so
reading the engine's settings never pulls in torch."""
