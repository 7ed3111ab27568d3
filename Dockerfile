# ptserve on Python 3.11 with PyPI's CUDA build of the tested torch (2.13.0, pinned in docker/constraints.txt).
# The NVIDIA container toolkit (--gpus all) brings the driver; the CUDA libraries come with torch's wheels.
# Build:  docker build -t ptserve .
# Run:    docker run --gpus all -p 8000:8000 -v hf-cache:/cache -e HF_TOKEN ptserve
# Config: a volume at /config holds config.yaml (-v $PWD/my-config:/config), or set PTSERVE_<SECTION>_<KEY>
#         variables (-e PTSERVE_QUANTIZATION_MODE=4bit). Model downloads go to the /cache volume.
# Checked with hadolint in `make test`; tests/test_deploy.py runs this file's CMD and HEALTHCHECK.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache \
    PTSERVE_SERVER_HOST=0.0.0.0 \
    PTSERVE_SERVER_PORT=8000

RUN useradd --create-home --uid 1000 ptserve \
    && mkdir -p /app /cache /config \
    && chown 1000:1000 /app /cache /config
WORKDIR /app

# Dependencies first, pinned (torch included: the version the tests ran), then the code.
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 docker/constraints.txt ./docker/constraints.txt
COPY --chown=1000:1000 ptserve ./ptserve
RUN pip install --no-cache-dir -c docker/constraints.txt .
COPY --chown=1000:1000 server.py ./
COPY --chown=1000:1000 config.yaml /config/config.yaml

USER 1000:1000
VOLUME ["/cache", "/config"]
EXPOSE 8000
# Kubernetes and docker stop send SIGTERM: in-flight requests get server.shutdown_timeout_s (30 s) to finish.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PTSERVE_SERVER_PORT', '8000'), timeout=4)"]
CMD ["python", "server.py", "--config", "/config/config.yaml"]
