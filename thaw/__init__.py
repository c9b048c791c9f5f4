"""thaw: serverless LLM inference with a fast cold start (version: pyproject.toml)."""
