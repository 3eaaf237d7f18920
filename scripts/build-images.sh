#!/usr/bin/env bash
# `make images`: builds the operator and relay images with no daemon and no registry.
#
#   1. wheels   the project and its runtime dependencies (exact versions: images/constraints.txt),
#               built or fetched on the host with the project's venv: nothing is fetched later
#   2. base     a Debian bookworm root filesystem from Debian packages (mmdebstrap, the package
#               set of images/debian-packages.txt, no docs/man pages/locales, no apt)
#   3. images   buildah on that base (vfs storage in a throwaway folder, chroot isolation): a venv
#               made with `python3 -m venv --without-pip`, the wheels installed by pypa/installer
#               (which is not left in the image), the user and group 10001 of the Dockerfiles;
#               SOURCE_DATE_EPOCH (the last commit's time) for the layers' timestamps
#   4. archives skopeo writes an OCI layout; it is packed with sorted names and fixed mtimes into
#               dist/images/mailflow-{operator,relay}-VERSION.oci.tar, with digests.txt (the
#               manifest digests, for the chart's image.digest) and SHA256SUMS (the archives)
#
# Environment: IMAGE_PREFIX (default ghcr.io/mailflow/), IMAGES_OUT (default dist/images),
# IMAGES_WORK (default build/images; wiped at each build), SOURCE_DATE_EPOCH (default: the last
# commit's time), DEBIAN_MIRROR, PYTHON (the venv's python, for pip wheel).
# Needs root (mmdebstrap and buildah with vfs storage and chroot isolation); missing tools are
# installed from Debian packages (scripts/install-image-tools.sh). Any failure exits non-zero.
# One compound command, read whole before it runs: editing the file mid-build is harmless.
{
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

NICE=(nice -n 10)
start=$(date +%s)
step() { echo "==> [images $(($(date +%s) - start))s] $*"; }
die() {
    echo "error: make images: $*" >&2
    exit 1
}

if [[ ${1:-} != --lock ]] && ((EUID != 0)); then
    die "needs root (mmdebstrap, buildah with vfs storage and chroot isolation); run it as root, or build with Docker: docker build -f relay/Dockerfile . (docs/install.md)"
fi
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || die "no $PYTHON: run 'make venv' first (it builds the wheels)"

if [[ ${1:-} == --lock ]]; then
    # images/constraints.txt: the newest releases that pyproject.toml allows, binary wheels only.
    lock=$(mktemp -d)
    trap 'rm -rf "$lock"' EXIT
    step "lock: resolving the runtime dependencies (pip wheel, binary wheels only)"
    "${NICE[@]}" "$PYTHON" -m pip wheel --quiet --progress-bar off --disable-pip-version-check \
        --only-binary :all: --no-binary dkimpy --wheel-dir "$lock" .
    {
        sed -n '/^#/p' images/constraints.txt
        (cd "$lock" && ls *.whl) | grep -v '^mailflow-' |
            sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' | tr 'A-Z_' 'a-z-' | LC_ALL=C sort
    } >images/constraints.txt.part
    mv -f images/constraints.txt.part images/constraints.txt
    echo "==> images/constraints.txt: $(grep -vc '^#' images/constraints.txt) pinned dependencies"
    exit 0
fi

bash scripts/install-image-tools.sh
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
[[ -n $VERSION ]] || die "no version in pyproject.toml"
PREFIX=${IMAGE_PREFIX-ghcr.io/mailflow/}
OUT=${IMAGES_OUT:-dist/images}
WORK=${IMAGES_WORK:-build/images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH
# The installer that puts the wheels into the image's venv (run from its wheel, then removed).
INSTALLER=installer==0.7.0


[[ -n $WORK && $WORK != / && $WORK != . ]] || die "IMAGES_WORK must be a folder of its own"
WORK=$(realpath -m "$WORK")
OUT=$(realpath -m "$OUT")

# A private store and configuration: nothing of the machine's own containers is touched.
STORE=$WORK/store
RUNROOT=$WORK/run
cleanup() {
    # vfs layers are plain folders; a failed build leaves nothing mounted behind.
    if [[ -d $STORE ]]; then
        buildah "${STORAGE[@]}" rm --all >/dev/null 2>&1 || true
    fi
}
STORAGE=(--root "$STORE" --runroot "$RUNROOT" --storage-driver vfs)
if [[ -d $STORE ]]; then
    buildah "${STORAGE[@]}" rm --all >/dev/null 2>&1 || true
fi
rm -rf "$WORK"
mkdir -p "$WORK/wheels" "$WORK/tools" "$OUT"
trap cleanup EXIT
cat >"$WORK/containers.conf" <<'EOF'
# Written by scripts/build-images.sh for its private store.
[containers]
# root cannot raise RLIMIT_NOFILE here: do not ask for more than the host has.
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
export BUILDAH_ISOLATION=chroot

echo "==> building mailflow $VERSION images (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH, into $OUT)"

# --- 1. wheels ------------------------------------------------------------------------------
step "wheels: the project and its dependencies (images/constraints.txt), binary wheels only"
# dkimpy is published as a source distribution only (pure Python): it alone is built here.
"${NICE[@]}" "$PYTHON" -m pip wheel --quiet --progress-bar off --disable-pip-version-check \
    --only-binary :all: --no-binary dkimpy --constraint images/constraints.txt \
    --wheel-dir "$WORK/wheels" .
"${NICE[@]}" "$PYTHON" -m pip download --quiet --progress-bar off --disable-pip-version-check \
    --only-binary :all: --no-deps --dest "$WORK/tools" "$INSTALLER"
# Every dependency must be pinned: an unpinned one would make the image drift.
unpinned=$(
    cd "$WORK/wheels"
    for wheel in *.whl; do
        name=$(echo "${wheel%%-*}" | tr 'A-Z_' 'a-z-')
        version=$(echo "$wheel" | cut -d- -f2)
        [[ $name == mailflow ]] && continue
        grep -qx "$name==$version" "$ROOT/images/constraints.txt" || echo "$name==$version"
    done
)
[[ -z $unpinned ]] || die "dependencies missing from images/constraints.txt (run 'make images-lock'): $unpinned"
echo "    $(find "$WORK/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)"

# --- 2. base root filesystem ----------------------------------------------------------------
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' images/debian-packages.txt)
step "base: Debian bookworm (mmdebstrap, essential + ${packages[*]})"
include=$(
    IFS=,
    echo "${packages[*]}"
)
# No documentation, manual pages or translations (copyright files stay); the merged /usr of
# bookworm without the usrmerge package (which would pull in perl). The build host's
# resolv.conf and hostname do not stay in the image (the runtime mounts its own).
"${NICE[@]}" mmdebstrap --quiet --mode=root --variant=essential --format=tar \
    --include="$include" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='chroot "$1" dpkg-query -W -f="\${Package}=\${Version}\n" > "$1/tmp/packages.txt"' \
    --customize-hook='copy-out /tmp/packages.txt '"$WORK" \
    --customize-hook='rm -f "$1/tmp/packages.txt" "$1"/var/log/*.log "$1"/var/log/apt/* "$1"/var/cache/ldconfig/aux-cache "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"; : >"$1/etc/resolv.conf"; : >"$1/etc/hostname"; chmod 0644 "$1/etc/hosts" "$1/etc/resolv.conf" "$1/etc/hostname"' \
    bookworm "$WORK/base.tar" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" >"$WORK/mmdebstrap.log" 2>&1 || {
    tail -n 40 "$WORK/mmdebstrap.log" >&2
    die "mmdebstrap failed (log: $WORK/mmdebstrap.log)"
}
echo "    $(wc -l <"$WORK/packages.txt") Debian packages, $(du -sh "$WORK/base.tar" | cut -f1)"

