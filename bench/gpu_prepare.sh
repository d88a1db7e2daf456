#!/usr/bin/env bash
# Packs, on this machine, the Python packages bench/gpu_run.sh installs on a lent GPU machine.
# That machine's image (Python 3.12, PyTorch, transformers, peft, pyarrow, pandas, ...) has no
# Ray, pydantic or their needs, and nothing can be fetched there; one call takes at most 64 MiB
# of files. So: Ray's closure (ray[default,train,data]) and pydantic, less what the image has,
# plus the transformers and peft this project pins, installed into one folder and packed as
# .whl/gpu-site.tar.xz. Ray is thinned to fit: its Java jars, RLlib, Serve, ray.llm and the
# dashboard's web page (not its Jobs API) are left out. Needs the package index; about 3 min.
#
#   bash bench/gpu_prepare.sh        # then, on the device: bash bench/gpu_run.sh (carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.whl}
PYVER=${PYVER:-3.12}  # the device's; another only to try the pack on this machine
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PIP=(python3 -m pip -q --disable-pip-version-check)

"${PIP[@]}" download "${PLAT[@]}" -d "$STAGE/dl" "ray[default,train,data]==2.60.0" "pydantic>=2.7,<3"
"${PIP[@]}" download "${PLAT[@]}" --no-deps -d "$STAGE/dl" transformers==5.24.0 peft==0.21.2

# What the device image holds already (/work/.library/device/KINDS.md, its package list): kept
# there, not carried. Names in the wheels' normalised form.
HAVE="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle filelock frozenlist fsspec grpcio h11 hf-xet httpcore httpx huggingface-hub idna jinja2
markupsafe msgpack multidict numpy packaging pandas pillow prometheus-client propcache protobuf psutil
pyarrow python-dateutil pyyaml regex requests rich safetensors six tokenizers tqdm typing-extensions
urllib3 yarl zipp"
keep=()
for wheel in "$STAGE"/dl/*.whl; do
  name=$(basename "$wheel" | sed 's/-[0-9].*//' | tr 'A-Z_.' 'a-z--')
  case " $(echo $HAVE) " in *" $name "*) continue ;; esac
  keep+=("$wheel")
done
"${PIP[@]}" install "${PLAT[@]}" --no-deps --no-compile --target "$STAGE/site" "${keep[@]}"

ray="$STAGE/site/ray"
rm -rf "$ray/jars" "$ray/rllib" "$ray/serve" "$ray/llm" "$ray/dashboard/client/build"
mkdir -p "$ray/dashboard/client/build/static"  # the dashboard's Jobs API wants the folder there
find "$STAGE/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$OUT"
tar -C "$STAGE/site" -cf - . | xz -T0 -6 > "$OUT/gpu-site.tar.xz"
ls -l "$OUT/gpu-site.tar.xz"
