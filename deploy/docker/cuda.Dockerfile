# syntax=docker/dockerfile:1
# elastic-ep for GPU ranks: CUDA torch (NCCL for the torch transport, GPU memory for
# NIXL and Mooncake). The GPU driver comes from the node (NVIDIA container toolkit).
# From the repository root:
#   docker build -f deploy/docker/cuda.Dockerfile -t elastic-ep:0.1.0-cuda .

FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyPI's torch wheel for Linux x86_64 is the CUDA build; it brings its CUDA libraries.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md /src/
COPY elastic_ep /src/elastic_ep
COPY controller /src/controller
COPY loaders /src/loaders
RUN pip install --no-cache-dir "/src[nixl,mooncake]"

FROM nvidia/cuda:12.8.1-base-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# The Mooncake wheel links libibverbs and libnuma; security updates come with the base tag.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libibverbs1 libnuma1 \
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
EXPOSE 9400
ENTRYPOINT ["elastic-ep"]
CMD ["--help"]
