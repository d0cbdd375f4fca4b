"""Which node label selects a GPU type: resources.gpu_type as the value of kubernetes.gpu_node_label.

Two label keys are common: NVIDIA GPU feature discovery (the GPU operator; EKS, on-prem, GKE with
the operator) publishes `nvidia.com/gpu.product` with the product name, GKE publishes
`cloud.google.com/gke-accelerator` with its own accelerator names. Any other key takes gpu_type
verbatim; `none` selects no GPU label at all (the nvidia.com/gpu resource alone places the pod).
"""

from __future__ import annotations

from ...preflight import normalise_gpu

GFD_LABEL = "nvidia.com/gpu.product"
GKE_LABEL = "cloud.google.com/gke-accelerator"
NO_GPU_LABEL = "none"

KNOWN_VALUES: dict[str, dict[str, str]] = {
    GFD_LABEL: {
        "t4": "Tesla-T4",
        "v100": "Tesla-V100-SXM2-16GB",
        "a10g": "NVIDIA-A10G",
        "l4": "NVIDIA-L4",
        "a100": "NVIDIA-A100-SXM4-40GB",
        "a100-40gb": "NVIDIA-A100-SXM4-40GB",
        "a100-80gb": "NVIDIA-A100-SXM4-80GB",
        "h100": "NVIDIA-H100-80GB-HBM3",
        "h100-80gb": "NVIDIA-H100-80GB-HBM3",
        "l40s": "NVIDIA-L40S",
    },
    GKE_LABEL: {
        "t4": "nvidia-tesla-t4",
        "v100": "nvidia-tesla-v100",
        "l4": "nvidia-l4",
        "a100": "nvidia-tesla-a100",
        "a100-40gb": "nvidia-tesla-a100",
        "a100-80gb": "nvidia-a100-80gb",
        "h100": "nvidia-h100-80gb",
        "h100-80gb": "nvidia-h100-80gb",
    },
}


class UnknownGpuType(ValueError):
    """gpu_type has no value under a known label key."""

    def __init__(self, gpu_type: str, label: str):
        known = ", ".join(sorted(KNOWN_VALUES[label]))
        super().__init__(
            f"{gpu_type!r} has no known value for node label {label} (known: {known}); set "
            "kubernetes.gpu_node_label to your nodes' own label key (gpu_type is then its value), "
            "or gpu_node_label: none and select nodes with kubernetes.node_selector"
        )


def gpu_selector(label: str, gpu_type: str) -> dict[str, str]:
    """The nodeSelector entry that puts a GPU pod on gpu_type nodes ({} for label `none`)."""
    if label == NO_GPU_LABEL:
        return {}
    values = KNOWN_VALUES.get(label)
    if values is None:
        return {label: gpu_type}
    value = values.get(normalise_gpu(gpu_type))
    if value is None:
        raise UnknownGpuType(gpu_type, label)
    return {label: value}
