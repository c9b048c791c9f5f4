"""Fused CPU kernels for the bfloat16 serving path, compiled from C by the system compiler.

build.py compiles cpu_kernels.c and cpu_gemm.c (run by scripts/setup.sh); cpu.py loads and
binds them.
"""
