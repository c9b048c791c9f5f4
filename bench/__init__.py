"""Benchmarks: each prints thaw's figure beside its peer's, measured in the same run."""
