"""Certificates and kubeconfigs of the real-cluster tier: one CA, the apiserver's serving certificate,
the service-account key pair, and a client certificate per identity (admin, controller-manager,
scheduler, the node's kubelet), as kubeadm lays them out. Made once per cluster root; kept 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = dt.timedelta(days=3650)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


class Pki:
    """The cluster's PKI under `root` (`ca.crt`, `apiserver.crt`, `sa.key`, `<name>.crt`, ...)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def ca(self) -> Pair:
        return Pair(self.root / "ca.crt", self.root / "ca.key")

    def pair(self, name: str) -> Pair:
        return Pair(self.root / f"{name}.crt", self.root / f"{name}.key")

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def ensure(self, *, node_name: str, node_ip: str, service_ip: str) -> None:
        """Create whatever is missing; an existing CA is kept, so kubeconfigs stay valid across ups."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.ca.cert.exists():
            key = _key()
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "delivery-real-ca")])
            now = dt.datetime.now(dt.UTC)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + _VALID)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .sign(key, hashes.SHA256()))
            _write_private(self.ca.key, _pem_key(key))
            self.ca.cert.write_bytes(_pem_cert(cert))
        if not self.sa_key.exists():
            key = _key()
            _write_private(self.sa_key, _pem_key(key))
            self.sa_pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        ips = ["127.0.0.1", node_ip, service_ip]
        dns = ["localhost", node_name, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
               "kubernetes.default.svc.cluster.local"]
        self._issue("apiserver", "kube-apiserver", [], server=True, ips=ips, dns=dns)
        self._issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"])
        self._issue("admin", "delivery-admin", ["system:masters"])
        self._issue("controller-manager", "system:kube-controller-manager", [])
        self._issue("scheduler", "system:kube-scheduler", [])
        self._issue("kubelet", f"system:node:{node_name}", ["system:nodes"])
        self._issue("argocd", "delivery-argocd", ["system:masters"])

    def _issue(self, name: str, cn: str, groups: list[str], *, server: bool = False,
               ips: list[str] | None = None, dns: list[str] | None = None) -> None:
        pair = self.pair(name)
        if pair.cert.exists() and pair.key.exists():
            return
        ca_key = serialization.load_pem_private_key(self.ca.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                             *[x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]])
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALID)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        _write_private(pair.key, _pem_key(key))
        pair.cert.write_bytes(_pem_cert(cert))

    def kubeconfig(self, path: Path, *, server: str, user: str) -> Path:
        """A kubeconfig for identity `user` (a pair name above) against `server`, certificates inline."""
        pair = self.pair(user)

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "delivery-real",
            "clusters": [{"name": "delivery-real", "cluster": {
                "server": server, "certificate-authority-data": b64(self.ca.cert)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(pair.cert),
                                              "client-key-data": b64(pair.key)}}],
            "contexts": [{"name": "delivery-real", "context": {"cluster": "delivery-real", "user": user}}],
        }
        _write_private(path, json.dumps(doc, indent=2).encode())
        return path
