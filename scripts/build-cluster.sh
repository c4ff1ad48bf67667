#!/usr/bin/env bash
# Build the real-cluster tier from Go registry modules (see cluster/README.md):
#   kube    one multicall binary: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#           kubelet, kube-proxy (cluster/kube, requiring k8s.io/kubernetes + go.etcd.io/etcd/server/v3)
#   argocd  one multicall binary: argocd-application-controller, argocd-repo-server, argocd-git-ask-pass
#           (cluster/argocd, requiring github.com/argoproj/argo-cd/v3)
#   pause   a static pause binary from the kubernetes module's build/pause/linux/pause.c, imported
#           FROM scratch and pushed to the local registry (127.0.0.1:5000)
#
# Idempotent and cached outside the work tree: each binary lives in
#   $DELIVERY_CLUSTER_CACHE/bin/<module>-<version>-<hash of go.mod, go.sum, sources, Go version>/
# and is not rebuilt when present, so a second run takes seconds.
#
# Environment:
#   DELIVERY_CLUSTER_CACHE  cache root (default ~/.cache/delivery-cluster)
#   GOMODCACHE, GOCACHE     default to $DELIVERY_CLUSTER_CACHE/{gomod,gocache}; point them at empty
#                           directories to measure a cold build
#   BUILD_NICE              nice level for go and gcc (default 19: builds take only idle CPU)
#   BUILD_ONLY              space-separated subset of "kube argocd pause" (default: all three)
# Usage: scripts/build-cluster.sh            build what is missing, then print the paths
#        scripts/build-cluster.sh --print-env print the paths only (KEY=VALUE lines), build nothing
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=../cluster/versions.env
. cluster/versions.env

