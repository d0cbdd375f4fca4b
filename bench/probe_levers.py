"""First look at the levers, before the project's trainer existed: one process loads the random
Llama-2-7B-shaped base in NF4 once and trains a few steps of each variant with the same parts the
trainer uses (bitsandbytes, peft LoRA, fp16 autocast + GradScaler, paged AdamW, HF activation
checkpointing, trl's chunked LM-head loss, SDPA). It measures step time, non-padding tokens/s and
peak memory per variant, times SDPA with a packed block-diagonal mask against plain causal
attention, and checks that packed logits equal unpacked ones.

The numbers that count come from bench/train_throughput.py (the project's own entrypoint); these
calibrated the pre-flight estimator and chose which levers to try there.

    python bench/probe_levers.py [--tiny] [--steps 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402


def load_examples(tokenizer, path: Path) -> list[list[int]]:
    texts = [json.loads(line)["text"] + tokenizer.eos_token for line in open(path)]
    return tokenizer(texts)["input_ids"]


def padded_batches(examples, batch: int, max_length: int, seed: int):
    """HF's group_by_length: megabatches of 50 batches sorted by length, longest batch first."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = 50 * batch
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -len(examples[i]))
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    longest = max(range(len(batches)), key=lambda b: max(len(examples[i]) for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    for ids in batches:
        yield [examples[i][:max_length] for i in ids]


def packed_rows(examples, capacity: int, seed: int):
    """Best-fit decreasing (trl's bfd): whole examples into rows of at most `capacity` tokens."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(order, key=lambda i: -len(examples[i])):
        length = min(len(examples[i]), capacity)
        best = min((s for s in range(len(rows)) if space[s] >= length), key=lambda s: space[s], default=None)
        if best is None:
            rows.append([])
            space.append(capacity)
            best = len(rows) - 1
        rows[best].append(i)
        space[best] -= length
    rng.shuffle(rows)
    for row in rows:
        yield [examples[i][:capacity] for i in row]


def collate_padded(seqs, pad_id, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    real = int(mask.sum())
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}, real


def collate_rows(rows, device):
    """Each row: its examples back to back, position ids restarting at each example (no mask:
    transformers derives the block-diagonal mask from the position ids)."""
    import torch

    width = max(sum(len(s) for s in row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s)
            ids[r, at : at + n] = torch.tensor(s)
            pos[r, at : at + n] = torch.arange(n)
            labels[r, at + 1 : at + n] = torch.tensor(s[1:])
            at += n
            real += n
        if at < width:  # pad the row as one more "example" that is never scored
            pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}, real


def batches_for(variant, examples, pad_id, device):
    if variant["packing"]:
        rows_per_step = variant.get("rows", 1)
        row_iter = packed_rows(examples, variant["row_tokens"], seed=0)
        while True:
            rows = [next(row_iter) for _ in range(rows_per_step)]
            yield collate_rows(rows, device)
    else:
        for seqs in padded_batches(examples, variant["batch"], variant["max_length"], seed=0):
            yield collate_padded(seqs, pad_id, device)


def run_variant(base, variant, examples, pad_id, steps, device):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    targets = (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if variant.get("all_linear")
        else ["q_proj", "v_proj"]
    )
    config = LoraConfig(
        r=variant.get("r", 64),
        lora_alpha=16,
        lora_dropout=variant.get("dropout", 0.1),
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    if variant["checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    model = get_peft_model(base, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if variant["checkpointing"]:
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.001)
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda")
    torch.cuda.empty_cache() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data = batches_for(variant, examples, pad_id, device)
    times, tokens, losses = [], [], []
    for step in range(steps):
        batch, real = next(data)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
            out = model(**batch, fused_lm_head=True, use_cache=False)
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(real)
        losses.append(loss)
    warm = 2 if steps > 3 else 0
    seconds = sum(times[warm:])
    result = {
        "name": variant["name"],
        "s_per_step": seconds / (steps - warm),
        "tokens_per_s": sum(tokens[warm:]) / seconds,
        "tokens_per_step": sum(tokens) / steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if device == "cuda":
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del optimizer, params, out
    base = model.unload()
    if device == "cuda":
        torch.cuda.empty_cache()
    return base, result


def check_packed_logits(base, examples, device) -> dict:
    """Packed (one row, position ids restarting) vs each example alone: same logits?"""
    import torch

    base.eval()
    picks = [examples[i][:300] for i in (0, 1, 2, 3)]
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
        alone = [base(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0].float() for s in picks]
        batch, _ = collate_rows([picks], device)
        packed = (
            base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0].float()
        )
        leaky = base(input_ids=batch["input_ids"], use_cache=False).logits[0].float()  # no position ids: one causal row
    ref = torch.cat(alone)
    diff = (packed[: len(ref)] - ref).norm() / ref.norm()
    leak = (leaky[: len(ref)] - ref).norm() / ref.norm()
    base.train()
    return {"packed_vs_alone_rel_err": float(diff), "no_boundaries_rel_err": float(leak)}


def time_attention(device) -> list[dict]:
    """SDPA fwd+bwd, 32 heads × 128, fp16: causal vs block-diagonal mask (what packing costs
    without a varlen kernel), efficient backend only (what a T4 has)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for length, pieces in ((4096, 11), (8192, 22)):
        q, k, v = (
            torch.randn(1, 32, length, 128, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3)
        )
        bounds = sorted(random.Random(0).sample(range(1, length), pieces - 1))
        seg = torch.zeros(length, dtype=torch.long, device=device)
        for b in bounds:
            seg[b:] += 1
        idx = torch.arange(length, device=device)
        mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])
        for label, kwargs in (("causal", {"is_causal": True}), ("block mask", {"attn_mask": mask})):
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                for rep in range(6):
                    if rep == 2:
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
                    out.sum().backward()
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 4 * 1000
            rows.append(
                {
                    "length": length,
                    "mask": label,
                    "ms_fwd_bwd_per_layer": ms,
                    "ms_per_step_32_layers_ckpt": ms * 32 * 1.33,
                }
            )
    return rows


