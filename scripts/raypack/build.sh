#!/usr/bin/env bash
# Build a slim Ray from a downloaded wheel (run on the CPU machine, not the remote).
#   bash .raypack/build.sh WHEEL STAGING_DIR OUT_TAR_XZ
# Unpacks the wheel into STAGING_DIR, drops what a local `ray start --head` / `ray.init` +
# GPU actors do not need, strips the ELF binaries and packs STAGING_DIR's contents as OUT_TAR_XZ.
set -euo pipefail
wheel=$1 stage=$2 out=$3
rm -rf "$stage" && mkdir -p "$stage"
python3 - "$wheel" "$stage" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:  # like pip: keep the executable bits
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = info.external_attr >> 16
        if mode & 0o111:
            os.chmod(path, 0o755)
PY
r=$stage/ray
# Java, the dashboard web UI, and the AI libraries (Data/Train/Tune/Serve/RLlib/LLM/AIR).
rm -rf "$r/jars" "$r/dashboard/client/build" \
       "$r/rllib" "$r/data" "$r/serve" "$r/train" "$r/tune" "$r/llm" "$r/air" \
       "$r/util/spark" "$r/util/dask"
# Tests, type stubs, Cython/C++ headers for building against Ray, the inaccurate RECORD.
find "$stage" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
find "$stage" -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.js.map' \) -delete
rm -rf "$r/includes" "$r"/*.pxd 2>/dev/null || true
rm -f "$stage"/ray-*.dist-info/RECORD
# Strip every ELF file (the 3 Ray binaries are ~120 MB unstripped).
python3 - "$stage" <<'PY' | xargs -0 -r strip --strip-unneeded
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        if not os.path.islink(path):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    sys.stdout.write(path + "\0")
PY
tar -C "$stage" -cf - . | xz -T0 -9e > "$out"
ls -l "$out"
