# Sourced at the start of a command on the GPU machine: installs the carried wheels (.whl/, made by
# bench/fetch_wheels.sh) into /tmp/site and puts them and the checkout on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger_kernel", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # report, keep going: the bench says which lever could not run
        print(f"{name} FAILED: {type(exc).__name__}: {exc}")
import torch
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
