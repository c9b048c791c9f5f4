# The thaw serving image (docs/deploy.md).
#
#   docker build -t thaw .                                   # snapshot given at run time
#   docker build -t thaw --build-arg SNAPSHOT=default .      # bake in SmolLM2-135M-Instruct
#   docker build -t thaw --build-arg SNAPSHOT=s3://bucket/prefix \
#       --secret id=aws,src=$HOME/.aws/credentials .         # bake in a snapshot from S3
#   docker build -t thaw --build-arg FLASH_ATTN=1 --build-arg WORKER_BUILD_FLAVOR=devel .
#
# Behind a TLS-intercepting proxy, give the build the host's CA bundle (used by apt, pip and cargo
# for those steps only, never stored in a layer) and the proxy (Docker's predefined build args):
#   docker build -t thaw --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg HTTPS_PROXY=$HTTPS_PROXY .
# No `# syntax=` line: the daemon's built-in Dockerfile frontend builds it, with no frontend image
# to fetch.
#
# Run: the default command is the gateway (load-balancer / plain HTTP mode, port 8080); it needs
# an API key (or an explicit opt-out, see ENV below):
#   docker run --gpus all -p 8080:8080 -e THAW_API_KEY=... thaw
# RunPod queue mode overrides the command:
#   docker run --gpus all thaw python -m handler.runpod_queue
#
# Every build step is a script in scripts/ that the tests also run (tests/image/test_docker_scripts.py).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
# "runtime" is enough for PyPI's torch (it brings its own CUDA libraries); flash-attn compiles
# with nvcc and needs "devel" here. Only the venv leaves this stage, never the toolkit.
ARG WORKER_BUILD_FLAVOR=runtime
# The base images. Only the tests (scripts/image_env.sh) set them, to local stand-ins.
ARG GATEWAY_BASE=rust:1-bookworm
ARG WORKER_BUILD_BASE=nvidia/cuda:${CUDA_VERSION}-${WORKER_BUILD_FLAVOR}-${UBUNTU}
ARG RUNTIME_BASE=nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}

# ---------------------------------------------------------------- gateway: one static binary
FROM ${GATEWAY_BASE} AS gateway
WORKDIR /src
COPY rust_gateway/ rust_gateway/
COPY scripts/build_gateway.sh scripts/docker_build_gateway.sh scripts/docker_ca_env.sh scripts/
# Cache mounts: crates and build artifacts outlive the layer, so a Rust change rebuilds little.
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/rust_gateway/target \
    . scripts/docker_ca_env.sh && bash scripts/docker_build_gateway.sh /out

# ------------------------ worker-deps: the Python environment's dependencies, in /opt/thaw/venv
FROM ${WORKER_BUILD_BASE} AS worker-deps
ARG FLASH_ATTN=0
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=scripts/docker_ca_env.sh,target=/run/thaw-ca-env.sh \
    . /run/thaw-ca-env.sh && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from the requirements alone: the torch layer stays cached while the code
# changes.
COPY requirements/ requirements/
COPY scripts/docker_install_worker.sh scripts/docker_ca_env.sh scripts/
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    . scripts/docker_ca_env.sh \
    && THAW_INSTALL_STEP=deps FLASH_ATTN=${FLASH_ATTN} bash scripts/docker_install_worker.sh

# ------------------------------------------------ worker-build: this package, into that venv
FROM worker-deps AS worker-build
COPY pyproject.toml ./
COPY thaw/ thaw/
COPY handler/ handler/
COPY snapshot/ snapshot/
COPY warmup/ warmup/
COPY bench/ bench/
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    . scripts/docker_ca_env.sh && THAW_INSTALL_STEP=package bash scripts/docker_install_worker.sh \
    && /opt/thaw/venv/bin/python -m pip install --quiet --no-deps --no-compile --ignore-installed \
        --root /opt/thaw-package . \
    && /opt/thaw/venv/bin/python -m compileall -q -s /opt/thaw-package /opt/thaw-package

# ------------------------------------- snapshot: optionally baked in (build-only packages here)
FROM worker-build AS snapshot
ARG SNAPSHOT=none
COPY scripts/docker_bake_snapshot.sh scripts/
RUN --mount=type=secret,id=aws,target=/root/.aws/credentials,required=false \
    --mount=type=secret,id=ca,required=false \
    --mount=type=cache,target=/root/.cache/pip \
    . scripts/docker_ca_env.sh && bash scripts/docker_bake_snapshot.sh "${SNAPSHOT}" /snapshot

# ------------------------------------------------------------------ runtime: what gets shipped
FROM ${RUNTIME_BASE} AS runtime
# gcc, libc6-dev and the Python headers: on a GPU, Triton compiles its small launcher module
# (a C extension) on first use. curl: the HEALTHCHECK. Ubuntu 24.04 bases already have a user
# "ubuntu" with uid 1000, which thaw takes over.
RUN --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=scripts/docker_ca_env.sh,target=/run/thaw-ca-env.sh \
    . /run/thaw-ca-env.sh && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev curl \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin thaw
COPY --from=gateway /out/thaw-gateway /usr/local/bin/thaw-gateway
# The venv's dependencies; this package's files alone come last (the same install, staged under
# /opt/thaw-package by `pip --root`), so that a code change ships one small layer, not the venv.
COPY --from=worker-deps /opt/thaw /opt/thaw
COPY --from=snapshot --chown=thaw:thaw /snapshot /snapshot
COPY scripts/docker_entrypoint.sh /usr/local/bin/thaw-entrypoint
COPY --from=worker-build /opt/thaw-package/ /

# HOST=0.0.0.0: reachable from outside the container, so the gateway starts only with an API key
# (-e THAW_API_KEY=...) or, behind a proxy that authenticates every caller (RunPod's), with
# -e THAW_ALLOW_UNAUTHENTICATED=true; without either it exits with a message saying so. The image
# sets neither: an unauthenticated endpoint must be a choice (`thaw deploy` makes it for RunPod
# load-balancer endpoints).
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
