#!/usr/bin/env bash
# The GPU check (issue 37): scripts/gpu_check.py's checks, with the set-up a lent GPU machine needs.
#
#   scripts/gpu_check.sh --fetch-wheels   # here (CPU, package registries): the wheels the GPU machine lacks -> .whl/
#   scripts/gpu_check.sh                  # there, from the repository root, with .whl carried: install, then check
#   scripts/gpu_check.sh --dry-run        # here: the same checks on CPU, tiny shapes, no install
#
# Results go to $OUT (the folder whose files come back from the GPU machine), else ./gpu-check-out.
# Other arguments pass to scripts/gpu_check.py (--budget SECONDS, --only CHECKS).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${STADI_GPU_WHEELS:-.whl}  # the folder that travels to the GPU machine (git-ignored)
SITE=/tmp/stadi-gpu-check-site
# What the GPU machine's image lacks (its torch, transformers, accelerate, peft, einops, pillow, pyyaml and
# sentencepiece are used as they are there), at the versions this checkout is tested with; this package
# itself comes from the tree.
PACKAGES=(xfuser==0.7.0 diffusers==0.42.1 yunchang==0.6.4 distvae==0.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.4)

case "${1:-}" in
--fetch-wheels)
    shift
    mkdir -p "$WHEELS"
    # Pure-Python wheels for the device's Python 3.12 (no dependencies: the image has the rest).
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --abi none --platform any -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
    ls "$WHEELS"
    ;;
--dry-run)
    shift
    exec python scripts/gpu_check.py --dry-run "$@"
    ;;
*)
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check.sh: no $WHEELS folder: run scripts/gpu_check.sh --fetch-wheels on the CPU machine and carry $WHEELS" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # this package from the tree
    missing=$(python3 - <<'EOF'
import importlib
names = ("torch", "transformers", "accelerate", "peft", "einops", "PIL", "yaml", "sentencepiece", "bs4",
         "diffusers", "yunchang", "distvae", "stadi_xdit.xdit", "xfuser")  # stadi_xdit.xdit: CPU compat first
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("; ".join(missing))
EOF
)
    if [ -n "$missing" ]; then
        echo "gpu_check.sh: cannot import: $missing" >&2
        exit 2
    fi
    exec python3 scripts/gpu_check.py "$@"
    ;;
esac
