# syntax=docker/dockerfile:1
# elastic-ep on CPU: the controller, the stand-alone agent worker and the examples.
# From the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t elastic-ep:0.1.0-cpu .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU wheel first: a bare resolve of torch would fetch a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY elastic_ep /src/elastic_ep
COPY controller /src/controller
COPY loaders /src/loaders
RUN pip install --no-cache-dir "/src[nixl,mooncake]"

FROM python:3.11.11-slim-bookworm
# The Mooncake wheel links libibverbs and libnuma; security updates come with the base tag.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 elastic-ep \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/elastic-ep elastic-ep
COPY --from=build /opt/venv /opt/venv
COPY examples /opt/elastic-ep/examples
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/elastic-ep
# The controller's /metrics and /healthz (it listens on loopback unless told otherwise).
EXPOSE 9400
ENTRYPOINT ["elastic-ep"]
CMD ["--help"]
