# syntax=docker/dockerfile:1
# The API image: the FastAPI job server and the `topk` client, without torch.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t topk-api:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: a wheel of this project and a virtualenv with the service extra only -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY topk ./topk
COPY jobs ./jobs
COPY service ./service
COPY docker/extra_requirements.py docker/api-constraints.txt ./docker/
# The core dependencies of the project include torch, which the API never imports: install the
# project with --no-deps and then exactly the `service` extra read from pyproject.toml, at the
# versions locked in docker/api-constraints.txt.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "pip==26.3" \
    && python docker/extra_requirements.py service > /tmp/service-requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/service-requirements.txt \
        -c docker/api-constraints.txt \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
    && if /opt/venv/bin/pip show torch >/dev/null 2>&1; then echo "torch leaked into the API image" >&2; exit 1; fi

# --- runtime: the virtualenv on a clean slim base, as a non-root user -----------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="topk-api" \
      org.opencontainers.image.description="Top-K training service: FastAPI job server and CLI (no torch)" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 topk \
    && useradd --system --uid 10001 --gid topk --home-dir /home/topk --create-home topk
COPY --from=build /opt/venv /opt/venv
# TOPK_DATA_DIR points into /tmp: the Kubernetes pod runs with a read-only root filesystem and a
# writable emptyDir there; production state lives in Postgres and object storage.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOPK_DATA_DIR=/tmp/topk \
    TOPK_HOST=0.0.0.0 \
    TOPK_PORT=8000
USER 10001:10001
WORKDIR /home/topk
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOPK_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["topk"]
CMD ["serve"]
