"""Issue #8: the base model must be the same model before and after the adapter is attached, on
every CPU. bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16 at the first no-grad
forward; PEFT wrapping such layers corrupted them. qlaunch pins the CPU kernel and checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.adapter_check import BaseModelChanged, check_base_unchanged, probe_logits


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _load_4bit(folder: Path, pin: bool):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from training.model_source import pin_cpu_4bit_kernel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )
    return (pin_cpu_4bit_kernel(model) if pin else model).eval()


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero weights (what a trained one looks like) for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(_load_4bit(tiny_model_dir, pin=True), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def _attach(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def test_the_adapter_attached_to_a_pinned_base_leaves_the_base_as_it_was(tiny_model_dir, adapter):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "What comes after 3?"
    base = _load_4bit(tiny_model_dir, pin=True)
    reference = probe_logits(base, tokenizer, text)  # a forward before wrapping: the old trap
    model = _attach(base, adapter)
    assert check_base_unchanged(model, tokenizer, text, reference) == 0.0
    # and the adapter does change the answer logits (the check compares the right thing)
    assert (probe_logits(model, tokenizer, text) - reference).abs().max() > 1e-3


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the repack happens only on CPUs with avx512_bf16")
def test_the_guard_stops_a_base_model_that_the_repack_corrupted(tiny_model_dir, adapter):
    """bitsandbytes' default on this CPU (not pinned), in the old order: forward, then wrap."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "What comes after 3?"
    base = _load_4bit(tiny_model_dir, pin=False)
    reference = probe_logits(base, tokenizer, text)  # repacks every Linear4bit in place
    model = _attach(base, adapter)
    with pytest.raises(BaseModelChanged, match="attaching the adapter changed the base model's weights"):
        check_base_unchanged(model, tokenizer, text, reference)
