"""thaw test suite (pytest)."""
