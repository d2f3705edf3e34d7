#!/bin/bash
# The bundled SLURM cluster on a GPU machine that has no package registry (README.md beside this).
#
#   benchmarks/slurm_gpu/prepare.sh fetch     # where apt (Debian bookworm) and pip reach their registries:
#                                             # .debs and wheels into .slurm_gpu/ (git-ignored, ~7 MB)
#   benchmarks/slurm_gpu/prepare.sh install   # on the GPU machine, as root, with .slurm_gpu/ carried there:
#                                             # unpack into $PREFIX, write $PREFIX/env.sh
#   . /tmp/bionemo-slurm-gpu/env.sh && python3 -m launchers cluster up
#   benchmarks/slurm_gpu/prepare.sh site      # on the GPU machine, no SLURM: only the wheels into
#                                             # $PREFIX/site (local_gpu runs, make sweep --backend local)
#
# PREFIX: $BIONEMO_SLURM_GPU_PREFIX, default /tmp/bionemo-slurm-gpu (configs/clusters/local_gpu.yaml
# names its site/ folder in PYTHONPATH). The wheels are for CPython 3.12 (the GPU image's python3).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=$REPO/.slurm_gpu
PREFIX=${BIONEMO_SLURM_GPU_PREFIX:-/tmp/bionemo-slurm-gpu}
# Debian bookworm's SLURM 22.05.8 and munge, plus the libraries they need that Ubuntu 24.04's GPU
# image lacks (found by running them there: issue 15).
DEBS=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libmunge2
      libhwloc15 libjson-c5 liblua5.1-0 liblz4-1 libnuma1 libyaml-0-2 libdbus-1-3 libreadline8)
# What the launcher imports and the image lacks (jinja2, pyyaml, numpy, pyarrow, torch are there);
# the versions of this repository's .venv, where they are tested.
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing_extensions==4.16.0)
# FP8 (train.fp8; the H200 table's 3B and Geneformer 4B rows) and Geneformer's SCDL data: torchao,
# and bionemo-scdl with the part of its tree the image lacks. The versions the H200 ran with on
# 2026-12-02 (benchmarks/results/h200_141gb/gf4b/).
WHEELS_FP8=(torchao==0.17.0)
WHEELS_CELLS=(bionemo-scdl==0.1.3 anndata==0.12.19 zarr==3.1.6 numcodecs==0.17.1 natsort==8.4.0
              array-api-compat==1.16.0 legacy-api-wrap==1.5 scverse-misc==0.1.7 pooch==1.9.0
              platformdirs==4.14.9 donfig==0.8.1.post1 google-crc32c==1.9.0)
MULTIARCH=x86_64-linux-gnu

fetch() {
    grep -q bookworm /etc/os-release || echo "warning: not Debian bookworm; the .debs are bookworm's" >&2
    mkdir -p "$CACHE/debs" "$CACHE/wheels"
    (cd "$CACHE/debs" && apt-get download "${DEBS[@]}")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d "$CACHE/wheels" \
        "${WHEELS[@]}" "${WHEELS_FP8[@]}" "${WHEELS_CELLS[@]}"
    grep -qx "/.slurm_gpu/" "$REPO/.git/info/exclude" 2>/dev/null || echo "/.slurm_gpu/" >> "$REPO/.git/info/exclude"
    du -sh "$CACHE"
}

site() {  # the wheels into $PREFIX/site, which configs/clusters/local_gpu.yaml puts on PYTHONPATH
    if [ "$(python3 -c 'import sys; print(sys.version_info[:2] == (3, 12))')" != True ]; then
        echo "warning: python3 is not 3.12: wheels not installed (the launcher needs pydantic)" >&2
    elif [ -d "$CACHE/wheels" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$PREFIX/site" "$CACHE"/wheels/*.whl
    else
        echo "error: $CACHE/wheels missing; run '$0 fetch' where pip works, carry .slurm_gpu" >&2; exit 2
    fi
}

install() {
    [ -d "$CACHE/debs" ] || { echo "error: $CACHE/debs missing; run '$0 fetch' where apt works, carry .slurm_gpu" >&2; exit 2; }
    local root=$PREFIX/root sbin=$PREFIX/root/usr/sbin
    mkdir -p "$root" "$PREFIX/bin"
    for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$root"; done
    # Debian names the daemons *-wlm and points slurmctld etc. at them through update-alternatives,
    # which dpkg -x does not run; launchers/cluster.py looks for the plain names on PATH.
    for d in slurmctld slurmd slurmstepd; do ln -sfn "$sbin/$d-wlm" "$PREFIX/bin/$d"; done
    ln -sfn "$sbin/munged" "$PREFIX/bin/munged"
    # slurmd starts slurmstepd from its compiled-in /usr/sbin; no setting moves it.
    if [ ! -e /usr/sbin/slurmstepd ]; then
        [ "$(id -u)" = 0 ] || { echo "error: /usr/sbin/slurmstepd missing and not root" >&2; exit 1; }
        ln -s "$sbin/slurmstepd-wlm" /usr/sbin/slurmstepd
    fi
    site
    local libs=$root/usr/lib/$MULTIARCH:$root/lib/$MULTIARCH:$root/usr/lib/$MULTIARCH/slurm-wlm
    cat > "$PREFIX/env.sh" <<EOF
# Written by benchmarks/slurm_gpu/prepare.sh: SLURM and munge from $root.
export PATH=$PREFIX/bin:$root/usr/bin:$sbin\${PATH:+:\$PATH}
export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export PYTHONPATH=$PREFIX/site\${PYTHONPATH:+:\$PYTHONPATH}
# launchers/cluster.py: PluginDir= in slurm.conf; cgroup.conf (cgroup/v2 fails to start under gVisor)
export BIONEMO_SLURM_PLUGIN_DIR=$root/usr/lib/$MULTIARCH/slurm-wlm
export BIONEMO_CLUSTER_CGROUP_PLUGIN=\${BIONEMO_CLUSTER_CGROUP_PLUGIN:-cgroup/v1}
EOF
    echo "installed into $PREFIX; now: . $PREFIX/env.sh && python3 -m launchers cluster up"
}

case "${1:-}" in
    fetch) fetch ;;
    install) install ;;
    site) site ;;
    *) echo "usage: $0 fetch|install|site   (README.md beside this script)" >&2; exit 2 ;;
esac
