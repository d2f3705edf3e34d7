# The trainer's image for GPU clusters: NVIDIA's NGC PyTorch container (CUDA, cuDNN, NCCL and the
# torch build NVIDIA tunes for them) plus this project and its Python dependencies. It is what a
# cluster profile's pyxis `container_image` points at (configs/clusters/h100_example.yaml); the
# batch script and the launcher stay on the host. README.md, Container.
#
#   docker build -t bionemo-hpc:latest .                       # or: make docker
#   docker build -t bionemo-hpc:latest --build-arg MEGATRON=1 .  # + megatron-core (train.engine=megatron)
#   enroot import -o /lustre/fsw/bionemo/images/bionemo-hpc.sqsh dockerd://bionemo-hpc:latest
#
# Choose the NGC release that matches your driver (its CUDA version): --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# 1: also install megatron-core, the megatron engine's dependency (pyproject.toml extra `megatron`)
ARG MEGATRON=0

# (PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system's; installing into it is the point)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/bionemo-hpc
COPY pyproject.toml ./
COPY bionemo ./bionemo
COPY launchers ./launchers
COPY benchmarks ./benchmarks
COPY configs ./configs
COPY templates ./templates

# Keep the container's torch: NGC's build is a pre-release version (e.g. 2.7.0a0+...nv25.04), which
# a plain `torch>=2.2` (bionemo-scdl's requirement) does not accept, so pip would otherwise fetch a
# generic wheel from PyPI over it. An exact pin of the installed version is accepted as it is.
# Editable (compat mode, as `make install`): this regular `bionemo` package wins over
# bionemo-scdl's `bionemo` namespace folder in site-packages.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /opt/keep-torch.txt \
 && extras="plots" && if [ "$MEGATRON" = 1 ]; then extras="plots,megatron"; fi \
 && pip install -c /opt/keep-torch.txt --config-settings editable_mode=compat -e ".[$extras]" \
 && python -c "import torch, bionemo.config, launchers.config, submitit; \
expected = open('/opt/keep-torch.txt').read().strip().split('==')[1]; \
assert torch.__version__ == expected, (torch.__version__, expected); \
print('torch', torch.__version__, 'kept; bionemo-hpc installed')" \
 && if [ "$MEGATRON" = 1 ]; then python -c "import megatron.core; print('megatron-core', megatron.core.__version__)"; fi
