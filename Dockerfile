# One image for both services: `python -m api` (default) or `python -m worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY migrations ./migrations
COPY docs/flash-sale-demo.html ./docs/
RUN pip install . && useradd --system --uid 10001 app
USER app

ENV API_HOST=0.0.0.0 API_PORT=8000
EXPOSE 8000
CMD ["python", "-m", "api"]
