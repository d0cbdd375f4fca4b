#!/usr/bin/env bash
# Wheels the GPU bench machine lacks (it has torch, accelerate, pyarrow, pandas, xxhash, fsspec,
# huggingface-hub, and older transformers/peft; no pydantic): fetched here for Python 3.12 / x86-64 into .whl/,
# at the versions the project is tested with.
# bitsandbytes ships libraries for every CUDA/ROCm/XPU version (43 MB); only the CPU and CUDA 13
# ones are kept so the wheels fit the 64 MiB the device tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
    -d .whl trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    liger-kernel==0.8.5 \
    transformers==5.23.0 peft==0.21.2 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 psutil==7.2.2
$PY - <<'PY'
import base64, hashlib, pathlib, re, zipfile
whl = next(pathlib.Path(".whl").glob("bitsandbytes-*.whl"))
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
src = zipfile.ZipFile(whl)
names = [n for n in src.namelist() if not n.endswith(".so") or keep.search(n)]
if len(names) == len(src.namelist()):
    raise SystemExit(0)  # already slimmed
record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
out = whl.with_suffix(".tmp")
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
    record = []
    for name in names:
        if name == record_name:
            continue
        data = src.read(name)
        dst.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{record_name},,")
    dst.writestr(record_name, "\n".join(record) + "\n")
out.replace(whl)
PY
ls -la .whl
