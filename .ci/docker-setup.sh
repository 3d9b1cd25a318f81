#!/usr/bin/env bash
# Containers for CI and this machine kind: a Docker engine, a base image, the project image.
# Idempotent: every step checks first and is skipped when its result already exists. Prints what
# it did and how long each step took. Needs root for the engine and base-image steps (apt-get,
# dockerd, debootstrap), which are skipped where an engine answers and the base image exists.
#
# Environment (all optional):
#   FEDLEAK_IMAGE        the project image to build           (default fedleak:dev)
#   FEDLEAK_BASE_IMAGE   base image when a registry answers   (default python:3.11-slim)
#   FEDLEAK_LOCAL_BASE   base image bootstrapped without one  (default fedleak-base:bookworm)
#   FEDLEAK_DOCKERD_LOG  dockerd's log when this script starts it (default /var/log/fedleak-dockerd.log)
#   FEDLEAK_PIP_PORT     loopback port serving this machine's pip sources to the build
#   FEDLEAK_SKIP_BUILD=1 stop after the base image
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${FEDLEAK_IMAGE:-fedleak:dev}
BASE_IMAGE=${FEDLEAK_BASE_IMAGE:-python:3.11-slim}
LOCAL_BASE=${FEDLEAK_LOCAL_BASE:-fedleak-base:bookworm}
DOCKERD_LOG=${FEDLEAK_DOCKERD_LOG:-/var/log/fedleak-dockerd.log}
SUITE=bookworm
# The classic builder: the one docker-compose v1 and the docker Python SDK use too, so the CLI,
# compose and the tests share one layer cache (and no buildx plugin is needed).
export DOCKER_BUILDKIT=0

say() { echo "docker-setup: $*"; }
t0=$SECONDS
step_start=$SECONDS
done_step() { say "$1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }
# apt-get quietly; its errors still show (without debconf's notice that apt-utils is missing).
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null 2> >(grep -v '^debconf: delaying package configuration' >&2)
}

engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

# --- 1. the engine ------------------------------------------------------------------------
if engine_answers; then
  done_step "engine: a Docker engine already answers ($(docker version -f '{{.Server.Version}}'))"
else
  missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if ((${#missing[@]})); then
    say "engine: installing ${missing[*]} (apt-get)"
    apt-get update -qq
    apt_install "${missing[@]}"
  fi
  say "engine: starting dockerd (log: $DOCKERD_LOG)"
  # setsid: dockerd outlives this script and CI's shell; it starts its own containerd.
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 1 120); do
    engine_answers && break
    sleep 0.5
  done
  if ! engine_answers; then
    say "error: dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:" >&2
    tail -n 5 "$DOCKERD_LOG" >&2
    exit 1
  fi
  done_step "engine: dockerd $(docker version -f '{{.Server.Version}}') answers"
fi
command -v docker-compose >/dev/null || {
  apt_install docker-compose
  done_step "engine: installed docker-compose"
}

# --- 2. the base image --------------------------------------------------------------------
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

if image_exists "$BASE_IMAGE"; then
  base=$BASE_IMAGE
  done_step "base: $BASE_IMAGE is present"
elif timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  base=$BASE_IMAGE
  done_step "base: pulled $BASE_IMAGE"
elif image_exists "$LOCAL_BASE"; then
  base=$LOCAL_BASE
  done_step "base: no registry answers; using the bootstrapped $LOCAL_BASE"
else
  say "base: no registry answers (docker pull $BASE_IMAGE failed); bootstrapping $LOCAL_BASE"
  command -v debootstrap >/dev/null || { apt-get update -qq && apt_install debootstrap; }
  # The host's own Debian mirror (it answers, or apt-get above would have failed).
  mirror=$(grep -hoE '^URIs: *http[^ ]*/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    head -n1 | sed 's/^URIs: *//')
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d /var/tmp/fedleak-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  # passwd: useradd for the image's non-root user (minbase has only the essential packages).
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
    say "error: debootstrap failed; last lines of $root.log:" >&2
    tail -n 5 "$root.log" >&2
    exit 1
  }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$LOCAL_BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  base=$LOCAL_BASE
  done_step "base: bootstrapped $LOCAL_BASE from $mirror ($SUITE, python3 $(
    docker run --rm "$LOCAL_BASE" python3 -c 'import platform; print(platform.python_version())'
  ))"
fi

[[ ${FEDLEAK_SKIP_BUILD:-0} == 1 ]] && { say "done in $((SECONDS - t0)) s (build skipped)"; exit 0; }

# --- 3. the project image -----------------------------------------------------------------
# This machine's pip sources (find-links, file:// indexes, the CA bundle PyPI needs) served on
# loopback for the build, which runs with --network host to reach them.
port=${FEDLEAK_PIP_PORT:-38451}
mapfile -t pip_args < <(python3 .ci/pip_sources.py build-args --port "$port")
port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
if ((${#pip_args[@]})); then
  if port_answers; then  # else the build would fetch from whatever listens there
    say "error: 127.0.0.1:$port is taken; set FEDLEAK_PIP_PORT to a free port" >&2
    exit 1
  fi
  python3 .ci/pip_sources.py serve --port "$port" &
  server=$!
  trap 'kill "$server" 2>/dev/null || true' EXIT
  for _ in $(seq 1 50); do
    port_answers && break
    sleep 0.2
  done
fi
say "image: building $IMAGE from $base"
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
docker build --network host --force-rm -f deploy/Dockerfile -t "$IMAGE" \
  --build-arg "BASE_IMAGE=$base" "${pip_args[@]}" . >/var/tmp/fedleak-image-build.log 2>&1 || {
  say "error: docker build failed; last lines of /var/tmp/fedleak-image-build.log:" >&2
  tail -n 15 /var/tmp/fedleak-image-build.log >&2
  exit 1
}
cached=$(grep -c "Using cache" /var/tmp/fedleak-image-build.log || true)
# The image the tag moved away from: only its own top layers (the source) are freed; a
# container that still uses it keeps it.
if [[ -n $previous && $previous != $(docker image inspect -f '{{.Id}}' "$IMAGE") ]]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
done_step "image: built $IMAGE ($((size / 1000000)) MB, $cached steps from cache)"
say "done in $((SECONDS - t0)) s"
