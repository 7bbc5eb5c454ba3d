#!/usr/bin/env bash
# Build local stand-ins for the base images that docker-compose.yml and the
# Dockerfile name, for machines that cannot reach Docker Hub (CI here):
#
#   debian:bookworm            debootstrap --variant=minbase rootfs, `docker import`ed
#   python:3.11-slim           Debian's python3 (3.11) + venv + pip, `python` symlink
#   prom/prometheus:<tag>      Debian's prometheus package, entrypoint /usr/bin/prometheus
#
# The host's apt sources/config, CA certificates (including locally added ones:
# registry traffic may pass a TLS-inspecting proxy) and system pip configuration
# are copied into the rootfs at build time. Nothing host-specific is stored in
# the repository. On a machine that can pull from Docker Hub, skip this script:
# the real images are used instead.
#
# Usage: deploy/build-base-images.sh [--force]
#   Images that already exist are kept unless --force is given.
# Env:   DOCKER (default /usr/bin/docker if present, else docker)
#        PROMETHEUS_IMAGE (default: the image named in docker-compose.yml)
#        DEBIAN_MIRROR (default: first URIs/deb line of the host's apt sources)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
if [[ -z "${DOCKER:-}" ]]; then
    if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
force=0
[[ "${1:-}" == "--force" ]] && force=1

if [[ -z "${PROMETHEUS_IMAGE:-}" ]]; then
    PROMETHEUS_IMAGE="$(sed -n 's/^[[:space:]]*image:[[:space:]]*\(prom\/prometheus:[^[:space:]]*\).*/\1/p' \
        "$repo/docker-compose.yml" | head -n1)"
fi
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-prom/prometheus:latest}"

log() { printf '[base-images] %s\n' "$*" >&2; }
have_image() { [[ "$force" == 0 ]] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

detect_mirror() {
    local m=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        m="$(awk 'tolower($1)=="uris:" {print $2; exit}' /etc/apt/sources.list.d/*.sources)"
    fi
    if [[ -z "$m" && -f /etc/apt/sources.list ]]; then
        m="$(awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit} }' /etc/apt/sources.list)"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

build_debian() {
    if have_image debian:bookworm; then log "debian:bookworm exists"; return; fi
    command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
    local mirror work rootfs
    mirror="${DEBIAN_MIRROR:-$(detect_mirror)}"
    work="$(mktemp -d /tmp/pocketgpt-rootfs.XXXXXX)"
    rootfs="$work/rootfs"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

    # apt: the host's sources and configuration (only enabled *.sources / *.list files).
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null || \
       compgen -G "/etc/apt/sources.list.d/*.list" >/dev/null; then
        rm -f "$rootfs/etc/apt/sources.list"
        for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
            [[ -f "$f" ]] || continue
            # Only Debian's own archives: third-party repos need keyrings we don't copy.
            grep -qE 'debian\.org|debian-archive-keyring' "$f" && cp "$f" "$rootfs/etc/apt/sources.list.d/"
        done
    fi
    [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$rootfs/etc/apt/sources.list"
    [[ -f /etc/apt/apt.conf ]] && cp /etc/apt/apt.conf "$rootfs/etc/apt/apt.conf"
    if [[ -d /etc/apt/apt.conf.d ]]; then
        cp -a /etc/apt/apt.conf.d/. "$rootfs/etc/apt/apt.conf.d/"
    fi
    # No daemons start during image builds (as in the official images' build scripts).
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"

    # CA certificates: the bundle, and locally added ones so that a later
    # update-ca-certificates (ca-certificates postinst) keeps them.
    mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/local/share/ca-certificates"
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] && \
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    if [[ -d /usr/local/share/ca-certificates ]]; then
        cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
    fi

    # pip: the system-wide configuration (cert, constraints).
    [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
    if [[ -d /etc/xdg/pip ]]; then
        mkdir -p "$rootfs/etc/xdg"
        cp -a /etc/xdg/pip "$rootfs/etc/xdg/"
    fi

    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "importing debian:bookworm"
    tar -C "$rootfs" -c . | "$DOCKER" import \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' - debian:bookworm >/dev/null
}

build_python() {
    if have_image python:3.11-slim; then log "python:3.11-slim exists"; return; fi
    log "building python:3.11-slim stand-in"
    "$DOCKER" build -q -t python:3.11-slim - >/dev/null <<'EOF'
FROM debian:bookworm
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates \
 && ln -sf python3 /usr/bin/python \
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
EOF
}

build_prometheus() {
    if have_image "$PROMETHEUS_IMAGE"; then log "$PROMETHEUS_IMAGE exists"; return; fi
    log "building $PROMETHEUS_IMAGE stand-in"
    "$DOCKER" build -q -t "$PROMETHEUS_IMAGE" - >/dev/null <<'EOF'
FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
}

build_debian
build_python
build_prometheus
log "done: debian:bookworm python:3.11-slim $PROMETHEUS_IMAGE"