# --- 3. images ------------------------------------------------------------------------------
bah() { "${NICE[@]}" buildah "${STORAGE[@]}" "$@"; }

step "base image: the root filesystem as one layer"
base=$(bah from --quiet scratch)
bah add --quiet "$base" "$WORK/base.tar" /
# apt is not in the image: neither are its state and cache folders, which mmdebstrap leaves.
root=$(bah mount "$base")
rm -rf "$root/var/lib/apt" "$root/var/cache/apt"
bah umount "$base" >/dev/null
bah config --os linux --arch amd64 --created-by "mmdebstrap bookworm (images/debian-packages.txt)" "$base"
bah commit --quiet --rm --timestamp "$SOURCE_DATE_EPOCH" "$base" localhost/mailflow-base:build >/dev/null

# What each image declares, as in its Dockerfile (tests/images checks that they agree).
declare -A TITLE=(
    [operator]="mailflow-operator"
    [relay]="mailflow-relay"
)
declare -A DESCRIPTION=(
    [operator]="Mailflow operator: compiles connectors and profiles into the relays' routing document"
    [relay]="Mailflow SMTP relay: accept, spool, route and deliver outbound mail"
)

for component in operator relay; do
    name=${PREFIX}mailflow-$component:$VERSION
    step "$component: venv, wheels, user 10001"
    ctr=$(bah from --quiet localhost/mailflow-base:build)
    spool=""
    [[ $component == relay ]] && spool="install -d -o 10001 -g 10001 -m 0750 /var/spool/mailflow"
    # The wheels are bind-mounted read-only: they are not part of the image.
    bah run --isolation chroot --volume "$WORK/wheels:/mnt/wheels:ro" \
        --volume "$WORK/tools:/mnt/tools:ro" "$ctr" -- /bin/sh -euc "
        export SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH
        python3 -m venv --without-pip /opt/mailflow
        for wheel in /mnt/wheels/*.whl; do
            PYTHONPATH=\$(echo /mnt/tools/installer-*.whl) /opt/mailflow/bin/python -m installer \
                --compile-bytecode 0 \"\$wheel\"
        done
        if /opt/mailflow/bin/python -c 'import pip' 2>/dev/null; then echo 'pip in the image' >&2; exit 1; fi
        # What groupadd/useradd --system would write (the passwd package is not installed).
        echo 'mailflow:x:10001:' >>/etc/group
        echo 'mailflow:x:10001:10001::/nonexistent:/usr/sbin/nologin' >>/etc/passwd
        $spool
        rm -rf /var/log/*.log /var/cache/ldconfig/aux-cache /etc/*- /var/lib/dpkg/*-old
    "
    # The mount points of the run above are not part of the image either.
    root=$(bah mount "$ctr")
    rmdir "$root/mnt/wheels" "$root/mnt/tools"
    bah umount "$ctr" >/dev/null
    workdir=/tmp
    ports=(--port 8080/tcp)
    volume=()
    if [[ $component == relay ]]; then
        workdir=/var/spool/mailflow
        ports=(--port 2525/tcp --port 9090/tcp)
        volume=(--volume /var/spool/mailflow)
    fi
    bah config \
        --label org.opencontainers.image.title="${TITLE[$component]}" \
        --label org.opencontainers.image.description="${DESCRIPTION[$component]}" \
        --label org.opencontainers.image.licenses=Apache-2.0 \
        --env PATH=/opt/mailflow/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1 \
        --user 10001:10001 --workingdir "$workdir" "${ports[@]}" "${volume[@]}" \
        --entrypoint '["mailflow"]' --cmd "$component --help" \
        --created-by "scripts/build-images.sh $component" "$ctr"
    bah commit --quiet --rm --timestamp "$SOURCE_DATE_EPOCH" "$ctr" "$name" >/dev/null

    # --- 4. archive -------------------------------------------------------------------------
    step "$component: OCI archive"
    layout=$WORK/oci-$component
    "${NICE[@]}" skopeo copy --quiet \
        "containers-storage:[vfs@$STORE+$RUNROOT]$name" "oci:$layout:$name"
    # containerd (ctr import, kind load) names the image by this annotation.
    python3 - "$layout/index.json" "$name" <<'EOF'
import json, sys
path, name = sys.argv[1:]
index = json.load(open(path))
for manifest in index["manifests"]:
    manifest.setdefault("annotations", {})["io.containerd.image.name"] = name
open(path, "w").write(json.dumps(index, sort_keys=True, separators=(",", ":")))
EOF
    archive=$OUT/mailflow-$component-$VERSION.oci.tar
    tar --create --file "$archive.part" --directory "$layout" --sort=name --format=gnu \
        --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        --mode='u=rw,go=r,a+X' oci-layout index.json blobs
    mv -f "$archive.part" "$archive"
done

# --- digests and sizes ----------------------------------------------------------------------
step "digests"
cp "$WORK/packages.txt" "$OUT/debian-packages-$VERSION.txt"
# What a rebuild needs to reproduce these archives (tests/images passes it back).
echo "$SOURCE_DATE_EPOCH" >"$OUT/SOURCE_DATE_EPOCH"
(cd "$WORK/wheels" && ls *.whl) >"$OUT/wheels-$VERSION.txt"
: >"$OUT/digests.txt.part"
for component in operator relay; do
    name=${PREFIX}mailflow-$component:$VERSION
    digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
        "$WORK/oci-$component/index.json")
    echo "$name@$digest" >>"$OUT/digests.txt.part"
done
mv -f "$OUT/digests.txt.part" "$OUT/digests.txt"
(cd "$OUT" && sha256sum mailflow-*-"$VERSION".oci.tar >SHA256SUMS)
for component in operator relay; do
    name=${PREFIX}mailflow-$component:$VERSION
    size=$(bah images --format '{{.Size}}' "$name")
    archive=$OUT/mailflow-$component-$VERSION.oci.tar
    echo "    $name  $size unpacked, archive $(du -h "$archive" | cut -f1)  $(grep -F "$name@" "$OUT/digests.txt" | cut -d@ -f2)"
done
echo "==> images built in $(($(date +%s) - start))s: $OUT (digests.txt, SHA256SUMS)"
exit 0
}