CACHE=${DELIVERY_CLUSTER_CACHE:-$HOME/.cache/delivery-cluster}
export GOMODCACHE=${GOMODCACHE:-$CACHE/gomod}
export GOCACHE=${GOCACHE:-$CACHE/gocache}
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
export PATH=/usr/local/go/bin:$PATH
NICE=${BUILD_NICE:-19}
ONLY=${BUILD_ONLY:-kube argocd pause}
KUBE_COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
ARGOCD_COMPONENTS="argocd-application-controller argocd-repo-server argocd-git-ask-pass argocd"
REGISTRY=${PAUSE_IMAGE%%/*}

log() { printf 'build-cluster: %s\n' "$*" >&2; }
now() { date +%s; }
wants() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# The cache key: what the binary is built from. A version bump changes go.mod/go.sum; an edit of
# main.go or of this script's flags changes the sources hash.
key_of() { # module-dir version
  local h
  h=$( (cat "cluster/$1/go.mod" "cluster/$1/go.sum"; find "cluster/$1" -name '*.go' -print0 | sort -z \
        | xargs -0 cat; go version; echo "$LDFLAGS_REV") | sha256sum | cut -c1-12)
  echo "$1-$2-$h"
}
LDFLAGS_REV=2 # bump when the go build flags below change, so the key changes too

command -v go >/dev/null 2>&1 || { log "go not found (expected /usr/local/go/bin/go)"; exit 1; }
KUBE_DIR=$CACHE/bin/$(key_of kube "$KUBE_VERSION")
ARGOCD_DIR=$CACHE/bin/$(key_of argocd "$ARGOCD_VERSION")

print_env() {
  echo "KUBE_VERSION=$KUBE_VERSION"
  echo "ETCD_VERSION=$ETCD_VERSION"
  echo "ARGOCD_VERSION=$ARGOCD_VERSION"
  echo "KUBE_BIN_DIR=$KUBE_DIR"
  echo "ARGOCD_BIN_DIR=$ARGOCD_DIR"
  echo "PAUSE_IMAGE=$PAUSE_IMAGE"
  echo "GOMODCACHE=$GOMODCACHE"
}
if [ "${1:-}" = "--print-env" ]; then print_env; exit 0; fi

# --- build dependencies -------------------------------------------------------------------------
need_pkgs=()
if wants pause; then
  command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(find /usr/lib -name libc.a -print -quit 2>/dev/null)" ] \
    || need_pkgs+=(libc6-dev)
fi
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages ${need_pkgs[*]} and not root; install them and re-run"; exit 1
  fi
  log "apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
mkdir -p "$GOMODCACHE" "$GOCACHE" "$CACHE/bin"

TIMEV=()
[ -x /usr/bin/time ] && TIMEV=(/usr/bin/time -f 'build-cluster:   %e s wall, %U s user, %S s sys, peak RSS %M KiB')
gorun() { nice -n "$NICE" "${TIMEV[@]}" go "$@"; }

# build_module NAME VERSION OUTDIR LDFLAGS COMPONENTS...
build_module() {
  local name=$1 version=$2 out=$3 ldflags=$4; shift 4
  if [ -x "$out/$name" ]; then
    log "$name $version: cached ($out)"
    return 0
  fi
  local t0 t1 t2 tmp
  t0=$(now)
  log "$name $version: downloading modules (GOMODCACHE=$GOMODCACHE)"
  (cd "cluster/$name" && gorun mod download)
  t1=$(now)
  log "$name $version: modules ready in $((t1 - t0)) s; compiling (nice $NICE, GOCACHE=$GOCACHE)"
  tmp=$(mktemp -d "$CACHE/bin/.tmp-$name-XXXXXX")
  (cd "cluster/$name" && gorun build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/$name" "./cmd/$name")
  t2=$(now)
  for c in "$@"; do [ "$c" = "$name" ] || ln -sf "$name" "$tmp/$c"; done
  rm -rf "$out"
  mv "$tmp" "$out"
  log "$name $version: built in $((t2 - t1)) s (total $((t2 - t0)) s), $(du -h "$out/$name" | cut -f1) -> $out"
}

T_START=$(now)

if wants kube; then
  # What the apiserver reports at /version: upstream sets these in hack/lib/version.sh. The commit
  # hash is not known from the module proxy; the build date is the module's publication time, so
  # the binary is the same for the same inputs.
  kube_time=$(cd cluster/kube && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes 2>/dev/null || true)
  [ -n "$kube_time" ] || kube_time=1970-01-01T00:00:00Z
  minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  kl=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kl+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    kl+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$kube_time"
  done
  build_module kube "$KUBE_VERSION" "$KUBE_DIR" "$kl" $KUBE_COMPONENTS
fi

if wants argocd; then
  argo_time=$(cd cluster/argocd && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' github.com/argoproj/argo-cd/v3 2>/dev/null || true)
  [ -n "$argo_time" ] || argo_time=1970-01-01T00:00:00Z
  kubectl_v=$(cd cluster/argocd && go list -m -f '{{.Version}}' k8s.io/kubectl 2>/dev/null || echo unknown)
  p=github.com/argoproj/argo-cd/v3/common
  al="-X $p.version=${ARGOCD_VERSION#v} -X $p.buildDate=$argo_time -X $p.gitTag=$ARGOCD_VERSION"
  al+=" -X $p.gitTreeState=archive -X $p.kubectlVersion=$kubectl_v"
  build_module argocd "$ARGOCD_VERSION" "$ARGOCD_DIR" "$al" $ARGOCD_COMPONENTS
fi

if wants pause; then
  t0=$(now)
  pause_src=$(cd cluster/kube && go mod download -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  pause_c=$pause_src/build/pause/linux/pause.c
  [ -f "$pause_c" ] || { log "pause.c not found at $pause_c"; exit 1; }
  # The pause version upstream tags this source with (build/pause/Makefile: TAG ?= 3.10.1).
  pause_tag=$(sed -n 's/^TAG ?= *//p' "$pause_src/build/pause/Makefile")
  pause_key=pause-$pause_tag-$( (cat "$pause_c"; gcc --version | head -1) | sha256sum | cut -c1-12)
  pause_dir=$CACHE/bin/$pause_key
  if [ ! -x "$pause_dir/pause" ]; then
    tmp=$(mktemp -d "$CACHE/bin/.tmp-pause-XXXXXX")
    cp "$pause_c" "$tmp/pause.c"
    # As upstream's build/pause/Makefile (CFLAGS = -Os -Wall -Werror -static -DVERSION=...).
    nice -n "$NICE" gcc -Os -Wall -Werror -static -DVERSION="v$pause_tag-$KUBE_VERSION" -o "$tmp/pause" "$tmp/pause.c"
    strip "$tmp/pause"
    rm -f "$tmp/pause.c"
    rm -rf "$pause_dir"; mv "$tmp" "$pause_dir"
    log "pause $pause_tag: compiled $(du -h "$pause_dir/pause" | cut -f1) -> $pause_dir"
  else
    log "pause $pause_tag: binary cached ($pause_dir)"
  fi
  # Push unless the registry already serves the digest we pushed last (it may have been reset).
  repo_tag=${PAUSE_IMAGE#*/}; repo=${repo_tag%%:*}
  tags="${PAUSE_IMAGE##*:}"; [ "$pause_tag" = "$tags" ] || tags="$tags $pause_tag"
  need_push=0
  for tag in $tags; do
    served=$(curl -fsSI -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
      "http://$REGISTRY/v2/$repo/manifests/$tag" 2>/dev/null | tr -d '\r' \
      | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true)
    [ -n "$served" ] && [ "$served" = "$(cat "$pause_dir/pushed-digest" 2>/dev/null)" ] || need_push=1
  done
  if [ "$need_push" = 1 ]; then
    command -v docker >/dev/null 2>&1 || { log "docker not found: run scripts/setup.sh first"; exit 1; }
    tmp=$(mktemp -d)
    cp "$pause_dir/pause" "$tmp/pause"
    tar -C "$tmp" --owner=0 --group=0 -cf "$tmp/rootfs.tar" pause
    docker import -c 'USER 65535:65535' -c 'ENTRYPOINT ["/pause"]' "$tmp/rootfs.tar" \
      "$REGISTRY/$repo:$pause_tag" >/dev/null
    rm -rf "$tmp"
    for tag in $tags; do
      [ "$tag" = "$pause_tag" ] || docker tag "$REGISTRY/$repo:$pause_tag" "$REGISTRY/$repo:$tag"
      docker push -q "$REGISTRY/$repo:$tag" >/dev/null
    done
    digest=$(curl -fsSI -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
      "http://$REGISTRY/v2/$repo/manifests/$pause_tag" | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p')
    echo "$digest" > "$pause_dir/pushed-digest"
    log "pause: pushed $REGISTRY/$repo:{${tags// /,}} ($digest) in $(($(now) - t0)) s"
  else
    log "pause: $REGISTRY/$repo:{${tags// /,}} already pushed"
  fi
fi

log "done in $(($(now) - T_START)) s"
print_env
