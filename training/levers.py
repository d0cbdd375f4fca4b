"""Speed and memory levers that change no math, resolved against the machine the job runs on.

    train.use_liger_kernel      auto (default): Liger's Triton kernels (RMSNorm, RoPE, SwiGLU)
                                when CUDA, a GPU Triton supports and `liger_kernel` are all there
    train.activation_offloading trl's: checkpointed activations go to pinned CPU memory in the
                                forward pass and come back, on a side stream, in the backward;
                                "sync": the same copies on the compute stream (no side-stream
                                pool, no forward stash: least memory, the copies not hidden)
    train.padding_free          auto (default): without packing, each micro-batch's examples in one
                                row, position ids restarting per example, no padding computed
                                (training/packing.py); the same examples and loss per example
    train.expandable_segments   PyTorch's allocator grows segments in place instead of keeping
                                one block per size class: less reserved-but-unused memory
    train.gradient_checkpointing: selective
                                checkpointed layers keep their attention output (trl's policy
                                for torch's selective checkpointing): attention is not recomputed

Each decision is logged once (through `Adjustments`), so a log says which path ran.
"""

from __future__ import annotations

from typing import Any

# Triton (Liger's kernels, trl's chunked loss) compiles for compute capability 7.0 and newer.
TRITON_MIN_CAPABILITY = (7, 0)


def liger_decision(
    setting: bool | str, *, cuda: bool, capability: tuple[int, int] | None, liger_version: str | None
) -> tuple[bool, str]:
    """(use Liger, the one log line saying why), from the facts of the machine."""
    if setting is False:
        return False, "Liger kernels: off (train.use_liger_kernel: false)"
    asked = "train.use_liger_kernel: true" if setting is True else "auto"
    if not cuda:
        return False, f"Liger kernels: off ({asked}; no CUDA: they are Triton GPU kernels)"
    if capability is not None and tuple(capability) < TRITON_MIN_CAPABILITY:
        major, minor = capability
        return False, f"Liger kernels: off ({asked}; compute capability {major}.{minor} < 7.0, no Triton)"
    if liger_version is None:
        return False, f"Liger kernels: off ({asked}; liger-kernel is not installed: pip install liger-kernel)"
    return True, f"Liger kernels: on ({asked}; liger-kernel {liger_version}): fused RMSNorm, RoPE, SwiGLU"


def padding_free_decision(
    setting: bool | str, *, packing: bool, batch_size: int, max_length: int | None
) -> tuple[bool, str]:
    """(flatten each micro-batch into one row, the one log line saying why). `auto` stops where
    the row could outgrow PADDING_FREE_MAX_ROW tokens (SDPA's mask grows with its square)."""
    from launcher.job.config import PADDING_FREE_MAX_ROW

    if packing:
        return False, "padding-free batches: packed rows already carry no padding (train.packing: true)"
    if setting is False:
        return (
            False,
            "padding-free batches: off (train.padding_free: false): micro-batches padded to their longest example",
        )
    asked = "train.padding_free: true" if setting is True else "auto"
    if batch_size < 2 and setting == "auto":
        return False, f"padding-free batches: off ({asked}; one example per micro-batch: nothing is padded)"
    if setting == "auto" and batch_size * (max_length or 0) > PADDING_FREE_MAX_ROW:
        return False, (
            f"padding-free batches: off ({asked}; a row of {batch_size} x {max_length} tokens would "
            f"exceed {PADDING_FREE_MAX_ROW}, and SDPA's mask grows with its square: "
            "train.packing: true trains such budgets without padding)"
        )
    return True, (
        f"padding-free batches: on ({asked}): each micro-batch's examples in one row, "
        "each attending only to itself, no padding computed"
    )


def installed_liger_version() -> str | None:
    """liger-kernel's version when it imports (it needs triton), else None."""
    try:
        from importlib.metadata import version

        import liger_kernel.transformers  # noqa: F401

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - any import failure means the fallback path
        return None


def cuda_capability() -> tuple[int, int] | None:
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def resolve(train, *, cuda: bool, adjustments) -> dict[str, Any]:
    """SFTConfig keywords for the levers, each decision noted once in `adjustments`."""
    use_liger, line = liger_decision(
        train.use_liger_kernel,
        cuda=cuda,
        capability=cuda_capability() if cuda else None,
        liger_version=installed_liger_version() if cuda and train.use_liger_kernel is not False else None,
    )
    adjustments.note(line)
    offload = train.activation_offloading
    if offload and not cuda:
        adjustments.note("no CUDA: activation offloading off (nothing to offload to)")
        offload = False
    return {"use_liger_kernel": use_liger, "activation_offloading": bool(offload)}


# The attention kernels SDPA dispatches to (trl's list): what selective checkpointing keeps.
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def keep_attention_when_checkpointing(model, log) -> None:
    """Selective activation checkpointing that engages. trl 1.16 wraps the model's deprecated
    `gradient_checkpointing_enable`, but transformers 5.x's Trainer calls
    `activation_checkpointing_enable` when training starts, so trl's policy never reached the
    layers and its `selective` key went to the layers' forward as an ignored keyword (measured
    on an H200: peak memory identical to the byte). Here the method the Trainer calls gets the
    policy, and the line it logs counts the decoder layers that really use it."""
    import functools

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    attention = {getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in attention else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    enable = model.activation_checkpointing_enable

    def activation_checkpointing_enable(activation_checkpointing_kwargs=None, **kwargs):
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        checkpoint_kwargs.pop("selective", None)  # trl's key; torch's checkpoint would pass it on
        checkpoint_kwargs.update(use_reentrant=False, context_fn=context_fn)  # SAC is non-reentrant only
        result = enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        from transformers.modeling_layers import GradientCheckpointingLayer  # the decoder layers

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        kept = sum(
            1
            for m in layers
            if (
                getattr(m, "_gradient_checkpointing_func", None) is not None
                and m._gradient_checkpointing_func.keywords.get("context_fn") is context_fn
            )
        )
        log(
            f"selective activation checkpointing: attention outputs kept in {kept} of {len(layers)} checkpointed layers"
        )
        return result

    model.activation_checkpointing_enable = activation_checkpointing_enable


def configure_trainer(trainer, train, *, cuda: bool, log=print) -> str | None:
    """After the trainer is built: selective checkpointing hooked where the Trainer enables
    checkpointing; trl builds its streamed offloading context itself, "sync" replaces it with one
    that copies on the compute stream. Returns the line to log, if any."""
    if train.gradient_checkpointing == "selective":
        keep_attention_when_checkpointing(trainer.model, log)
    if not (cuda and train.activation_offloading == "sync"):
        return None
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    trainer.maybe_activation_offload_context = get_act_offloading_ctx_manager(trainer.model, use_streams=False)
    return "activation offloading: synchronous copies on the compute stream (activation_offloading: sync)"


def apply_allocator_settings(train, *, cuda: bool, adjustments) -> None:
    """Before the first CUDA allocation: PyTorch's expandable segments, when asked for."""
    if not (train.expandable_segments and cuda):
        return
    import torch

    torch.cuda.memory._set_allocator_settings("expandable_segments:True")  # (ran on torch 2.11)
    adjustments.note("CUDA allocator: expandable segments (train.expandable_segments)")
