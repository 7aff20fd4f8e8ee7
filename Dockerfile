# syntax=docker/dockerfile:1
# One image, two targets:
#   api     the web process: FastAPI + Celery client, no torch (small, starts fast)
#   worker  the api layers plus the `worker` extra (torch, image readers): one GPU per container
# Build: docker build --target api -t tessera-api .   /   docker build --target worker -t tessera-worker .

FROM python:3.11-slim AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TESSERA_DATA_DIR=/data \
    TESSERA_HOST=0.0.0.0 \
    TESSERA_PORT=8000
# A fixed, unprivileged user; /data belongs to it, so a fresh named volume inherits that owner.
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid tessera --home-dir /app --no-create-home --shell /usr/sbin/nologin tessera \
    && mkdir -p /data \
    && chown tessera:tessera /data
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY backend ./backend
COPY worker ./worker
COPY migrations ./migrations
COPY frontend ./frontend
# Editable install: the code finds migrations/ and frontend/ next to itself in /app.
# No extras here: the web image must never contain torch.
RUN pip install -e .
USER tessera
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "uvicorn", "--factory", "backend.main:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--timeout-graceful-shutdown", "10", "--no-access-log"]

FROM api AS worker
USER root
RUN pip install -e '.[worker]'
USER tessera
HEALTHCHECK NONE
# Concurrency 1: each worker container owns one GPU and trains one task at a time;
# scale out with `docker compose up --scale worker=N`. It reads every queue: trainings
# (tessera.training), plans (celery) and the short jobs such as dataset validation (tessera.light).
CMD ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "--concurrency", "1", \
     "--loglevel", "INFO", "--hostname", "tessera@%h", "--queues", "celery,tessera.light,tessera.training"]
