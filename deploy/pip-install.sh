#!/bin/sh
# `pip install` inside the image build (deploy/Dockerfile). PIP_ARGS adds package sources (e.g. a
# loopback wheel server); CA_BUNDLE_URL names a CA bundle that pip trusts for this one command
# (for PyPI behind a TLS-inspecting proxy). The bundle is fetched to a temporary file and deleted
# before the layer is committed, so the image keeps its own trust store.
set -eu
cert=""
cleanup() { [ -z "$cert" ] || rm -f "$cert"; }
trap cleanup EXIT
if [ -n "${CA_BUNDLE_URL:-}" ]; then
    cert=$(mktemp)
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$CA_BUNDLE_URL" "$cert"
    set -- --cert "$cert" "$@"
fi
# PIP_ARGS is a list of options: split on spaces on purpose.
# shellcheck disable=SC2086
pip install --no-cache-dir --progress-bar off ${PIP_ARGS:-} "$@"
