#!/usr/bin/env bash
# Install the carried slim Ray 2.60.0 (plus whichever of its dependencies are missing) into a dir.
#   bash .raypack/install.sh /tmp/site        then   export PYTHONPATH=/tmp/site:$PWD
# PYTHON=... picks the interpreter (default python3); RAYPACK_ALL_DEPS=1 installs every carried
# dependency wheel, not only the missing or too old ones. No network is used.
# Afterwards: /tmp/site/bin/ray start --head ... (or: python3 -m ray.scripts.scripts start ...).
set -euo pipefail
target=${1:?usage: bash .raypack/install.sh TARGET_DIR}
py=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$target"
target=$(cd "$target" && pwd)

tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
tarball=$here/ray-2.60.0-$tag-slim.tar.xz
if [[ ! -f $tarball ]]; then
  echo "install.sh: no slim Ray for $tag here ($(ls "$here"/*.tar.xz 2>/dev/null | xargs -n1 basename | tr '\n' ' '))" >&2
  exit 1
fi
# Python's tarfile (lzma is in every CPython build): no dependence on an xz binary.
"$py" - "$tarball" "$target" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    tar.extractall(sys.argv[2], **kw)
PY

# Ray's Requires-Dist; pip resolves it against what this Python already has (PYTHONPATH included)
# and names the carried wheels it would add; only those go into TARGET (--target ignores the env).
wheels=$here/wheels
reqs=("click>=7.0" "filelock" "jsonschema" "msgpack>=1.0.0,<2.0.0" "packaging>=24.2"
      "protobuf>=3.20.3" "pyyaml" "requests")
if [[ ${RAYPACK_ALL_DEPS:-0} == 1 ]]; then
  need=("$wheels"/*.whl)
elif report=$("$py" -m pip install --no-index --find-links "$wheels" --dry-run --quiet --report - \
                 "${reqs[@]}" 2>/dev/null); then
  mapfile -t need < <(printf '%s' "$report" | "$py" -c '
import json, sys
for item in json.load(sys.stdin)["install"]:
    print(item["download_info"]["url"].removeprefix("file://"))
')
else
  need=("$wheels"/*.whl)  # pip too old for --dry-run --report: take them all
fi
if ((${#need[@]})); then
  echo "install.sh: adding $(printf '%s\n' "${need[@]}" | xargs -n1 basename | cut -d- -f1 | tr '\n' ' ')"
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" "${need[@]}"
else
  echo "install.sh: every Ray dependency is already installed"
fi

# A `ray` command for this interpreter (the wheel's console script is not installed by extraction).
mkdir -p "$target/bin"
printf '#!/bin/sh\nexport PYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}"\nexec "%s" -m ray.scripts.scripts "$@"\n' \
  "$target" "$("$py" -c 'import sys; print(sys.executable)')" > "$target/bin/ray"
chmod +x "$target/bin/ray"
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" -c 'import ray; print("install.sh: ray", ray.__version__, "from", ray.__file__)'
