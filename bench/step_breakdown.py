"""Where one optimizer step of a profile spends its GPU time, and the fastest any trainer of the
same recipe could be: the measured answer to "what limits the fast profile".

    python bench/step_breakdown.py --profile t4+liger            # on a GPU, Llama-2-7B shapes
    python bench/step_breakdown.py --profile t4+liger --tiny     # toy shapes on a CPU (debugging)

1. The profile trains through the project's own entrypoint (`training.sft`, same experiment file
   as bench/train_throughput.py builds) in a child process whose Trainer.training_step runs under
   torch.profiler for a few steady-state steps. Kernel time is summed by kind (matmul, 4-bit
   dequantisation, attention, Triton/Liger, other elementwise and reductions, copies, optimizer)
   and set against the steps' wall time (GPU idle = host-bound time).
2. The matmul ceiling: the step's dense fp16 matmuls alone (each linear layer's forward, its
   recompute under activation checkpointing and its input gradient; the LM head's forward and
   backward), timed back to back on the same GPU with cuBLAS. No QLoRA trainer of this recipe can
   be faster than that; its tokens/s over the notebook's measured tokens/s is the ceiling of the
   "× notebook" ratio.

Results go to <work>/out/breakdown-<profile>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Kernel name → kind, first match wins (cuBLAS on Hopper names its GEMMs nvjet_*/sm90_xmma_*).
KINDS = [
    ("dequantise 4-bit", r"kDequantize|dequantize|kQuantize"),
    ("attention", r"fmha|flash|attention|attn"),
    (
        "matmul",
        r"gemm|nvjet|xmma|cutlass|cublas|sm\d+_|ampere_|volta_|turing_|Kernel2|splitK|aten::(mm|addmm|bmm|matmul)$",
    ),
    ("optimizer", r"adam|optimizer|kPreconditionOptimizer|kOptimizer"),
    ("Triton / Liger", r"triton|liger|_rms_norm|_rope|swiglu|_geglu|chunked"),
    ("copies", r"Memcpy|Memset|copy_kernel|CatArrayBatched"),
    ("elementwise / reductions", r"elementwise|vectorized|reduce|softmax|dropout|fill|index|where|mul|add|cast"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def profiled_child(run_yaml: str, first: int, count: int, out: str) -> int:
    """In the child: training.sft with steps [first, first+count) under torch.profiler."""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    state = {"step": 0, "prof": None, "wall": 0.0, "t0": 0.0}
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        step = state["step"]
        if step == first:
            if cuda:
                torch.cuda.synchronize()
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        result = original(self, *args, **kwargs)
        state["step"] += 1
        if state["step"] == first + count and state["prof"] is not None:
            if cuda:
                torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
            write_breakdown(state["prof"], state["wall"], count, cuda, out)
            state["prof"] = None
        return result

    transformers.Trainer.training_step = training_step
    from training import sft

    return sft.main([run_yaml])


def write_breakdown(prof, wall: float, steps: int, cuda: bool, out: str) -> None:
    """Kernel (device) time by kind, per step; on a CPU the CPU ops' self time instead."""
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if cuda:
            is_kernel = str(getattr(event, "device_type", "")).endswith("CUDA")
            micros = getattr(event, "self_device_time_total", None)
            if micros is None:
                micros = getattr(event, "self_cuda_time_total", 0)
            if not is_kernel or not micros:
                continue
        else:
            micros = event.self_cpu_time_total
        totals[kind_of(event.key)] += micros / 1e6 / steps
        kernels[event.key] += micros / 1e6 / steps
    top = sorted(kernels.items(), key=lambda item: -item[1])[:25]
    Path(out).write_text(
        json.dumps(
            {
                "wall_seconds_per_step": wall / steps,
                "steps_profiled": steps,
                "device": "cuda" if cuda else "cpu",
                "seconds_per_step_by_kind": dict(sorted(totals.items(), key=lambda item: -item[1])),
                "top_kernels": [{"name": name[:160], "seconds_per_step": seconds} for name, seconds in top],
            },
            indent=1,
        )
    )


