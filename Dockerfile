# bnfold, CPU (default) or CUDA, from this one file (BuildKit builds only the stages needed):
#
#   docker build -t bnfold:0.1.0 .                                  # CPU: onnxruntime
#   docker build --build-arg DEVICE=cuda -t bnfold:0.1.0-cuda .     # CUDA 13 + cuDNN 9: onnxruntime-gpu
#   docker build --target build -t bnfold-convert:0.1.0 .           # the converter, for `bnfold convert`
#
# Stages:
#   build         bnfold[convert] with the CPU build of torch: builds the bnfold wheel
#                 and the default repository (the four digits models, converted)
#   runtime-cpu   a slim Python                  } a base with a Python and an
#   runtime-cuda  NVIDIA's CUDA + cuDNN runtime  } empty virtual environment
#   runtime       runtime-${DEVICE} + the serving dependencies (pyproject's base list,
#                 no torch) + the wheel + the repository in /models; the image you run
#
# deploy/runtime-requirements.py turns pyproject.toml into the lists pip installs
# here; tests/test_deploy_runtime.py installs the runtime list the same way into a
# fresh virtual environment and serves the repository with this file's ENTRYPOINT,
# CMD and ENV.

ARG DEVICE=cpu

# Pinned by the tag's multi-architecture index digest (the base cannot change under
# a rebuild); the tag says which Python it is.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS python-base


FROM python-base AS build
# torch from the CPU index: PyPI's Linux torch pulls several GB of CUDA libraries,
# and the converter needs none of them. The PyPI index supplies everything else.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
# Dependencies before code: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
COPY deploy/runtime-requirements.py deploy/
RUN python deploy/runtime-requirements.py --extra convert > /tmp/convert-requirements.txt \
    && grep -E '^torch([^a-z0-9._-]|$)' /tmp/convert-requirements.txt > /tmp/torch-requirement.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch-requirement.txt \
    && pip install -r /tmp/convert-requirements.txt
COPY README.md ./
COPY core/ core/
COPY convert/ convert/
COPY models/ models/
COPY service/ service/
RUN pip wheel --no-deps --wheel-dir /dist . \
    && pip install --no-deps /dist/bnfold-*.whl
# Train (seconds, weights cached in this stage only) and convert the digits models.
RUN bnfold models build --repository /opt/bnfold/repository
# Converting your own model here: mount it and a repository, e.g.
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" bnfold-convert:0.1.0 \
#       bnfold convert net.py:build --input-shape 1,3,32,32 --repository repo
WORKDIR /work
CMD ["bnfold", "--help"]


FROM python-base AS runtime-cpu
RUN python -m venv /opt/venv


# onnxruntime-gpu from PyPI (1.31 when this was written) is built against CUDA 13
# and cuDNN 9: this image brings those libraries. Check the CUDA/cuDNN table of
# onnxruntime's CUDA execution provider before moving either. Ubuntu's Python (3.12)
# runs bnfold; the driver comes from the host (NVIDIA Container Toolkit).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS runtime-cuda
# DL3008: no apt version pins. The base tag fixes the release; Ubuntu keeps only the
# latest update of a package, so a pinned version would break the build at its next
# security fix.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv


# DL3006: not an image but one of the two stages above, picked by --build-arg DEVICE.
# hadolint ignore=DL3006
FROM runtime-${DEVICE} AS runtime
ARG DEVICE
LABEL org.opencontainers.image.title="bnfold" \
      org.opencontainers.image.description="BatchNorm-folded ONNX models served over the KServe V2 protocol" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin bnfold
# The serving dependencies: pyproject's base list, onnxruntime-gpu for cuda. No torch.
COPY pyproject.toml deploy/runtime-requirements.py /tmp/deps/
RUN python /tmp/deps/runtime-requirements.py --device "${DEVICE}" /tmp/deps/pyproject.toml \
        > /tmp/deps/runtime-requirements.txt \
    && pip install -r /tmp/deps/runtime-requirements.txt \
    && rm -rf /tmp/deps
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/bnfold-*.whl && rm -rf /tmp/dist
COPY deploy/healthcheck.py /opt/bnfold/healthcheck.py
# Owned by root, read-only to the app user: the service never writes into a repository
# (packages are untrusted input it only reads, after checking their hashes).
COPY --from=build /opt/bnfold/repository /models
# Every `bnfold serve` option is a BNFOLD_* variable; `docker run -e` overrides these.
# The drain window plus the shutdown grace stay under `docker stop`'s 10 s before SIGKILL
# (a longer `docker stop -t` / compose `stop_grace_period` allows longer ones).
ENV BNFOLD_REPOSITORY=/models \
    BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_GRPC_PORT=8001 \
    BNFOLD_DEVICE=auto \
    BNFOLD_DRAIN_SECONDS=3 \
    BNFOLD_SHUTDOWN_GRACE_SECONDS=6
# Mount your own repository (REPO/NAME/VERSION packages) here.
VOLUME ["/models"]
USER 10001:10001
# A working directory of its own: nothing the server does depends on it, and no
# relative path can land in / (packages never read relative to it: external data
# comes from the package's own hashed files).
WORKDIR /opt/bnfold
# REST (KServe V2 HTTP), then gRPC (KServe V2 GRPCInferenceService), as Triton's ports.
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/bnfold/healthcheck.py"]
# Exec form: bnfold is PID 1 and gets SIGTERM itself; it reports not-ready and keeps
# answering for BNFOLD_DRAIN_SECONDS, then stops accepting, lets in-flight requests
# finish (BNFOLD_SHUTDOWN_GRACE_SECONDS) and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bnfold"]
CMD ["serve"]
