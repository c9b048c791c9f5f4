"""thaw: serverless LLM inference with a fast cold start."""

__version__ = "0.1.0"
