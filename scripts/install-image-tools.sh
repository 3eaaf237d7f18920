#!/usr/bin/env bash
# Installs the Debian packages that `make images` and `make test-images` need, when missing:
#   mmdebstrap -> the base root filesystem, from Debian packages (no registry)
#   buildah    -> builds the images on it, daemonless (vfs storage, chroot isolation)
#   skopeo     -> writes the OCI archives
#   podman     -> runs the images in the tests (throwaway store), with runc
#   runc       -> the OCI runtime (crun refuses a hybrid cgroup v1 layout)
#   uidmap     -> newuidmap/newgidmap, which buildah and podman look for
#   containerd -> the node of tests/images/test_node.py (ctr images import, the kubelet's CRI)
#   gcc, libc6-dev -> compile Kubernetes' pause program (the pod sandbox) for that node
# Idempotent and fast when everything is present (no apt call at all). Unlike the test peers
# (scripts/install-debian-packages.sh) a missing tool is an error, never a skip: an image
# target that cannot build must not exit 0.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# package -> a program that proves it is installed
declare -A PROBES=(
    [mmdebstrap]=/usr/bin/mmdebstrap
    [buildah]=/usr/bin/buildah
    [skopeo]=/usr/bin/skopeo
    [podman]=/usr/bin/podman
    [runc]=/usr/sbin/runc
    [uidmap]=/usr/bin/newuidmap
    [containerd]=/usr/bin/containerd
    [gcc]=/usr/bin/gcc
    [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
)
PACKAGES=(mmdebstrap buildah skopeo podman runc uidmap containerd gcc libc6-dev)

present() {
    local package=$1 probe=$2
    # dpkg-query, not `dpkg -s | grep -q`: grep's early exit would fail the pipe (pipefail).
    [[ $(dpkg-query -W -f='${Status}' "$package" 2>/dev/null) == "install ok installed" ]] || return 1
    [[ -e $probe ]]
}

missing=()
for package in "${PACKAGES[@]}"; do
    present "$package" "${PROBES[$package]}" || missing+=("$package")
done

if ((${#missing[@]} == 0)); then
    echo "==> image tools present (${PACKAGES[*]})"
    exit 0
fi

if ((EUID != 0)); then
    echo "error: missing Debian packages for the images: ${missing[*]}" >&2
    echo "       building and running the images needs root here (vfs storage, chroot);" >&2
    echo "       run 'sudo bash scripts/install-image-tools.sh' and 'sudo make images'" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null; then
    echo "error: no apt-get here: cannot install ${missing[*]} (Debian or Ubuntu needed)" >&2
    exit 1
fi

echo "==> installing Debian packages for the images: ${missing[*]}"

apt_install() {
    # apt's lock may be held by another install on a shared machine: wait for it.
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

# Keep every service (containerd, podman's) from starting while the packages install; the
# tests run their own, with private sockets and folders.
policy=/usr/sbin/policy-rc.d
backup=""
if [[ -e $policy ]]; then
    backup=$(mktemp)
    cp -p "$policy" "$backup"
fi
restore_policy() {
    if [[ -n $backup ]]; then
        mv -f "$backup" "$policy"
    else
        rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# installed by scripts/install-image-tools.sh while it runs\nexit 101\n' >"$policy"
chmod 755 "$policy"

if ! apt_install "${missing[@]}"; then
    echo "==> install failed; refreshing the package lists (apt-get update) and retrying"
    apt-get update -q -o DPkg::Lock::Timeout=300
    apt_install "${missing[@]}"
fi
restore_policy
trap - EXIT

for package in "${PACKAGES[@]}"; do
    if ! present "$package" "${PROBES[$package]}"; then
        echo "error: $package is still missing after the install" >&2
        exit 1
    fi
done
echo "==> image tools installed (${PACKAGES[*]})"
