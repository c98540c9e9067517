# syntax=docker/dockerfile:1
# The Ray image for the head and the (GPU) workers: Ray 2.60.0, CUDA PyTorch, this project with
# the `jobs` extra, so that a Ray job runs `python -m jobs train ...` with no runtime_env upload.
# Build from the repository root:  docker build -f docker/ray.Dockerfile -t topk-ray:0.1.0 .

# --- build: a wheel of this project (pure Python) --------------------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY topk ./topk
COPY jobs ./jobs
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: Ray's own CUDA image (Python 3.11, non-root user `ray`, uid 1000) --------------
FROM rayproject/ray:2.60.0-py311-cu128 AS runtime
LABEL org.opencontainers.image.title="topk-ray" \
      org.opencontainers.image.description="Ray 2.60.0 head/worker with CUDA PyTorch and the top-K training runtime" \
      org.opencontainers.image.version="0.1.0"
# torch and torchvision are the releases the test suite runs (see the Makefile); their Linux
# wheels on PyPI are CUDA builds. Ray itself comes with the base image; the jobs extra pins the
# same version, so pip keeps it.
COPY --from=build --chown=1000:100 /wheels /tmp/wheels
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
    && pip install --no-cache-dir "$(find /tmp/wheels -name 'topk_service-*.whl')[jobs]" \
    && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__" \
    && rm -rf /tmp/wheels
ENV PYTHONUNBUFFERED=1
USER 1000
WORKDIR /home/ray
# Dashboard (Jobs API) 8265, GCS 6379, Ray client 10001, metrics 8080.
EXPOSE 8265 6379 10001 8080
# Works on the head and on workers: asks the GCS of the node's cluster whether it is alive.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["ray", "health-check"]
