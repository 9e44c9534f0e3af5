# popvault worker/beat image: `docker compose build`, or `docker build -t popvault .`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    POPVAULT_CONFIG=/etc/popvault/popvault.toml

# An unprivileged user owns the archive; the config is mounted read-only.
RUN useradd --system --uid 10001 --home-dir /var/lib/popvault --shell /usr/sbin/nologin popvault \
    && mkdir -p /var/lib/popvault /etc/popvault \
    && chown popvault:popvault /var/lib/popvault

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY workers ./workers
COPY schemas ./schemas
RUN pip install . && rm -rf /src

WORKDIR /var/lib/popvault
USER popvault
VOLUME ["/var/lib/popvault"]

# Overridden per service in docker-compose.yml (worker, beat).
CMD ["celery", "-A", "workers", "worker", "--loglevel", "info"]
