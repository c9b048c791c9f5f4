# syntax=docker/dockerfile:1.7
# The thaw serving image (docs/deploy.md).
#
#   docker build -t thaw .                                   # snapshot given at run time
#   docker build -t thaw --build-arg SNAPSHOT=default .      # bake in SmolLM2-135M-Instruct
#   docker build -t thaw --build-arg SNAPSHOT=s3://bucket/prefix \
#       --secret id=aws,src=$HOME/.aws/credentials .         # bake in a snapshot from S3
#   docker build -t thaw --build-arg FLASH_ATTN=1 --build-arg WORKER_BUILD_FLAVOR=devel .
#
# Run: the default command is the gateway (load-balancer / plain HTTP mode, port 8080);
#   docker run --gpus all -p 8080:8080 thaw
# RunPod queue mode overrides the command:
#   docker run --gpus all thaw python -m handler.runpod_queue
#
# Every build step is a script in scripts/ that the tests also run (tests/image/test_docker_scripts.py).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
# "runtime" is enough for PyPI's torch (it brings its own CUDA libraries); flash-attn compiles
# with nvcc and needs "devel" here. Only the venv leaves this stage, never the toolkit.
ARG WORKER_BUILD_FLAVOR=runtime

# ---------------------------------------------------------------- gateway: one static binary
FROM rust:1-bookworm AS gateway
WORKDIR /src
COPY rust_gateway/ rust_gateway/
COPY scripts/build_gateway.sh scripts/docker_build_gateway.sh scripts/
RUN bash scripts/docker_build_gateway.sh /out

# ------------------------------------------- worker-build: the Python environment, in /opt/thaw
FROM nvidia/cuda:${CUDA_VERSION}-${WORKER_BUILD_FLAVOR}-${UBUNTU} AS worker-build
ARG FLASH_ATTN=0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first: the torch layer stays cached while the code changes.
COPY requirements/ requirements/
COPY pyproject.toml ./
COPY scripts/docker_install_worker.sh scripts/
COPY thaw/ thaw/
COPY handler/ handler/
COPY snapshot/ snapshot/
COPY warmup/ warmup/
COPY bench/ bench/
RUN --mount=type=cache,target=/root/.cache/pip \
    FLASH_ATTN=${FLASH_ATTN} bash scripts/docker_install_worker.sh

# ------------------------------------- snapshot: optionally baked in (build-only packages here)
FROM worker-build AS snapshot
ARG SNAPSHOT=none
COPY scripts/docker_bake_snapshot.sh scripts/
RUN --mount=type=secret,id=aws,target=/root/.aws/credentials,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    bash scripts/docker_bake_snapshot.sh "${SNAPSHOT}" /snapshot

# ------------------------------------------------------------------ runtime: what gets shipped
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
# gcc and the Python headers: Triton compiles its small launcher module on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin thaw
COPY --from=gateway /out/thaw-gateway /usr/local/bin/thaw-gateway
COPY --from=worker-build /opt/thaw /opt/thaw
COPY --from=snapshot --chown=thaw:thaw /snapshot /snapshot
COPY scripts/docker_entrypoint.sh /usr/local/bin/thaw-entrypoint

ENV PATH=/opt/thaw/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    THAW_SNAPSHOT=/snapshot \
    THAW_GATEWAY_BIN=/usr/local/bin/thaw-gateway \
    THAW_WORKER_CMD="/opt/thaw/venv/bin/python -m handler.worker" \
    THAW_SNAPSHOT_CACHE=/home/thaw/.cache/thaw/snapshot \
    TRITON_CACHE_DIR=/home/thaw/.cache/triton

USER thaw
WORKDIR /home/thaw
EXPOSE 8080
# /health answers as soon as the gateway has bound its port (both modes run the gateway).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
ENTRYPOINT ["/usr/local/bin/thaw-entrypoint"]
CMD []
