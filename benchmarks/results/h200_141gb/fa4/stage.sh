#!/usr/bin/env bash
# The first of two device calls behind README.md here (one nvidia-h200): flash-attn-4's CuTe DSL
# needs nvidia-cutlass-dsl-libs-cu13, 92 MB as a wheel and 63.5 MB as tar.xz, more than one call
# carries (64 MiB with the repository). This call carries the first 60 MB of the tar.xz (.fa4/a)
# and leaves it in /tmp on the machine, which stays warm 30 s; run.sh, the next call, carries the
# rest (.fa4/b). fetch.sh builds .fa4/ here. From the repository root:
#     bash benchmarks/results/h200_141gb/fa4/stage.sh "$OUT"
set -u
OUT=${1:?usage: stage.sh OUT}
mkdir -p /tmp/fa4parts && cp .fa4/a/cu13.tar.xz.part00 /tmp/fa4parts/ &&
    { date -u; ls -la /tmp/fa4parts; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } >"$OUT/stage.txt" 2>&1
cat "$OUT/stage.txt"
