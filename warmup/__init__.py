"""Start-up work on the GPU: KV-cache sizing, CUDA-graph capture, and the warm profile that lets
the next cold start on the same GPU kind skip the measuring."""
