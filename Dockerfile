# syntax=docker/dockerfile:1
# cxr-serve image: build wheels in one stage, run as a non-root user in a slim one.
#   docker build -t cxr-serve .
#   docker run -p 8000:8000 -v /path/to/best.ckpt:/models/model.ckpt:ro cxr-serve
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cxr ./cxr
COPY serve ./serve
COPY configs ./configs
# CPU-only torch keeps the image small; everything else resolves from PyPI.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" torchvision \
 && /opt/venv/bin/pip install .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=2
# libgl/libglib: OpenCV (albumentations) at import time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1=* libglib2.0-0=* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /app --shell /usr/sbin/nologin cxr \
 && mkdir -p /app /models /var/log/cxr \
 && chown cxr:cxr /app /var/log/cxr
COPY --from=build /opt/venv /opt/venv
# The sources sit in /app (root-owned, read-only to the service) and shadow the installed copy via
# PYTHONPATH, so cxr.config finds /app/configs exactly as in a checkout.
COPY --from=build /src/cxr /app/cxr
COPY --from=build /src/serve /app/serve
COPY --from=build /src/configs /app/configs
ENV PYTHONPATH=/app
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=10).status == 200 else 1)"]
ENTRYPOINT ["cxr-serve"]
# ONNX Runtime and two /predict workers: the fastest measured setting on 2 CPU cores
# (benchmarks/serve_results.md); on a bigger box raise server.predict_workers.
CMD ["ckpt_path=/models/model.ckpt", "server.host=0.0.0.0", "server.port=8000", "server.backend=onnx", "server.predict_workers=2", "server.audit_log=/var/log/cxr/audit.jsonl", "hydra.run.dir=/tmp/cxr-serve", "paths.cache_dir=/tmp/cxr-cache"]
