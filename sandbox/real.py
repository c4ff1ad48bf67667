"""The real-cluster tier: a one-node Kubernetes and Argo CD in core mode, as host processes built from
the Go registry modules (`cluster/`, `scripts/build-cluster.sh`), behind `delivery sandbox up --real`.

Parts, each started only when it is not already running and recorded (pid and start time) in
`<root>/state.json` so that `down` stops exactly these:

- etcd (embedded from go.etcd.io/etcd/server/v3) on 127.0.0.1;
- kube-apiserver (127.0.0.1:6443 by default; advertised on the node's address, which cannot be
  loopback), kube-controller-manager and kube-scheduler, with a CA and client certificates of
  their own (sandbox/pki.py);
- containerd with CRI, an instance of its own (its own root, state and socket), and the kubelet
  (cgroupfs, swap allowed), with the CNI bridge + portmap plugins;
- redis, Argo CD's repo-server and application-controller (core mode: no API server, no UI).

The product does not know about any of it: it gets `<root>/kubeconfig` through DELIVERY_KUBECONFIG,
exactly as it gets the emulator's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delivery.errors import SandboxError
from delivery.settings import PROJECT_ROOT, get_settings
from sandbox.manager import _alive, _http_ok, _spawn, _stop, _wait_until, load_state, save_state
from sandbox.pki import Pki

NODE_NAME = "delivery-node"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/24"
# Ports on 127.0.0.1; overridable so that a second real tier (CI beside a developer's) can run.
PORT_BASE = int(os.environ.get("DELIVERY_REAL_PORT_BASE", "16000"))


@dataclass(frozen=True)
class Ports:
    base: int

    @property
    def etcd(self) -> int:
        return self.base + 379

    @property
    def etcd_peer(self) -> int:
        return self.base + 380

    @property
    def apiserver(self) -> int:
        return self.base + 443

    @property
    def controller_manager(self) -> int:
        return self.base + 257

    @property
    def scheduler(self) -> int:
        return self.base + 259

    @property
    def kubelet(self) -> int:
        return self.base + 250

    @property
    def kubelet_healthz(self) -> int:
        return self.base + 248

    @property
    def redis(self) -> int:
        return self.base + 637

    @property
    def repo_server(self) -> int:
        return self.base + 81

    @property
    def repo_server_metrics(self) -> int:
        return self.base + 84

    @property
    def controller_metrics(self) -> int:
        return self.base + 82


def build_env() -> dict[str, str]:
    """`scripts/build-cluster.sh --print-env`: the versions and where the binaries are."""
    res = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "build-cluster.sh"), "--print-env"],
                         capture_output=True, text=True, check=False, timeout=120)
    if res.returncode:
        raise SandboxError(f"scripts/build-cluster.sh --print-env failed: {res.stderr.strip()}")
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def build(only: str = "kube argocd pause") -> dict[str, str]:
    """Build what is missing (minutes the first time, seconds from the cache), with progress on stderr."""
    res = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "build-cluster.sh")], check=False,
                         env={**os.environ, "BUILD_ONLY": only}, timeout=3600)
    if res.returncode:
        raise SandboxError(f"scripts/build-cluster.sh failed (exit {res.returncode}); its output says why")
    return build_env()


def node_ip() -> str:
    """The node's address: the first global IPv4 address (the apiserver may not advertise loopback)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         check=False, timeout=10).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts and not parts[1].startswith(("docker", "cni", "veth", "br-")):
            return parts[parts.index("inet") + 1].split("/")[0]
    raise SandboxError("no global IPv4 address for the node (the apiserver cannot advertise loopback)")


