# GPU image for metaopt clusters: Ray's own CUDA image + torch + this package with GPU JAX.
#
#   docker build -t YOUR_REGISTRY/metaopt:gpu .     # from the repo root
#   docker push YOUR_REGISTRY/metaopt:gpu           # then name it under `docker.image` in cluster.yaml
#
# Tags follow {ray version}-py{XY}-{cpu|gpu|cuXXX}; `-gpu` aliases Ray's default CUDA build. Keep the Ray
# version equal to the one the submitting machine runs: the Jobs API and token auth expect matching versions.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/metaopt

# torch first, in its own layer: it is the biggest download and changes least. PyPI's Linux x86_64
# wheel is the CUDA build (it pulls the matching nvidia-* runtime wheels), so no extra index is needed.
RUN pip install --no-cache-dir "torch==2.13.0"

# Only what `pip install .` needs, so edits to tests or docs do not invalidate the install layer.
COPY --chown=ray:users pyproject.toml README.md constraints.txt ./
COPY --chown=ray:users platform ./platform
# Every capability's extras plus `gpu` (jax[cuda12]) at the versions CI tests; Ray is already in the base image at
# the pinned version.
RUN pip install --no-cache-dir -c constraints.txt ".[all,gpu]"

COPY --chown=ray:users experiments ./experiments
