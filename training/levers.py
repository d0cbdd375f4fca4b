"""Speed and memory levers that change no math, resolved against the machine the job runs on.

    train.use_liger_kernel      auto (default): Liger's Triton kernels (RMSNorm, RoPE, SwiGLU)
                                when CUDA, a GPU Triton supports and `liger_kernel` are all there
    train.activation_offloading trl's: checkpointed activations go to pinned CPU memory in the
                                forward pass and come back, on a side stream, in the backward;
                                "sync": the same copies on the compute stream (no side-stream
                                pool, no forward stash: least memory, the copies not hidden)
    train.expandable_segments   PyTorch's allocator grows segments in place instead of keeping
                                one block per size class: less reserved-but-unused memory

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


def installed_liger_version() -> str | None:
    """liger-kernel's version when it imports (it needs triton), else None."""
    try:
        import liger_kernel.transformers  # noqa: F401
        from importlib.metadata import version

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


def configure_trainer(trainer, train, *, cuda: bool) -> str | None:
    """After the trainer is built: trl builds its streamed offloading context itself; "sync"
    replaces it with one that copies on the compute stream. Returns the line to log, if any."""
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