def matmul_ceiling(shape, tokens: int, checkpointing: bool, repeats: int = 10) -> dict:
    """Seconds per step of the step's dense fp16 matmuls alone, on this machine's accelerator."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    linear = shape.linear_shapes()  # name → (in, out)

    def timed(fn) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    per_layer = 0.0
    for name, (fan_in, fan_out) in linear.items():
        weight = torch.randn(fan_out, fan_in, device=device, dtype=dtype) * 0.02
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        grad = torch.randn(tokens, fan_out, device=device, dtype=dtype)
        forward = timed(lambda: x @ weight.t())
        input_grad = timed(lambda: grad @ weight)
        per_layer += forward * (2 if checkpointing else 1) + input_grad

    head_weight = torch.randn(shape.vocab_size, shape.hidden_size, device=device, dtype=dtype) * 0.02
    hidden = torch.randn(tokens, shape.hidden_size, device=device, dtype=dtype)
    logits_grad = torch.randn(tokens, shape.vocab_size, device=device, dtype=dtype)
    head = timed(lambda: hidden @ head_weight.t()) + timed(lambda: logits_grad @ head_weight)
    seconds = per_layer * shape.num_layers + head
    return {
        "seconds_per_step": seconds,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / seconds,
        "checkpointing": checkpointing,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="t4+liger")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps trained (default 12)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled, the last ones")
    parser.add_argument(
        "--notebook-tokens-per-second",
        type=float,
        help="the notebook's measured tokens/s on this GPU (for the ceiling ratio)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--work", default="/tmp/qlaunch-bench")
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--child", nargs=4, metavar=("RUN_YAML", "FIRST", "COUNT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_yaml, first, count, out = args.child
        return profiled_child(run_yaml, int(first), int(count), out)

    import profiles as bench_profiles
    import synthetic
    import train_throughput

    from launcher import preflight
    from launcher.grid import plan
    from launcher.job.storage import RunPaths, write_run_config

    work = Path(args.work).resolve()
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    size, profile = train_throughput.split_profile(args.profile)
    size = "tiny" if args.tiny else size
    model_dir = work / f"llama2-{size}"
    if not (model_dir / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(Path(__file__).parent / "synthetic.py"), str(model_dir), "--shape", size], check=True
        )
    config = json.loads((model_dir / "config.json").read_text())
    data = work / "data.jsonl"
    if not data.is_file():
        lengths = {"median": 60, "longest": 512} if args.tiny else {}
        synthetic.write_dataset(data, 3000, config["vocab_size"], **lengths)
    _, recipe = bench_profiles.profiles()[profile]
    experiment = train_throughput.experiment_for(
        f"breakdown-{args.profile.replace(':', '-')}", recipe, model_dir, data, work, args.steps, "t4", args.tiny
    )
    (run,) = plan(experiment).runs
    paths = RunPaths.of(run)
    import shutil

    shutil.rmtree(paths.root, ignore_errors=True)
    write_run_config(run)
    slug = args.profile.replace(":", "-").replace("+", "-")
    kernel_file = out_dir / f"kernels-{slug}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first = args.steps - args.profile_steps - 1
    log = work / "logs" / f"{experiment.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(paths.config),
                str(first),
                str(args.profile_steps),
                str(kernel_file),
            ],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=args.timeout,
        ).returncode
    if code != 0 or not kernel_file.is_file():
        print(log.read_text()[-3000:])
        return 1
    kernels = json.loads(kernel_file.read_text())
    shape = preflight.shape_from_config(config)
    tokens = preflight.estimate_run(run).tokens_per_step
    checkpointing = preflight.checkpointing_mode(run) != "none"
    ceiling = matmul_ceiling(shape, tokens, checkpointing)
    no_recompute = matmul_ceiling(shape, tokens, False)
    result = {
        "profile": args.profile,
        "run_id": run.run_id,
        "tokens_per_step_budget": tokens,
        "kernels": kernels,
        "matmul_ceiling": ceiling,
        "matmul_ceiling_without_recompute": no_recompute,
    }
    if args.notebook_tokens_per_second:
        result["ceiling_x_notebook"] = ceiling["tokens_per_second"] / args.notebook_tokens_per_second
        result["ceiling_without_recompute_x_notebook"] = (
            no_recompute["tokens_per_second"] / args.notebook_tokens_per_second
        )
    (out_dir / f"breakdown-{slug}.json").write_text(json.dumps(result, indent=1))

    wall = kernels["wall_seconds_per_step"]
    print(f"{args.profile}: {wall:.3f} s per step (wall, {kernels['steps_profiled']} steps profiled)")
    busy = 0.0
    for kind, seconds in kernels["seconds_per_step_by_kind"].items():
        busy += seconds
        print(f"  {kind:<26} {seconds:8.3f} s  {100 * seconds / wall:5.1f}%")
    for kernel in kernels["top_kernels"][:8]:
        print(f"    {kernel['seconds_per_step']:7.3f} s  {kernel['name'][:110]}")
    print(
        f"  {'device idle (host-bound)':<26} {max(0.0, wall - busy):8.3f} s  {100 * max(0.0, wall - busy) / wall:5.1f}%"
    )
    print(
        f"matmul ceiling ({'with' if checkpointing else 'without'} recompute): {ceiling['seconds_per_step']:.3f} s "
        f"per {tokens:,} tokens = {ceiling['tokens_per_second']:,.0f} tokens/s; without recompute "
        f"{no_recompute['tokens_per_second']:,.0f} tokens/s"
    )
    if args.notebook_tokens_per_second:
        print(
            f"ceiling × notebook: {result['ceiling_x_notebook']:.2f}× (without recompute "
            f"{result['ceiling_without_recompute_x_notebook']:.2f}×)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
