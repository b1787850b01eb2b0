# The core (FastAPI + FastStream) for docker-compose. Settings come from APP_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/srv/swarm

# A fixed uid: the compose `pki` init service hands the CA and core keys to it.
RUN groupadd --gid 10001 swarm && useradd --uid 10001 --gid swarm --no-create-home --shell /usr/sbin/nologin swarm

WORKDIR /srv/swarm
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml alembic.ini ./
COPY alembic ./alembic
COPY app ./app
COPY swarm_device ./swarm_device

USER swarm
EXPOSE 8000
CMD ["uvicorn", "app.main:create_app_from_env", "--factory", "--host", "0.0.0.0", "--port", "8000", "--loop", "uvloop", "--http", "httptools"]
