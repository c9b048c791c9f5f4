#!/usr/bin/env bash
# A Docker engine and local stand-ins for the Dockerfile's base images, for the image tests
# (tests/image/test_image.py). No image registry is needed: the bases are made from a debootstrapped
# Debian bookworm, and the real Dockerfile is built against them through its *_BASE build args.
#   usage: image_env.sh start   install docker.io/debootstrap when missing (apt), start dockerd
#                               when no engine answers, make the stand-in bases when missing
#          image_env.sh stop    stop the dockerd that `start` started (its pidfile), nothing else
#          image_env.sh prune [AGE]  drop the build layers not used for AGE (default 1h; the
#                               tests pass their own duration) and untagged images: each run with
#                               new code leaves a snapshot stage and runtime layers behind. Cache
#                               mounts (pip's and cargo's caches) are kept.
#          image_env.sh docker  print the docker client to use
#   env THAW_IMAGE_STATE   where the pidfile, the daemon's log and the debootstrap tree live
#                          (default .cache/image)
# Stand-ins (tags), each made only when missing:
#   thaw-test/debian:bookworm    debootstrap --variant=minbase, imported
#   thaw-test/rust:bookworm      + gcc, libc6-dev and this machine's Rust toolchain (for rust:1-bookworm)
#   thaw-test/cuda-cpu:bookworm  + python3, and a user "ubuntu" with uid 1000 as in the Ubuntu 24.04
#                                bases nvidia/cuda builds on (for nvidia/cuda:*-{runtime,devel}-*)
set -euo pipefail
cd "$(dirname "$0")/.."
state=${THAW_IMAGE_STATE:-$PWD/.cache/image}
pidfile=$state/dockerd.pid
mkdir -p "$state"

log() { echo "image_env: $*" >&2; }

# Debian's own client: it carries the classic `docker build` with BuildKit, while another docker
# on PATH may be a newer client that needs the buildx plugin for the same.
docker_client() {
    if [[ -n ${THAW_DOCKER:-} ]]; then echo "$THAW_DOCKER"
    elif [[ -x /usr/bin/docker ]]; then echo /usr/bin/docker
    else command -v docker || echo docker
    fi
}

engine_answers() { "$(docker_client)" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]} (apt)"
    if [[ $(id -u) != 0 ]]; then
        log "not root: install ${missing[*]} yourself"
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        >"$state/apt.log" 2>&1 || {
        # A fresh machine may not have package lists yet.
        apt-get update >>"$state/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
            >>"$state/apt.log" 2>&1 || { tail -20 "$state/apt.log" >&2; exit 1; }
    }
}

start_engine() {
    if engine_answers; then return; fi
    if [[ $(id -u) != 0 ]]; then
        log "no Docker engine answers and only root can start one"
        exit 1
    fi
    if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
    log "starting dockerd (log: $state/dockerd.log)"
    # setsid: the daemon outlives this script and is not in the caller's process group.
    setsid dockerd --pidfile "$pidfile" >"$state/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 300); do
        if engine_answers; then return; fi
        sleep 0.1
    done
    tail -30 "$state/dockerd.log" >&2
    log "dockerd did not answer within 30 s"
    exit 1
}

stop_engine() {
    [[ -f $pidfile ]] || return 0
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd $pid"
        kill -TERM "$pid"
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}

have_image() { "$(docker_client)" image inspect "$1" >/dev/null 2>&1; }

# The host's CA bundle and proxy settings, for builds behind a TLS-intercepting proxy.
build_args() {
    local var
    for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        if [[ -n ${!var:-} ]]; then printf -- '--build-arg\n%s\n' "$var=${!var}"; fi
    done
    if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
        printf -- '--secret\nid=ca,src=/etc/ssl/certs/ca-certificates.crt\n'
    fi
}

make_bases() {
    local docker; docker=$(docker_client)
    local -a extra; mapfile -t extra < <(build_args)
    export DOCKER_BUILDKIT=1
    if ! have_image thaw-test/debian:bookworm; then
        log "debootstrap Debian bookworm (minbase) into $state/rootfs"
        rm -rf "$state/rootfs"
        debootstrap --variant=minbase bookworm "$state/rootfs" http://deb.debian.org/debian \
            >"$state/debootstrap.log" 2>&1 || { tail -20 "$state/debootstrap.log" >&2; exit 1; }
        rm -rf "$state/rootfs/var/cache/apt/archives/"*.deb "$state/rootfs/var/lib/apt/lists/"*
        tar -C "$state/rootfs" -c . | "$docker" import - thaw-test/debian:bookworm >/dev/null
        rm -rf "$state/rootfs"
    fi
    if ! have_image thaw-test/cuda-cpu:bookworm; then
        log "making thaw-test/cuda-cpu:bookworm"
        "$docker" build -q "${extra[@]}" -t thaw-test/cuda-cpu:bookworm - >/dev/null <<'EOF'
FROM thaw-test/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home ubuntu
EOF
    fi
    if ! have_image thaw-test/rust:bookworm; then
        local toolchain
        toolchain=$(dirname "$(dirname "$(rustup which rustc 2>/dev/null || command -v rustc)")")
        log "making thaw-test/rust:bookworm with the toolchain in $toolchain"
        # Only bin/ and lib/ (the compiler, cargo, the x86_64 standard library): not the docs.
        "$docker" build -q "${extra[@]}" -t thaw-test/rust:bookworm -f - "$toolchain" >/dev/null <<'EOF'
FROM thaw-test/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY bin /usr/local/rust/bin
COPY lib /usr/local/rust/lib
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:$PATH
EOF
    fi
}

case "${1:-}" in
    start)
        install_packages
        start_engine
        make_bases
        ;;
    stop) stop_engine ;;
    prune)
        docker=$(docker_client)
        "$docker" builder prune -f --filter "until=${2:-1h}" --filter type=regular >/dev/null
        "$docker" image prune -f >/dev/null
        ;;
    docker) docker_client ;;
    build-args) build_args ;;
    *)
        echo "usage: image_env.sh start|stop|prune|docker|build-args" >&2
        exit 2
        ;;
esac
