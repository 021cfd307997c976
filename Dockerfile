# syntax=docker/dockerfile:1
# userservice container image: a builder stage resolves the pinned dependencies into a
# virtualenv, the runtime stage copies only that virtualenv onto a clean slim base.
#
# Both stages must use the same base image: the virtualenv's scripts and symlinks point at
# that image's python3.11 (/usr/local/bin/python3.11 in the official one). For release builds
# pass a digest, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# Every runtime dependency (grpcio, uvloop, asyncpg, cryptography, ...) ships manylinux
# wheels for CPython 3.11 on amd64 and arm64, so the builder needs no compiler or apt
# packages; it exists to keep pip's work, the sources and build metadata out of the image.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /build
# pyproject.toml names README.md as the package readme and LICENSE as its license file, so the
# build needs them too.
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY src ./src

# constraints.txt pins the whole dependency tree, so the image matches what CI tested.
# A regular (non-editable) install: the runtime image carries no source tree. dumb-init (PID 1,
# below) comes as a wheel with its static binary, pinned in constraints.txt like the rest, so
# the image needs no apt-get and no download outside the package index. The otel extra is in:
# setting OTEL_TRACES_EXPORTER (README "Traces") then needs no other image.
RUN /opt/venv/bin/pip install --no-cache-dir --constraint constraints.txt '.[otel]' dumb-init \
    && /opt/venv/bin/userservice --help > /dev/null \
    && /opt/venv/bin/dumb-init --version


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="userservice" \
      org.opencontainers.image.description="Reference gRPC microservice: user.v1.UserService"

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# volume ownership (fsGroup) lines up across image rebuilds.
RUN groupadd --system --gid 10001 userservice \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin userservice \
    && mkdir -p /var/lib/userservice \
    && chown 10001:10001 /var/lib/userservice

COPY --from=builder /opt/venv /opt/venv

# PYTHONUNBUFFERED: JSON log lines reach the container log as they are written.
# PYTHONDONTWRITEBYTECODE: pip already compiled the .pyc files; the root filesystem is
# read-only in Kubernetes, so nothing should try to write more.
# The SQLite default lives on a volume so a plain `docker run` keeps its data writable;
# Kubernetes sets USERSERVICE_DATABASE_URL to PostgreSQL instead.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USERSERVICE_LISTEN_ADDRESS=[::]:50051 \
    USERSERVICE_METRICS_ADDRESS=[::]:9090 \
    USERSERVICE_DATABASE_URL=sqlite:////var/lib/userservice/userservice.db

VOLUME ["/var/lib/userservice"]
WORKDIR /var/lib/userservice
USER 10001:10001

# 50051: gRPC (h2c, or TLS when USERSERVICE_TLS_* is set). 50052: the plaintext health-only
# probe listener (when USERSERVICE_PROBE_ADDRESS is set). 9090: Prometheus /metrics.
EXPOSE 50051 50052 9090

# PID 1 is dumb-init: it forwards SIGTERM (and every other signal) to the server, which runs
# its own sequence (NOT_SERVING, drain, graceful stop, exit 0), exits with the server's code,
# and reaps orphaned processes, which the kernel leaves to PID 1 and Python never waits for.
# CMD is the subcommand, so `docker run IMAGE migrate` or a Job's `args: ["migrate"]` run the
# other subcommands under the same init.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dumb-init", "--", "userservice"]
CMD ["serve"]
