#!/bin/sh
# Entrypoint of the serving image.
#   no arguments  -> the gateway itself (load-balancer / plain HTTP mode): it binds PORT at once,
#                    answers /health and /ping, and spawns the worker. A snapshot given as
#                    s3://bucket/prefix goes through `thaw serve`, which pulls it and then execs
#                    the gateway.
#   arguments     -> run them instead; queue mode is `python -m handler.runpod_queue`
#                    (RunPod's "container start command"), which starts the gateway itself.
# `exec` keeps one process per role, so signals reach the gateway or the handler directly.
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

case "${THAW_SNAPSHOT:-}" in
    s3://*) exec thaw serve --snapshot "$THAW_SNAPSHOT" --host "${HOST:-0.0.0.0}" --port "${PORT:-8080}" ;;
    *) exec thaw-gateway ;;
esac
