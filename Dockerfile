# syntax=docker/dockerfile:1
# Three images from one file:
#   docker build --target operator -t seedfork/operator:0.1.0 .   (slim: no torch)
#   docker build --target agent    -t seedfork/agent:0.1.0 .      (CUDA torch + Mooncake TransferEngine)
#   docker build --target vllm     -t seedfork/vllm:0.32.0 .      (vLLM's image + seedfork's model loader)
# The operator and the agent run as the unprivileged user 10001, matching the chart's securityContext.
# The torch wheel on PyPI carries its own CUDA runtime (cu13x), so the agent needs no CUDA
# base image: only the host's NVIDIA driver, mounted by the container runtime.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The vLLM release seedfork's loader is tested against (README, "vLLM").
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 seedfork \
 && useradd --system --uid 10001 --gid seedfork --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin seedfork

# ---- build: one virtual environment per image, copied whole into the runtime stage ----
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
COPY agent/ agent/
COPY localdev/ localdev/

FROM source AS build-operator
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir /src

FROM source AS build-agent
# Mooncake's CUDA 13 build of TransferEngine (nvlink_intra, rdma, tcp) matches torch's cu13 runtime.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "/src[agent]" "mooncake-transfer-engine-cuda13==0.3.14"

# ---- operator: kopf + kubernetes client, nothing else ----
FROM base AS operator
COPY --from=build-operator /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["seedfork-operator"]

# ---- agent: runs in every engine pod, moves the weights GPU-to-GPU ----
FROM base AS agent
# RDMA user-space libraries for TransferEngine's rdma transport, and libnuma it links against
# (versions of Debian bookworm, the base image's release). gcc and the C library headers: Triton builds
# its small launcher for the GPU checksum kernel with them at the first launch (without them the agent
# still verifies, with torch reductions at a tenth of the speed); libc6-dev must be the base's libc6.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libibverbs1=44.0-2 librdmacm1=44.0-2 ibverbs-providers=44.0-2 libnuma1=2.0.16-1 \
      gcc=4:12.2.0-3 libc6-dev="$(dpkg-query -W -f='${Version}' libc6)" \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-agent /opt/venv /opt/venv
# Let TransferEngine find the CUDA runtime that the torch wheel brought along. Triton's kernel cache goes
# to /tmp: the user has no home directory.
ENV PATH=/opt/venv/bin:${PATH} \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib \
    TRITON_CACHE_DIR=/tmp/triton-cache \
    TRITON_HOME=/tmp
USER 10001:10001
EXPOSE 18080
ENTRYPOINT ["seedfork-agent"]

# ---- vllm: vLLM's own image with seedfork installed, for `engine.kind: vllm` sets ----
# Only seedfork's Python packages: the image already has torch, httpx and pydantic, and vLLM keeps its own
# pins. The package's `vllm.general_plugins` entry point registers `--load-format seedfork` in every vLLM
# process. The user stays vLLM's.
FROM ${VLLM_IMAGE} AS vllm
COPY --from=source /src /tmp/seedfork-src
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/seedfork-src \
 && rm -rf /tmp/seedfork-src