class RealCluster:
    def __init__(self, root: Path | None = None, *, port_base: int = PORT_BASE) -> None:
        self.root = Path(root if root is not None else get_settings().sandbox_dir / "real").resolve()
        self.ports = Ports(port_base)
        self.pki = Pki(self.root / "pki")

    # -- files

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def _load(self) -> dict[str, Any]:
        return load_state(self.state_file)

    def _save(self, raw: dict[str, Any]) -> None:
        save_state(self.state_file, raw)

    # -- up

    def up(self, *, build_first: bool = True) -> dict[str, Any]:
        t0 = time.monotonic()
        env = build("kube argocd pause") if build_first else build_env()
        kube = Path(env["KUBE_BIN_DIR"])
        self.root.mkdir(parents=True, exist_ok=True)
        ip = node_ip()
        self.pki.ensure(node_name=NODE_NAME, node_ip=ip, service_ip=SERVICE_IP)
        for user in ("admin", "controller-manager", "scheduler", "kubelet", "argocd"):
            self.pki.kubeconfig(self.root / f"{user}.kubeconfig", server=self.server, user=user)
        self.pki.kubeconfig(self.kubeconfig, server=self.server, user="admin")
        raw = self._load()
        parts: dict[str, Any] = raw.setdefault("parts", {})
        raw["versions"] = {k: env[k] for k in ("KUBE_VERSION", "ETCD_VERSION", "ARGOCD_VERSION") if k in env}
        self._save(raw)

        self._part(parts, "etcd", [str(kube / "etcd"), "--name", NODE_NAME, "--data-dir", str(self.root / "etcd"),
                                   "--listen-client-urls", f"http://127.0.0.1:{self.ports.etcd}",
                                   "--advertise-client-urls", f"http://127.0.0.1:{self.ports.etcd}",
                                   "--listen-peer-urls", f"http://127.0.0.1:{self.ports.etcd_peer}",
                                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.ports.etcd_peer}",
                                   "--initial-cluster", f"{NODE_NAME}=http://127.0.0.1:{self.ports.etcd_peer}",
                                   "--listen-metrics-urls", ""],
                   ready=lambda: _http_ok(f"http://127.0.0.1:{self.ports.etcd}/health"), timeout=60)
        self._save(raw)
        p = self.pki
        self._part(parts, "kube-apiserver", [
            str(kube / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.ports.etcd}",
            "--bind-address", "127.0.0.1", "--advertise-address", ip, "--secure-port", str(self.ports.apiserver),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--tls-cert-file", str(p.pair("apiserver").cert), "--tls-private-key-file", str(p.pair("apiserver").key),
            "--client-ca-file", str(p.ca.cert),
            "--kubelet-client-certificate", str(p.pair("apiserver-kubelet-client").cert),
            "--kubelet-client-key", str(p.pair("apiserver-kubelet-client").key),
            "--kubelet-certificate-authority", "", "--kubelet-preferred-address-types", "InternalIP",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(p.sa_pub), "--service-account-signing-key-file", str(p.sa_key),
            "--authorization-mode", "Node,RBAC", "--allow-privileged=true",
            "--enable-admission-plugins", "NodeRestriction", "--profiling=false",
        ], ready=lambda: self._kube_ok("/readyz"), timeout=120)
        self._save(raw)
        self._part(parts, "kube-controller-manager", [
            str(kube / "kube-controller-manager"),
            "--kubeconfig", str(self.root / "controller-manager.kubeconfig"),
            "--authentication-kubeconfig", str(self.root / "controller-manager.kubeconfig"),
            "--authorization-kubeconfig", str(self.root / "controller-manager.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports.controller_manager),
            "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(p.sa_key), "--root-ca-file", str(p.ca.cert),
            "--cluster-signing-cert-file", str(p.ca.cert), "--cluster-signing-key-file", str(p.ca.key),
            "--allocate-node-cidrs=true", "--cluster-cidr", POD_CIDR.rsplit(".", 2)[0] + ".0.0/16",
            "--node-cidr-mask-size", "24", "--service-cluster-ip-range", SERVICE_CIDR,
            "--controllers", "*,-cloud-node-lifecycle",
        ], ready=lambda: self._http_any(f"https://127.0.0.1:{self.ports.controller_manager}/healthz"), timeout=60)
        self._save(raw)
        self._part(parts, "kube-scheduler", [
            str(kube / "kube-scheduler"),
            "--kubeconfig", str(self.root / "scheduler.kubeconfig"),
            "--authentication-kubeconfig", str(self.root / "scheduler.kubeconfig"),
            "--authorization-kubeconfig", str(self.root / "scheduler.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports.scheduler), "--leader-elect=false",
        ], ready=lambda: self._http_any(f"https://127.0.0.1:{self.ports.scheduler}/healthz"), timeout=60)
        self._save(raw)
        self._start_node(parts, raw, kube, ip, env)
        self._start_argocd(parts, raw, env)
        raw["up_seconds"] = round(time.monotonic() - t0, 1)
        raw["server"] = self.server
        self._save(raw)
        return raw

    # -- the node

    @property
    def containerd_socket(self) -> Path:
        return self.root / "run" / "containerd" / "containerd.sock"

    def _write_node_config(self, ip: str, env: dict[str, str]) -> None:
        """containerd (CRI on, its own root/state/socket, runc without systemd cgroups, plain-HTTP pulls
        from the local registry), the CNI bridge + portmap + firewall chain, and the kubelet's config."""
        run = self.root / "run"
        (run / "containerd").mkdir(parents=True, exist_ok=True)
        cni_conf = self.root / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        registry = env.get("PAUSE_IMAGE", "127.0.0.1:5000/pause:3.10").split("/", 1)[0]
        (self.root / "containerd.toml").write_text(f"""version = 2
root = "{self.root / 'containerd'}"
state = "{run / 'containerd-state'}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  address = "{run / 'containerd' / 'debug.sock'}"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{env.get('PAUSE_IMAGE', '127.0.0.1:5000/pause:3.10')}"
  # This machine does not let a process lower its oom_score_adj (the pause container asks for -998,
  # runc fails with EACCES): clamp to our own score, as containerd does for rootless setups.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
""")
        (cni_conf / "10-delivery.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "delivery",
            "plugins": [
                {"type": "bridge", "bridge": "cni-delivery", "isGateway": True, "ipMasq": True,
                 "hairpinMode": True, "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                                              "routes": [{"dst": "0.0.0.0/0"}],
                                              "dataDir": str(self.root / "cni" / "ipam")}},
                # Docker's FORWARD policy is DROP: the firewall plugin accepts the pods' traffic.
                {"type": "firewall"},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=2))
        (self.root / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": self.ports.kubelet, "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports.kubelet_healthz, "readOnlyPort": 0,
            "cgroupDriver": "cgroupfs", "failSwapOn": False, "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca.cert)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [],
            "evictionHard": {"memory.available": "1%", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "resolvConf": "/etc/resolv.conf", "serializeImagePulls": False,
            "staticPodPath": "", "rotateCertificates": False, "serverTLSBootstrap": False,
            "podCIDR": POD_CIDR, "maxPods": 50,
        }, indent=2))

    def _start_node(self, parts: dict[str, Any], raw: dict[str, Any], kube: Path, ip: str,
                    env: dict[str, str]) -> None:
        self._write_node_config(ip, env)
        self._part(parts, "containerd", ["containerd", "--config", str(self.root / "containerd.toml")],
                   ready=lambda: self.containerd_socket.exists(), timeout=60)
        self._save(raw)
        self._part(parts, "kubelet", [
            str(kube / "kubelet"), "--config", str(self.root / "kubelet.yaml"),
            "--kubeconfig", str(self.root / "kubelet.kubeconfig"), "--hostname-override", NODE_NAME,
            "--node-ip", ip, "--root-dir", str(self.root / "kubelet"),
            "--cert-dir", str(self.root / "kubelet" / "pki"),
        ], ready=lambda: _http_ok(f"http://127.0.0.1:{self.ports.kubelet_healthz}/healthz"), timeout=120)
        self._save(raw)

    def _part(self, parts: dict[str, Any], name: str, argv: list[str], *, ready: Any, timeout: float,
              env: dict[str, str] | None = None) -> None:
        rec = parts.get(name)
        if rec and _alive(rec) and ready():
            return
        rec = _spawn(name, argv, self.logs / f"{name}.log", env=env)
        parts[name] = rec
        _wait_until(ready, timeout, name, rec)

    # -- Argo CD, core mode

    def argocd_module_dir(self, env: dict[str, str]) -> Path:
        """Argo CD's module source in the Go module cache: its manifests are applied as they are."""
        module = f"github.com/argoproj/argo-cd/v3@{env['ARGOCD_VERSION']}"
        go = shutil.which("go") or "/usr/local/go/bin/go"
        res = subprocess.run([go, "mod", "download", "-json", module],
                             cwd=PROJECT_ROOT / "cluster" / "argocd", capture_output=True, text=True, check=False,
                             timeout=600, env={**os.environ, "GOMODCACHE": env["GOMODCACHE"], "GOFLAGS": "-mod=mod"})
        if res.returncode:
            raise SandboxError(f"go mod download of Argo CD failed: {res.stderr.strip()[-500:]}")
        return Path(json.loads(res.stdout)["Dir"])

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        exe = PROJECT_ROOT / ".tools" / "bin" / "kubectl"
        res = subprocess.run([str(exe), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, check=False, timeout=timeout)
        if res.returncode:
            raise SandboxError(f"kubectl {' '.join(args[:3])} failed: {res.stderr.strip()[-1500:]}")
        return res.stdout

    def _apply_argocd_manifests(self, env: dict[str, str]) -> None:
        """From the module's core-install.yaml: the CRDs and the config Argo CD reads (argocd-cm,
        argocd-rbac-cm, argocd-cmd-params-cm, argocd-secret, ...), not its Deployments: core mode runs
        the repo-server and the application-controller as host processes here. Plus the `default`
        AppProject, which only argocd-server would create."""
        from ruamel.yaml import YAML

        yaml = YAML(typ="safe")
        src = self.argocd_module_dir(env) / "manifests" / "core-install.yaml"
        keep = [d for d in yaml.load_all(src.read_text())
                if isinstance(d, dict) and d.get("kind") in ("CustomResourceDefinition", "ConfigMap", "Secret")]
        for d in keep:
            if d["kind"] != "CustomResourceDefinition":
                d.setdefault("metadata", {})["namespace"] = "argocd"
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}}
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [ns, *keep]}))
        deadline = time.monotonic() + 60
        for crd in ("applications.argoproj.io", "appprojects.argoproj.io"):
            # Polled: `kubectl wait` errors out on a CRD whose status has no conditions yet.
            while not any(c.get("type") == "Established" and c.get("status") == "True" for c in
                          (json.loads(self.kubectl("get", "crd", crd, "-o", "json")).get("status") or {})
                          .get("conditions") or []):
                if time.monotonic() > deadline:
                    raise SandboxError(f"CRD {crd} was not established within 60 s")
                time.sleep(0.5)
        project = {"apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
                   "metadata": {"name": "default", "namespace": "argocd"},
                   "spec": {"sourceRepos": ["*"], "destinations": [{"namespace": "*", "server": "*"}],
                            "clusterResourceWhitelist": [{"group": "*", "kind": "*"}]}}
        self.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(project))

    def _start_argocd(self, parts: dict[str, Any], raw: dict[str, Any], env: dict[str, str]) -> None:
        argocd = Path(env["ARGOCD_BIN_DIR"])
        self._apply_argocd_manifests(env)
        self._part(parts, "redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(self.ports.redis),
                                    "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                   ready=lambda: self._tcp(self.ports.redis), timeout=30)
        self._save(raw)
        data = self.root / "argocd"
        for d in ("tls", "ssh", "gpg", "tmp"):
            (data / d).mkdir(parents=True, exist_ok=True)
        # As Argo CD's own e2e runs them: host processes, `https://kubernetes.default.svc` meaning the
        # cluster of KUBECONFIG; git and helm on PATH, and this build as `argocd` (git's askpass).
        common = {
            "KUBECONFIG": str(self.root / "argocd.kubeconfig"), "ARGOCD_FAKE_IN_CLUSTER": "true",
            "ARGOCD_GPG_ENABLED": "false", "ARGOCD_TLS_DATA_PATH": str(data / "tls"),
            "ARGOCD_SSH_DATA_PATH": str(data / "ssh"), "ARGOCD_GNUPGHOME": str(data / "gpg"),
            "TMPDIR": str(data / "tmp"),
            "PATH": os.pathsep.join([str(argocd), str(PROJECT_ROOT / ".tools" / "bin"), os.environ.get("PATH", "")]),
        }
        self._part(parts, "argocd-repo-server", [
            str(argocd / "argocd-repo-server"), "--address", "127.0.0.1", "--port", str(self.ports.repo_server),
            "--metrics-address", "127.0.0.1", "--metrics-port", str(self.ports.repo_server_metrics),
            "--redis", f"127.0.0.1:{self.ports.redis}", "--disable-tls", "--loglevel", "info",
        ], ready=lambda: self._tcp(self.ports.repo_server), timeout=60, env=common)
        self._save(raw)
        self._part(parts, "argocd-application-controller", [
            str(argocd / "argocd-application-controller"), "--namespace", "argocd",
            "--repo-server", f"127.0.0.1:{self.ports.repo_server}", "--repo-server-plaintext",
            "--redis", f"127.0.0.1:{self.ports.redis}", "--metrics-port", str(self.ports.controller_metrics),
            "--loglevel", "info",
        ], ready=lambda: _http_ok(f"http://127.0.0.1:{self.ports.controller_metrics}/metrics"), timeout=90,
            env=common)
        self._save(raw)

    # -- checks

    def _tcp(self, port: int) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _http_any(self, url: str) -> bool:
        """Anything listening with TLS at `url` (health endpoints that want authentication still answer)."""
        import ssl
        import urllib.error
        import urllib.request

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:  # noqa: S310
                return 200 <= r.status < 300
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def _kube_ok(self, path: str) -> bool:
        import ssl
        import urllib.request

        admin = self.pki.pair("admin")
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        try:
            with urllib.request.urlopen(f"{self.server}{path}", timeout=2, context=ctx) as r:  # noqa: S310
                return r.status == 200
        except OSError:
            return False

    # -- down, status

    def down(self) -> None:
        """Stop every recorded part, and leave the machine so that `up` works again: the pods' containers
        (containerd's shims outlive it), their network namespaces, mounts under the root, the CNI bridge
        and the iptables chains the CNI plugins made."""
        raw = self._load()
        parts = raw.get("parts", {})
        for name in ("argocd-application-controller", "argocd-repo-server", "redis", "kubelet"):
            rec = parts.pop(name, None)
            if rec:
                _stop(rec, timeout=15)
        if parts.get("containerd") and _alive(parts["containerd"]):
            self._remove_pods()
        rec = parts.pop("containerd", None)
        if rec:
            _stop(rec, timeout=15)
        self._clean_node()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            rec = parts.pop(name, None)
            if rec:
                _stop(rec, timeout=15)
        raw["parts"] = parts
        if self.state_file.exists():
            self._save(raw)

    def _ctr(self, *args: str) -> str:
        res = subprocess.run(["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
                             capture_output=True, text=True, check=False, timeout=60)
        return res.stdout

    def _remove_pods(self) -> None:
        for line in self._ctr("tasks", "ls", "-q").split():
            self._ctr("tasks", "kill", "--signal", "SIGKILL", line)
        deadline = time.monotonic() + 20
        while self._ctr("tasks", "ls", "-q").split() and time.monotonic() < deadline:
            time.sleep(0.5)
        for line in self._ctr("tasks", "ls", "-q").split():
            self._ctr("tasks", "delete", "--force", line)
        for line in self._ctr("containers", "ls", "-q").split():
            self._ctr("containers", "delete", line)

    def _clean_node(self) -> None:
        def run(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)

        # Mounts under our root (kubelet volumes, containerd snapshots), deepest first.
        mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
                  if ln.split()[1].startswith(str(self.root) + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            run("umount", "-l", m)
        ipam = self.root / "cni" / "ipam" / "delivery"
        # The pods' network namespaces (containerd names them cni-<uuid>) hold our bridge's veths.
        netns = Path("/var/run/netns")
        if netns.is_dir():
            for ns in netns.glob("cni-*"):
                run("ip", "netns", "delete", ns.name)
        run("ip", "link", "delete", "cni-delivery")
        # The bridge plugin's masquerade chains (CNI-<hash>), portmap's CNI-HOSTPORT-*, firewall's
        # CNI-FORWARD / CNI-ADMIN: rules that jump to them first, then the chains.
        for table in ("nat", "filter"):
            rules = run("iptables", "-t", table, "-S").stdout.splitlines()
            for r in rules:
                if r.startswith("-A ") and " -j CNI-" in r and not r.split()[1].startswith("CNI-"):
                    run("iptables", "-t", table, *shlex.split(r.replace("-A ", "-D ", 1)))
            chains = [r.split()[1] for r in rules if r.startswith("-N CNI-")]
            for c in chains:
                run("iptables", "-t", table, "-F", c)
            for c in chains:
                run("iptables", "-t", table, "-X", c)
        if ipam.exists():

            shutil.rmtree(ipam, ignore_errors=True)

    def stop_part(self, name: str, *, kill: bool = False) -> None:
        """Stop one running part, recorded by pid and start time: SIGKILL with `kill` (a crash), else
        SIGTERM (an orderly stop). For fault drills; `up(build_first=False)` starts it again."""
        rec = (self._load().get("parts") or {}).get(name)
        if not rec or not _alive(rec):
            raise SandboxError(f"{name} is not running on the real tier")
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(rec["pid"]), signal.SIGKILL)
        _stop(rec, timeout=15)

    def status(self) -> list[tuple[str, bool, str]]:
        raw = self._load()
        parts = raw.get("parts", {})
        rows = [(name, _alive(rec), f"pid {rec.get('pid')}") for name, rec in parts.items()]
        v = raw.get("versions", {})
        rows.append(("versions", bool(v), ", ".join(f"{k}={val}" for k, val in v.items())))
        return rows

    def reset(self) -> None:
        self.down()
        if self.root.exists():
            shutil.rmtree(self.root)


def cli(action: str) -> int:
    """`delivery sandbox <action> --real`; prints what it did and returns the exit code."""
    rc = RealCluster()
    if action == "up":
        raw = rc.up()
        print(f"real cluster up in {raw.get('up_seconds')} s ({rc.root})")
        print(f"  versions        {', '.join(f'{k}={v}' for k, v in raw.get('versions', {}).items())}")
        print(f"  kubernetes api  {rc.server}  (kubeconfig {rc.kubeconfig}: set DELIVERY_KUBECONFIG to it)")
        return 0
    if action == "status":
        rows = rc.status()
        for name, ok, detail in rows:
            print(f"{name:<32} {'running' if ok else 'stopped':<9} {detail}")
        return 0 if rows and all(ok for _, ok, _ in rows) else 1
    if action == "down":
        rc.down()
        print(f"real cluster down ({rc.root})")
        return 0
    rc.reset()
    print(f"real cluster reset ({rc.root} removed)")
    return 0
