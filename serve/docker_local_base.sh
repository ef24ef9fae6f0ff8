#!/usr/bin/env bash
# STAND-IN BASE IMAGE, FOR MACHINES WITHOUT REGISTRY ACCESS ONLY.
#
# This builds a local image tagged python:3.11-slim from Debian bookworm (debootstrap, minbase,
# Debian's python3 3.11 + pip) so that serve/Dockerfile can be built UNCHANGED on a machine whose
# Docker engine cannot pull from Docker Hub but can reach Debian and PyPI (directly or via a mirror).
# It is NOT the official image and nothing built on it should be shipped: a real build uses the
# official python:3.11-slim from Docker Hub (just run `docker build`; do not run this script).
# Differences from the official image: Python comes from Debian (/usr/bin/python3, packages that pip
# installs as root go to /usr/local/lib/python3.11/dist-packages), pip is Debian's 23.0.1, and
# the host's CA bundle plus an /etc/pip.conf that points pip at it are baked in, for TLS-intercepting
# mirrors.
#
# Needs: root, debootstrap, a running Docker engine. Env (all optional):
#   BASE_TAG        tag to create                    (default python:3.11-slim)
#   SUITE           Debian suite                     (default bookworm; 3.11 is bookworm's python3)
#   DEBIAN_MIRROR   Debian mirror URL                (default http://deb.debian.org/debian)
#   CA_BUNDLE       CA bundle copied into the image  (default /etc/ssl/certs/ca-certificates.crt)
#   WORK_DIR        where the rootfs is built        (default: a new mktemp -d, removed at the end)
#   FORCE=1         rebuild even if BASE_TAG already exists locally
set -euo pipefail

BASE_TAG=${BASE_TAG:-python:3.11-slim}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
FORCE=${FORCE:-0}

log() { printf '[local-base] %s\n' "$*"; }
die() { printf '[local-base] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
[[ -r $CA_BUNDLE ]] || die "CA bundle $CA_BUNDLE not readable"

if [[ $FORCE != 1 ]] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "$BASE_TAG already exists locally ($(docker image inspect --format '{{.Id}}' "$BASE_TAG")); FORCE=1 rebuilds"
    exit 0
fi

if [[ -n ${WORK_DIR:-} ]]; then
    mkdir -p "$WORK_DIR"; cleanup_work=0
else
    WORK_DIR=$(mktemp -d /tmp/masml-local-base.XXXXXX); cleanup_work=1
fi
ROOTFS=$WORK_DIR/rootfs
cleanup() { if [[ $cleanup_work == 1 ]]; then rm -rf "$WORK_DIR"; fi; }
trap cleanup EXIT
[[ ! -e $ROOTFS ]] || die "$ROOTFS already exists; remove it or pick another WORK_DIR"

start=$(date +%s)
log "debootstrap $SUITE (minbase + python3, python3-pip, ca-certificates) from $DEBIAN_MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" > "$WORK_DIR/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK_DIR/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

log "making python/pip resolve, baking in the CA bundle and pip.conf, dropping EXTERNALLY-MANAGED"
ln -sf python3 "$ROOTFS/usr/bin/python"
[[ -x $ROOTFS/usr/bin/pip ]] || ln -sf pip3 "$ROOTFS/usr/bin/pip"
install -m 0644 "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOTFS/etc/pip.conf"
rm -f "$ROOTFS"/usr/lib/python3.*/EXTERNALLY-MANAGED
# Leave nothing host-specific or cache-like behind; Docker provides hostname/hosts/resolv.conf.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
: > "$ROOTFS/etc/resolv.conf"; : > "$ROOTFS/etc/hostname"

log "checking the rootfs"
chroot "$ROOTFS" python -c 'import sys, ssl; print("python", sys.version.split()[0], ssl.OPENSSL_VERSION)'
chroot "$ROOTFS" pip --version

log "importing as $BASE_TAG"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "LOCAL STAND-IN for python:3.11-slim (debootstrap $SUITE); not the official image" \
    - "$BASE_TAG"
log "done in $(( $(date +%s) - start ))s: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$BASE_TAG")"
