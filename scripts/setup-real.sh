#!/usr/bin/env bash
# What the real tier needs beyond scripts/setup.sh: Debian's CNI plugins, redis (Argo CD's cache),
# containerd + runc (docker.io brings them), iproute2 and iptables; then the binaries, built from the
# Go registry modules by scripts/build-cluster.sh (minutes the first time, seconds from its cache).
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=()
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/portmap ] && [ -x /usr/lib/cni/firewall ] || pkgs+=(containernetworking-plugins)
command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
command -v containerd >/dev/null 2>&1 || pkgs+=(containerd)
command -v runc >/dev/null 2>&1 || pkgs+=(runc)
command -v ip >/dev/null 2>&1 || pkgs+=(iproute2)
command -v iptables >/dev/null 2>&1 || pkgs+=(iptables)
command -v ctr >/dev/null 2>&1 || pkgs+=(containerd)
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-real: missing Debian packages ${pkgs[*]} and not root; install them and re-run" >&2; exit 1
  fi
  echo "setup-real: apt-get install ${pkgs[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
# The pods reach the host's registry (127.0.0.1:5000) through the node's own containerd, not the pod
# network; the pod network needs forwarding for the node to reach its pods.
sysctl -qw net.ipv4.ip_forward=1 >/dev/null 2>&1 || true
export PATH=/usr/local/go/bin:$PATH
bash scripts/build-cluster.sh >/dev/null