VARIANTS = [
    {
        "name": "notebook bs4 pad<=1024 ckpt q,v",
        "packing": False,
        "batch": 4,
        "max_length": 1024,
        "checkpointing": True,
    },
    {"name": "packed 4096 ckpt q,v", "packing": True, "row_tokens": 4096, "checkpointing": True},
    {"name": "packed 8192 ckpt q,v", "packing": True, "row_tokens": 8192, "checkpointing": True},
    {"name": "packed 4x2048 rows ckpt q,v", "packing": True, "row_tokens": 2048, "rows": 4, "checkpointing": True},
    {
        "name": "packed 8192 ckpt q,v dropout0",
        "packing": True,
        "row_tokens": 8192,
        "checkpointing": True,
        "dropout": 0.0,
    },
    {
        "name": "packed 8192 ckpt all-linear r16",
        "packing": True,
        "row_tokens": 8192,
        "checkpointing": True,
        "all_linear": True,
        "r": 16,
    },
    {"name": "packed 12288 ckpt q,v", "packing": True, "row_tokens": 12288, "checkpointing": True},
    {"name": "packed 2048 no-ckpt q,v", "packing": True, "row_tokens": 2048, "checkpointing": False},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/qlaunch-bench")
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", help="comma-separated variant indices")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.trainer.utils import add_fused_lm_head

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    t0 = time.time()
    folder = synthetic.write_model_folder(work / ("tiny" if args.tiny else "llama2-7b"), tiny=args.tiny)
    data = synthetic.write_dataset(work / "data.jsonl", 3000, 32000)
    print(f"model folder ready in {time.time() - t0:.0f}s", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    examples = load_examples(tokenizer, data)
    t0 = time.time()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float16 if device == "cuda" else torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        str(folder),
        quantization_config=quant,
        dtype=torch.float16 if device == "cuda" else torch.float32,
        device_map={"": 0} if device == "cuda" else None,
        attn_implementation="sdpa",
    )
    add_fused_lm_head(base)
    print(
        f"loaded in {time.time() - t0:.0f}s; allocated "
        f"{torch.cuda.memory_allocated() / 2**30 if device == 'cuda' else 0:.2f} GiB",
        flush=True,
    )
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "variants": []}
    report["packing_check"] = check_packed_logits(base, examples, device)
    print(json.dumps(report["packing_check"]), flush=True)
    if device == "cuda":
        report["attention"] = time_attention(device)
        for row in report["attention"]:
            print(json.dumps(row), flush=True)
    variants = VARIANTS
    if args.tiny:
        variants = [dict(v, row_tokens=min(v.get("row_tokens", 0), 1024) or None) for v in VARIANTS][:3]
    if args.only:
        variants = [VARIANTS[int(i)] for i in args.only.split(",")]
    for variant in variants:
        try:
            base, result = run_variant(base, variant, examples, tokenizer.eos_token_id, args.steps, device)
        except torch.OutOfMemoryError as exc:
            result = {"name": variant["name"], "error": f"OOM: {exc}"[:200]}
            if device == "cuda":
                torch.cuda.empty_cache()
        report["variants"].append(result)
        print(json.dumps(result), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe.json").write_text(json.dumps(report, indent=2))
    print(f"{'variant':36} {'tok/s':>8} {'s/step':>7} {'tok/step':>8} {'alloc':>6} {'resv':>6} loss")
    for r in report["variants"]:
        if "error" in r:
            print(f"{r['name']:36} {r['error']}")
            continue
        print(
            f"{r['name']:36} {r['tokens_per_s']:8.0f} {r['s_per_step']:7.3f} {r['tokens_per_step']:8.0f} "
            f"{r.get('peak_alloc_gib', 0):6.2f} {r.get('peak_reserved_gib', 0):6.2f} "
            f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"
        )


if __name__ == "__main__":
    main()
