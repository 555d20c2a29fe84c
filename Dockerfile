# syntax=docker/dockerfile:1
#
# One image for all three specpipe components (coordinator, draft worker, target worker); the Helm chart
# in deploy/helm/specpipe runs it with `serve coordinator|draft|target ...`.
#
#   CPU image (the default torch wheel):
#     docker build -t ghcr.io/specpipe/specpipe:0.1.0 .
#   CUDA image (what the chart pulls for device: cuda pods, tag + image.cudaTagSuffix):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t ghcr.io/specpipe/specpipe:0.1.0-cuda .
#
# The shipped demo model pair is installed with the package, at
#   /usr/local/lib/python${PYTHON_VERSION}/site-packages/specpipe/assets/demo-pair/{target,draft}
# (the chart's default model paths), so the image serves out of the box without a model volume.

ARG PYTHON_VERSION=3.11

# --- the specpipe wheel (pure Python; built apart so the source tree stays out of the final image) ---
FROM python:${PYTHON_VERSION}-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specpipe ./specpipe
COPY coordinator ./coordinator
COPY draft_service ./draft_service
COPY target_service ./target_service
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- the runtime image ---
FROM python:${PYTHON_VERSION}-slim
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
# https://download.pytorch.org/whl/cpu (default) or a CUDA index such as .../whl/cu128.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="specpipe" \
      org.opencontainers.image.description="Distributed speculative decoding: coordinator, draft and target workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/specpipe/specpipe"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# torch first, from the chosen wheel index, so the package's torch requirement is already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "import specpipe, coordinator, draft_service, target_service, grpc_health.v1.health_pb2, uvloop" \
    && test -f "/usr/local/lib/python${PYTHON_VERSION}/site-packages/specpipe/assets/demo-pair/target/config.json" \
    && test -f "/usr/local/lib/python${PYTHON_VERSION}/site-packages/specpipe/assets/demo-pair/draft/config.json"

# Non-root, no login shell, no home of its own: the chart runs it with a read-only root filesystem and an
# emptyDir at /tmp, where every cache below points.
RUN groupadd --system --gid 10001 specpipe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin specpipe

ENV HOME=/tmp \
    HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor \
    TRITON_CACHE_DIR=/tmp/triton \
    SPECPIPE_CACHE_DIR=/tmp/specpipe \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

USER 10001
WORKDIR /tmp
# coordinator, draft worker, target worker
EXPOSE 50051 50061 50062 8000

ENTRYPOINT ["specpipe"]
CMD ["serve"]
