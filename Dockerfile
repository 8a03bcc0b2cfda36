# syntax=docker/dockerfile:1
# The comms engine image: one image, three roles (`serve --role api|worker|all`).
#   docker build -t comms-engine .
#   docker run -p 8080:8080 --env-file prod.env comms-engine serve --role api
# The build stage installs the package into a virtualenv; the final stage copies only that
# virtualenv onto a fresh slim base, so no compiler, pip cache or source tree ships.

# An exact patch release, so a rebuild does not move to another Python. To pin the very bytes, set the digest
# too (docs/deploying.md, "Reproducible builds"): --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/comms \
    PATH=/opt/comms/bin:$PATH
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"
# The locked dependency set first (its own layer: a code change does not reinstall it). Every file is checked
# against the lock's hashes and nothing outside the lock is resolved (--no-deps); `make lock` refreshes it.
COPY requirements/runtime.lock ./requirements/runtime.lock
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/runtime.lock
# Then the package itself, built with the locked setuptools (no isolated build env fetching its own).
COPY pyproject.toml README.md ./
COPY service ./service
COPY consumers ./consumers
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && python -m compileall -q "$VIRTUAL_ENV"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ai-multi-comms-engine" \
      org.opencontainers.image.description="AI-written WhatsApp, SMS and email conversations over SQS and DynamoDB"
# ca-certificates for TLS to AWS, OpenAI, Twilio and SendGrid; the Debian package version floats with
# the base image's security updates, which is what a rebuild should pick up.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 comms \
    && useradd --system --uid 10001 --gid comms --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin comms
COPY --from=build /opt/comms /opt/comms
ENV PATH=/opt/comms/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COMMS_HOST=0.0.0.0 \
    COMMS_PORT=8080
# The root filesystem may be mounted read-only: nothing is written outside /tmp.
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
# Liveness only: /healthz never touches AWS, so a slow dependency does not mark the container unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('COMMS_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["comms"]
CMD ["serve", "--role", "all"]
