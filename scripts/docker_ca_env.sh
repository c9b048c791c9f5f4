#!/bin/sh
# Docker build helper, sourced by the RUN steps that reach the network (apt, pip, cargo):
#   RUN --mount=type=secret,id=ca,required=false \
#       --mount=type=bind,source=scripts/docker_ca_env.sh,target=/run/thaw-ca-env.sh \
#       . /run/thaw-ca-env.sh && apt-get update && ...
# With `docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt` (a host behind a
# TLS-intercepting proxy) those tools trust that bundle for this step only: a secret mount never
# reaches a layer. Without the secret it changes nothing. The proxy itself comes in through
# Docker's predefined build args (--build-arg HTTPS_PROXY=...).
#   env THAW_CA_SECRET   where the bundle is mounted (default /run/secrets/ca)
thaw_ca=${THAW_CA_SECRET:-/run/secrets/ca}
if [ -s "$thaw_ca" ]; then
    export PIP_CERT="$thaw_ca" REQUESTS_CA_BUNDLE="$thaw_ca" SSL_CERT_FILE="$thaw_ca" \
        CURL_CA_BUNDLE="$thaw_ca" CARGO_HTTP_CAINFO="$thaw_ca" AWS_CA_BUNDLE="$thaw_ca"
    # apt reads no CA variable: a config file of its own, in memory (/dev/shm) so that no layer
    # keeps it.
    APT_CONFIG=$(mktemp /dev/shm/thaw-apt.XXXXXX 2>/dev/null || mktemp)
    printf 'Acquire::https::CAInfo "%s";\n' "$thaw_ca" >"$APT_CONFIG"
    export APT_CONFIG
fi
unset thaw_ca
