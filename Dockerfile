FROM python:3.11-slim

# The versions uv.lock pins, installed by the uv that scripts/bootstrap.sh pins.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_NO_CACHE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv PATH=/app/.venv/bin:$PATH
WORKDIR /app
RUN useradd --create-home --uid 10001 app && pip install "uv==0.13.9"

# Dependencies first, in a layer of their own that a code change does not rebuild.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --no-editable
COPY alembic.ini ./
COPY backend ./backend
RUN uv sync --frozen --no-editable

USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
# SIGTERM lets in-flight requests finish; uvicorn then closes the pool via the lifespan.
# `python -m backend` is uvicorn's command line with a header-limited protocol (see the README).
CMD ["python", "-m", "backend", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--timeout-graceful-shutdown", "20"]
