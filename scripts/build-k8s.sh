#!/usr/bin/env bash
# Builds the real Kubernetes control plane (and etcd) from their Go modules, as upstream
# builds them, into a cache outside the clone keyed by version, and reuses it when present.
#
#   scripts/build-k8s.sh              build what is missing or stale, print progress and times
#   scripts/build-k8s.sh --print-env  same, then print MAILFLOW_K8S_BIN=... and MAILFLOW_ETCD_BIN=...
#                                     on stdout (progress goes to stderr)
#   scripts/build-k8s.sh --check      exit 0 when every binary is present and fresh, 1 otherwise
#
# The pins live in tools/k8s/go.mod (k8s.io/kubernetes and its staging modules) and
# tools/etcd/go.mod (go.etcd.io/etcd/server/v3); tools/kstatus is a small program on
# sigs.k8s.io/cli-utils' kstatus, in a module of its own so it never moves Kubernetes' pins.
# A binary is fresh when its stamp holds the hash of the module's go.mod, go.sum and own
# sources, the Go version and the build flags.
#
# Environment: MAILFLOW_CACHE (default ~/.cache/mailflow), K8S_BINARIES (default all, in build
# order), GO (default go). Builds run under `nice -n 10` with GOFLAGS=-p=2: the machines are shared.
# Exit status 3: no Go toolchain (the caller decides whether that fails the run).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=build
case "${1:-}" in
--print-env) mode=env ;;
--check) mode=check ;;
"") ;;
*)
	echo "usage: $0 [--print-env|--check]" >&2
	exit 2
	;;
esac

log() { echo "build-k8s: $*" >&2; }

GO=${GO:-go}
if ! command -v "$GO" >/dev/null 2>&1; then
	log "no Go toolchain ('$GO' is not on PATH); install Go 1.26+ to build the control plane"
	exit 3
fi

pinned() { # go.mod module: the version required (in a require line or block)
	awk -v m="$2" '$1 == "require" && $2 == m {print $3; exit} $1 == m && $2 ~ /^v/ {print $2; exit}' "$1"
}
k8s_version=$(pinned "$root/tools/k8s/go.mod" k8s.io/kubernetes)
etcd_version=$(pinned "$root/tools/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [[ -z $k8s_version || -z $etcd_version ]]; then
	log "cannot read the pinned versions from tools/k8s/go.mod and tools/etcd/go.mod"
	exit 2
fi
cache=${MAILFLOW_CACHE:-$HOME/.cache/mailflow}
k8s_bin=$cache/k8s/$k8s_version/bin
etcd_bin=$cache/etcd/$etcd_version/bin

# kube-apiserver 1.35.4 -> major 1, minor 35
k8s_major=${k8s_version#v}
k8s_major=${k8s_major%%.*}
k8s_minor=${k8s_version#v*.}
k8s_minor=${k8s_minor%%.*}
version_x=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	version_x+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
	version_x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
k8s_ldflags="-s -w$version_x"
etcd_ldflags="-s -w"
tags=selinux,notest
go_version=$("$GO" env GOVERSION)

stamp_of() { # module-dir ldflags
	{
		# go.mod, go.sum and the module's own sources (tools/kstatus has some)
		cat "$root/$1/go.mod" "$root/$1/go.sum"
		find "$root/$1" -maxdepth 1 -name '*.go' | sort | xargs -r cat
		echo "$go_version CGO_ENABLED=0 -trimpath -tags=$tags -ldflags=$2"
	} | sha256sum | cut -d' ' -f1
}
k8s_stamp=$(stamp_of tools/k8s "$k8s_ldflags")
etcd_stamp=$(stamp_of tools/etcd "$etcd_ldflags")
kstatus_stamp=$(stamp_of tools/kstatus "-s -w")

# name module-dir package out-dir stamp ldflags
targets=(
	"etcd tools/etcd go.etcd.io/etcd/server/v3 $etcd_bin $etcd_stamp etcd"
	"kube-apiserver tools/k8s k8s.io/kubernetes/cmd/kube-apiserver $k8s_bin $k8s_stamp k8s"
	"kube-controller-manager tools/k8s k8s.io/kubernetes/cmd/kube-controller-manager $k8s_bin $k8s_stamp k8s"
	"kubectl tools/k8s k8s.io/kubernetes/cmd/kubectl $k8s_bin $k8s_stamp k8s"
	"kstatus tools/kstatus github.com/mailflow/mailflow/tools/kstatus $k8s_bin $kstatus_stamp kstatus"
	"kube-scheduler tools/k8s k8s.io/kubernetes/cmd/kube-scheduler $k8s_bin $k8s_stamp k8s"
	"kubelet tools/k8s k8s.io/kubernetes/cmd/kubelet $k8s_bin $k8s_stamp k8s"
)
wanted=${K8S_BINARIES:-etcd kube-apiserver kube-controller-manager kubectl kstatus kube-scheduler kubelet}

fresh() { # out stamp
	[[ -x $1 && -f $1.stamp && $(cat "$1.stamp") == "$2" ]]
}

human() { # seconds
	printf '%dm%02ds' $(($1 / 60)) $(($1 % 60))
}

total_start=$SECONDS
built=0
stale=0
for target in "${targets[@]}"; do
	read -r name dir pkg out stamp flavour <<<"$target"
	[[ " $wanted " == *" $name "* ]] || continue
	if fresh "$out/$name" "$stamp"; then
		[[ $mode == check ]] || log "$name: cached ($out/$name)"
		continue
	fi
	if [[ $mode == check ]]; then
		log "$name: missing or stale ($out/$name)"
		stale=1
		continue
	fi
	case $flavour in
	k8s) ldflags=$k8s_ldflags version=$k8s_version ;;
	etcd) ldflags=$etcd_ldflags version=$etcd_version ;;
	*) ldflags="-s -w" version="(sigs.k8s.io/cli-utils kstatus)" ;;
	esac
	mkdir -p "$out"
	log "$name: building $pkg $version ..."
	start=$SECONDS
	(
		cd "$root/$dir"
		CGO_ENABLED=0 GOFLAGS="-p=2 -mod=readonly" nice -n 10 \
			"$GO" build -trimpath -tags="$tags" -ldflags="$ldflags" -o "$out/$name.tmp" "$pkg"
	)
	mv "$out/$name.tmp" "$out/$name"
	echo "$stamp" >"$out/$name.stamp"
	built=$((built + 1))
	size=$(du -m "$out/$name" | cut -f1)
	log "$name: built in $(human $((SECONDS - start))) (${size} MiB)"
done

if [[ $mode == check ]]; then
	exit $stale
fi
if ((built > 0)); then
	log "built $built binaries in $(human $((SECONDS - total_start))) -> $k8s_bin, $etcd_bin"
else
	log "all binaries cached (kubernetes $k8s_version, etcd $etcd_version)"
fi
if [[ $mode == env ]]; then
	echo "MAILFLOW_K8S_BIN=$k8s_bin"
	echo "MAILFLOW_ETCD_BIN=$etcd_bin"
	echo "MAILFLOW_K8S_VERSION=$k8s_version"
	echo "MAILFLOW_ETCD_VERSION=$etcd_version"
fi
