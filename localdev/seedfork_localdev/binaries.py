"""Build the control-plane binaries from the Go module proxy, once, and cache them.

kube-apiserver and etcd are not packaged anywhere we can install from, so small
wrapper modules of our own (``tools/<name>/``) import the upstream commands and
``go build`` them. helm and kubeconform are plain ``go install pkg@version``.
Each binary lands in ``$SEEDFORK_CACHE/bin/<name>-<version>-<hash of its
wrapper module>``, so a warm run finds it and a change of version rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"


@dataclass(frozen=True)
class GoTool:
    name: str
    version: str
    module_dir: str | None = None  # a wrapper module under the repo, built with `go build`
    package: str | None = None  # or a package built with `go install package@version`
    ldflags: list[str] = field(default_factory=list)

    def key(self) -> str:
        digest = hashlib.sha256(self.version.encode())
        if self.module_dir:
            for name in ("go.mod", "go.sum", "main.go"):
                path = REPO / self.module_dir / name
                if path.exists():
                    digest.update(path.read_bytes())
        return f"{self.name}-{self.version}-{digest.hexdigest()[:10]}"


TOOLS = {
    "kube-apiserver": GoTool(
        "kube-apiserver",
        KUBE_VERSION,
        module_dir="tools/kube-apiserver",
        ldflags=[
            f"-X k8s.io/component-base/version.gitVersion={KUBE_VERSION}",
            "-X k8s.io/component-base/version.gitMajor=1",
            f"-X k8s.io/component-base/version.gitMinor={KUBE_VERSION.split('.')[1]}",
        ],
    ),
    "etcd": GoTool("etcd", ETCD_VERSION, module_dir="tools/etcd"),
    "helm": GoTool("helm", "v3.22.0", package="helm.sh/helm/v3/cmd/helm"),
    "kubeconform": GoTool("kubeconform", "v0.8.0", package="github.com/yannh/kubeconform/cmd/kubeconform"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SEEDFORK_CACHE", Path.home() / ".cache" / "seedfork"))


def binary_path(name: str) -> Path:
    return cache_dir() / "bin" / TOOLS[name].key()


def ensure(name: str) -> Path:
    """The path of a built binary; builds it on first use. ``SEEDFORK_<NAME>`` overrides."""
    override = os.environ.get("SEEDFORK_" + name.upper().replace("-", "_"))
    if override:
        return Path(override)
    target = binary_path(name)
    if target.exists():
        return target
    tool = TOOLS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"building {name} {tool.version} from the Go module proxy (once; cached in {target.parent})",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    ldflags = " ".join(["-s", "-w", *tool.ldflags])
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / name
        if tool.module_dir:
            cmd = ["go", "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(out), "."]
            subprocess.run(cmd, cwd=REPO / tool.module_dir, env=env, check=True)
        else:
            env["GOBIN"] = tmp
            cmd = ["go", "install", "-trimpath", f"-ldflags={ldflags}", f"{tool.package}@{tool.version}"]
            subprocess.run(cmd, env=env, check=True)
        shutil.move(str(out), target)
    return target


def main(argv: list[str]) -> int:
    for name in argv or ["kube-apiserver", "etcd"]:
        print(ensure(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
