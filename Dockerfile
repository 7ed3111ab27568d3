# ptserve on a CUDA PyTorch base. Build:   docker build -t ptserve .
# Run:    docker run --gpus all -p 8000:8000 -v hf-cache:/cache -e HF_TOKEN ptserve
# Config: mount a file over /app/config.yaml (-v $PWD/config.yaml:/app/config.yaml:ro) or set
#         PTSERVE_<SECTION>_<KEY> variables (-e PTSERVE_QUANTIZATION_MODE=4bit).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache \
    PTSERVE_SERVER_HOST=0.0.0.0 \
    PTSERVE_SERVER_PORT=8000

RUN useradd --create-home --uid 1000 ptserve \
    && mkdir -p /app /cache \
    && chown ptserve:ptserve /app /cache
WORKDIR /app

# Dependencies first (the base image's torch satisfies torch>=2.4 and is kept), then the code.
COPY --chown=ptserve:ptserve pyproject.toml README.md ./
COPY --chown=ptserve:ptserve ptserve ./ptserve
RUN pip install --no-cache-dir .
COPY --chown=ptserve:ptserve server.py config.yaml ./

USER ptserve
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:${PTSERVE_SERVER_PORT}/health', timeout=4)" || exit 1
CMD ["python", "server.py", "--config", "/app/config.yaml"]
