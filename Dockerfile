# pocketgpt: trainer + server in one image.
#
#   docker build -t pocketgpt .                      # CUDA-enabled torch from PyPI (default)
#   docker build -t pocketgpt --build-arg TORCH_SPEC=/tmp/deps/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl .
#       ^ a local wheel put in deploy/wheels/ (git-ignored) is copied to /tmp/deps/ in the deps stage
#   docker build -t pocketgpt --build-arg TORCH_SPEC=torch --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The image runs `python -m server` (0.0.0.0:8000) on /data/checkpoints/default;
# `python -m training.pretrain` writes there by default (see docker-compose.yml).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------- dependencies stage
FROM ${BASE_IMAGE} AS deps

# What pip installs for torch: a requirement or a path to a wheel. The default is
# PyPI's Linux wheel, which is CUDA-enabled (and falls back to CPU at run time).
ARG TORCH_SPEC="torch>=2.10,<3"
# Optional extra index for torch only (e.g. https://download.pytorch.org/whl/cpu).
ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only pyproject.toml (and local wheels) reach this stage, so it is rebuilt only
# when they change. `deploy/wheels*` matches the optional, git-ignored
# deploy/wheels/ folder, whose files land in /tmp/deps/; when it does not exist
# only pyproject.toml is copied.
WORKDIR /tmp/deps
COPY pyproject.toml deploy/wheels* /tmp/deps/
RUN set -eu; \
    echo "$TORCH_SPEC" > torch-requirements.txt; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --extra-index-url "$TORCH_INDEX_URL" -r torch-requirements.txt; \
    else \
        pip install -r torch-requirements.txt; \
    fi; \
    python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > requirements.txt; \
    pip install -r requirements.txt "setuptools>=77"; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------- runtime stage
FROM ${BASE_IMAGE}

ARG UID=10001
ARG GID=10001

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POCKETGPT_HOST=0.0.0.0 \
    POCKETGPT_PORT=8000 \
    POCKETGPT_CHECKPOINT=/data/checkpoints/default \
    POCKETGPT_OUT_DIR=/data/checkpoints/default

# A non-root user with a fixed numeric UID/GID that owns the checkpoint folder
# (a named volume mounted there starts with this ownership).
RUN groupadd --gid "${GID}" pocketgpt \
 && useradd --uid "${UID}" --gid "${GID}" --no-create-home --home-dir /app \
      --shell /usr/sbin/nologin pocketgpt \
 && mkdir -p /app /data/checkpoints /data/text \
 && chown -R "${UID}:${GID}" /app /data

# The dependencies (large layer, cached until pyproject.toml changes) ...
COPY --from=deps /opt/venv /opt/venv

# ... then the package itself (small layers, rebuilt on every source change).
COPY pyproject.toml README.md* /tmp/src/
COPY model /tmp/src/model
COPY training /tmp/src/training
COPY server /tmp/src/server
WORKDIR /app
RUN pip install --no-deps --no-build-isolation /tmp/src \
 && rm -rf /tmp/src \
 && python -c "import model, training.pretrain, server.__main__"

USER ${UID}:${GID}

EXPOSE 8000

# No curl in the image: the check is a few lines of Python.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('POCKETGPT_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "server"]
