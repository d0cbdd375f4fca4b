"""Llama-2-7B-shaped weights, a tokenizer and a dataset, all made up on the spot (no download).

The tokenizer is a word-level one over `vocab_size` made-up words ("w3", "w4", ...), so every word
is exactly one token and the dataset's token lengths are exactly the lengths drawn. Word
frequencies follow a Zipf law (as real text does), so the loss has something to learn.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}

# Llama-2-13B: 13.0e9 parameters, 40 layers, hidden 5120 (same vocabulary, tokenizer and data).
LLAMA2_13B = {
    **LLAMA2_7B,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
}

# Same vocabulary (so the tokenizer and data are the same), toy depth and width: the whole bench
# runs on a laptop CPU in a minute.
TINY = {
    **LLAMA2_7B,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "torch_dtype": "float32",
}

SHAPES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "tiny": TINY}

SPECIAL = ["<unk>", "<s>", "</s>"]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL)}
    vocab.update({f"w{index}": index for index in range(len(SPECIAL), vocab_size)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    fast.save_pretrained(str(folder))


def write_model_folder(
    folder: Path, tiny: bool = False, weights: bool = True, seed: int = 0, shape: str | None = None
) -> Path:
    """config.json + tokenizer (+ random fp16 safetensors shards when `weights`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = SHAPES[shape or ("tiny" if tiny else "7b")]
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == {"config": config, "weights": weights}:
        return folder
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, config["vocab_size"])
    if weights:
        _write_random_weights(folder, config, seed)
    marker.write_text(json.dumps({"config": config, "weights": weights}))
    return folder


def _write_random_weights(folder: Path, config: dict, seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if config["torch_dtype"] == "float16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config["initializer_range"]
    shard, shard_bytes, index, number = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, number
        if shard:
            name = f"model-{number:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({key: name for key in shard})
            shard, shard_bytes, number = {}, 0, number + 1

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = torch.empty(shape, device=device, dtype=dtype).normal_(0, std, generator=generator).cpu()
        shard[key] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes > 2 * 1024**3:
            flush()
    flush()
    total = sum(math.prod(s) for s in shapes.values()) * (2 if dtype == torch.float16 else 4)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )


def lengths(count: int, median: int = 300, sigma: float = 0.75, longest: int = 2048, seed: int = 0) -> list[int]:
    """Log-normal example lengths in tokens (median `median`, clipped to [16, longest])."""
    rng = random.Random(seed)
    return [max(16, min(longest, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(count)]


def write_dataset(path: Path, count: int, vocab_size: int, seed: int = 0, **length_args) -> Path:
    """A .jsonl of {"text": ...}: each example is `length - 2` words (BOS and EOS make up the rest)."""
    rng = random.Random(seed + 1)
    words = [f"w{index}" for index in range(len(SPECIAL), vocab_size)]
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(words))]
    cumulative = []
    running = 0.0
    for weight in weights:
        running += weight
        cumulative.append(running)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for length in lengths(count, seed=seed, **length_args):
            text = " ".join(rng.choices(words, cum_weights=cumulative, k=max(1, length - 2)))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a random Llama-2-7B-shaped (or tiny) model folder.")
    parser.add_argument("folder")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default 7b, or tiny with --tiny)")
    args = parser.parse_args()
    write_model_folder(Path(args.folder), tiny=args.tiny, shape=args.shape)


if __name__ == "__main__":
    main()
