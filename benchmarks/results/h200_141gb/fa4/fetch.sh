#!/usr/bin/env bash
# Here (where pip reaches an index), from the repository root: the flash-attn-4 stack that stage.sh
# and run.sh carry, into the git-ignored .fa4/ (a: the first 60 MB of the cutlass DSL's CUDA 13
# library as tar.xz; b: the rest of it, its sha256 and the other wheels). CPython 3.12 wheels,
# the GPU image's python3. About 3 minutes (xz -9e of 237 MB).
set -eu
W=$(mktemp -d)
pip() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$W" "$@"; }
pip flash-attn-4==4.0.0b36 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5
grep -qx "/.fa4/" .git/info/exclude 2>/dev/null || echo "/.fa4/" >> .git/info/exclude
rm -rf .fa4 && mkdir -p .fa4/a .fa4/b "$W/cu13"
(cd "$W/cu13" && python3 -m zipfile -e "$W"/nvidia_cutlass_dsl_libs_cu13-*.whl . && tar cf - . | xz -9e -T0 > "$W/cu13.tar.xz")
sha256sum "$W/cu13.tar.xz" | cut -c1-64 > .fa4/b/cu13.sha256
split -b 60000000 -d "$W/cu13.tar.xz" "$W/cu13.tar.xz.part"
mv "$W/cu13.tar.xz.part00" .fa4/a/ && mv "$W/cu13.tar.xz.part01" .fa4/b/
find "$W" -maxdepth 1 -name "*.whl" ! -name "nvidia_cutlass_dsl_libs_cu13-*" -exec mv {} .fa4/b/ \;
rm -rf "$W"; du -sh .fa4/a .fa4/b
