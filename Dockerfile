# charstream serving image: onnxruntime + FastAPI/uvicorn + the service and exports packages.
# No torch, no compilers, non-root, one port, a health check, settings from CHARSTREAM_*.
#
#   docker build -t charstream .                                   # with network access
#   docker build --build-arg BASE_IMAGE=localhost/python:3.11-slim -t charstream .   # offline, with wheelhouse/
#
# Python packages install from the hashed locks in requirements/ (exact versions, --require-hashes,
# --no-deps): the serving stage from serve.txt, the training stage from train.txt. When wheelhouse/
# holds wheels, they install from it alone (--no-index); otherwise from the package index, and
# PyTorch's CPU build (the lock's torch==...+cpu) from PyTorch's own wheel page.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the serving side's locked requirements ----------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY requirements/serve.txt ./requirements.txt
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/venv \
 && if ls /wheelhouse/*.whl > /dev/null 2>&1; then FROM_WHEELS="--no-index --find-links /wheelhouse"; fi \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
      $FROM_WHEELS -r requirements.txt \
 && /opt/venv/bin/pip check \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime venv: the same, without the installer ---------------------------------------------
FROM build AS venv
RUN /opt/venv/bin/pip uninstall -q -y pip setuptools

# ---- train: torch (CPU build) for `docker compose --profile train run train ...` ---------------
FROM ${BASE_IMAGE} AS train
WORKDIR /src
COPY requirements/train.txt ./requirements.txt
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/venv \
 && if ls /wheelhouse/*.whl > /dev/null 2>&1; then FROM_WHEELS="--no-index --find-links /wheelhouse"; \
    else FROM_WHEELS="--find-links https://download.pytorch.org/whl/cpu/torch/"; fi \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
      $FROM_WHEELS -r requirements.txt \
 && /opt/venv/bin/pip check
# The training side only: `charstream` imports the side of the sub-command it runs.
COPY training/ /app/training/
COPY exports/ /app/exports/
COPY interpret/ /app/interpret/
COPY charstream_cli.py /app/
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1
WORKDIR /work
ENTRYPOINT ["python", "-m", "charstream_cli"]

# ---- runtime: the serving image --------------------------------------------------------------
FROM ${BASE_IMAGE} AS serve
# /state keeps the API key the first start makes (CHARSTREAM_API_KEY_FILE), owned by the server's
# user so that a fresh volume mounted there is writable too.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin charstream \
    && install -d -o charstream -g charstream /state
COPY --from=venv /opt/venv /opt/venv
COPY exports/ /app/exports/
COPY service/ /app/service/
COPY charstream_cli.py /app/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHARSTREAM_HOST=0.0.0.0 \
    CHARSTREAM_PORT=8000 \
    CHARSTREAM_MODELS_DIR=/app/exports \
    CHARSTREAM_API_KEY_FILE=/state/api-key
USER charstream
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHARSTREAM_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "service"]
