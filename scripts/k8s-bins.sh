#!/usr/bin/env bash
# Builds kube-apiserver, etcd and helm from their Go modules (the Go module proxy is
# the only network access the test machines have) and caches them outside the clone,
# so every later run on the same machine reuses them.
#
#   bin=$(scripts/k8s-bins.sh | tail -1)
#
# Progress goes to stderr; the last line of stdout is the bin dir.
# Cache root: $PODSHAPER_CACHE (default /var/cache/podshaper).
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16 # newest v3.6 on the proxy
HELM_VERSION=v3.22.0 # newest v3 on the proxy

root=${PODSHAPER_CACHE:-/var/cache/podshaper}
# One dir per version set: a bump lands in a fresh dir and so rebuilds.
dir=$root/k8s-$K8S_VERSION
bin=$dir/bin

log() { echo "k8s-bins: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Is $1 in the bin dir, runnable, and the version we want? Captured, not piped into
# grep -q, so an early grep exit can't SIGPIPE the binary and trip pipefail.
ok() {
  local out
  [[ -x $bin/$1 ]] || return 1
  case $1 in
    kube-apiserver) out=$(timeout 30 "$bin/$1" --version 2>&1) || return 1
      [[ $out == *"Kubernetes $K8S_VERSION"* ]] ;;
    etcd) out=$(timeout 30 "$bin/$1" --version 2>&1) || return 1
      [[ $out == *"etcd Version: ${ETCD_VERSION#v}"* ]] ;;
    helm) out=$(timeout 30 "$bin/$1" version --short 2>&1) || return 1
      [[ $out == "$HELM_VERSION"* ]] ;;
    *) return 1 ;;
  esac
}

all_ok() { ok kube-apiserver && ok etcd && ok helm; }

# Fast path, no lock needed: binaries only ever appear by an atomic rename.
if all_ok; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || die "go not found (Go >= 1.26 is needed to build etcd $ETCD_VERSION and helm $HELM_VERSION)"
mkdir -p "$bin" || die "cannot create $bin; set PODSHAPER_CACHE to a writable dir"

# Serialise concurrent callers; whoever waited re-checks and usually finds everything built.
exec 9>"$dir/.lock"
if ! flock -n 9; then
  log "another build holds $dir/.lock; waiting"
  flock 9
fi

# Module and build caches live next to the binaries so a rebuild is mostly cache hits.
export GOMODCACHE=$root/gomod
export GOCACHE=$root/gocache
# Own the flags: a caller's GOFLAGS (e.g. -mod=vendor) or go.work must not leak into
# the throwaway modules. -modcacherw lets `rm -rf` clear the cache.
export GOFLAGS="-modcacherw -buildvcs=false"
export GOWORK=off
# Static binaries, no C toolchain needed (the upstream release builds do the same).
export CGO_ENABLED=0

work=$(mktemp -d "$dir/work.XXXXXX")
cleanup() { rm -rf "$work" "$bin/.tmp.$$".*; }
trap cleanup EXIT

# A fresh throwaway module in $work/$1, as current dir, for building one binary.
newmod() {
  mkdir "$work/$1"
  cd "$work/$1" || exit
  go mod init "podshaper.local/k8s-bins/$1" 2>/dev/null
}

# Builds package $2 into $bin/$1 via a temp name, so an interrupted build never
# leaves a half-written binary behind. Remaining args are extra `go build` flags.
build() {
  local name=$1 pkg=$2
  shift 2
  go build -trimpath "$@" -o "$bin/.tmp.$$.$name" "$pkg"
  mv -f "$bin/.tmp.$$.$name" "$bin/$name"
}

build_kube_apiserver() {
  local v=${K8S_VERSION#v} gomod m mods=()
  local major=${v%%.*} minor
  minor=${v#*.} minor=${minor%%.*}
  newmod kube-apiserver
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f $gomod ]] || die "no go.mod for k8s.io/kubernetes@$K8S_VERSION"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
  # ./staging/... dirs, which the module zip lacks and which a dependency's replaces
  # can't use anyway; redirect each to its published tag (v1.X.Y -> v0.X.Y). Modules it
  # doesn't require (sample-controller, ... not on the proxy) are never fetched.
  mapfile -t mods < <(awk '{ sub(/^replace[[:space:]]+/, "") }
    $2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
  ((${#mods[@]})) || die "no staging replaces found in $gomod"
  local args=()
  for m in "${mods[@]}"; do
    args+=("-replace=$m=$m@v0.${v#*.}")
  done
  go mod edit "${args[@]}"
  # `go get` of the main package records exactly the requirements and go.sum lines
  # that it needs (go mod tidy can't: a main package can't be imported).
  go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION"
  # Same version stamps as upstream's hack/lib/version.sh, so --version and the
  # /version endpoint report $K8S_VERSION instead of v0.0.0-master.
  local ld="-s -w" kv key val p
  for kv in "gitVersion=$K8S_VERSION" "gitMajor=$major" "gitMinor=$minor" gitTreeState=clean; do
    key=${kv%%=*} val=${kv#*=}
    for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $p.$key=$val"
    done
  done
  build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver -ldflags="$ld"
}

build_etcd() {
  newmod etcd
  # In 3.6 the etcd main package is the root of go.etcd.io/etcd/server/v3. Its go.mod
  # replaces api/client/pkg with ../ dirs; as a dependency those replaces are ignored
  # and the same-version modules come from the proxy instead.
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  build etcd go.etcd.io/etcd/server/v3 -ldflags="-s -w"
}

build_helm() {
  local cg major minor
  newmod helm
  go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  # Like helm's Makefile: stamp the version and derive the default Kubernetes version
  # (Capabilities.KubeVersion, deprecation lint) from client-go v0.X.Y -> 1.X, else
  # `helm template`/`helm lint` would assume Kubernetes 1.20.
  cg=$(go list -m -f '{{.Version}}' k8s.io/client-go)
  cg=${cg#v} major=$((${cg%%.*} + 1)) minor=${cg#*.} minor=${minor%%.*}
  local p=helm.sh/helm/v3
  build helm "$p/cmd/helm" -ldflags="-s -w -X $p/internal/version.version=$HELM_VERSION
    -X $p/internal/version.gitTreeState=clean
    -X $p/pkg/chartutil.k8sVersionMajor=$major -X $p/pkg/chartutil.k8sVersionMinor=$minor
    -X $p/pkg/lint/rules.k8sVersionMajor=$major -X $p/pkg/lint/rules.k8sVersionMinor=$minor"
}

for name in etcd helm kube-apiserver; do
  if ok "$name"; then
    continue
  fi
  log "building $name into $bin"
  # Subshell keeps newmod's cd local. Not `|| die`: that would switch off `set -e`
  # inside the subshell; a failure exits here, and the EXIT trap cleans up.
  ("build_${name//-/_}") >&2
  ok "$name" || die "$bin/$name was built but does not report the expected version"
done

log "done"
echo "$bin"
