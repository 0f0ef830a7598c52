"""Which cards a plan fits, with the stated margin, and roofline step-time estimates on named GPUs.

Every GPU figure below is the vendor's published peak (dense, no structured sparsity), not a measurement of
ours. The step-time estimate is a roofline lower bound: each counted op takes max(FLOPs / peak compute,
bytes read and written / peak bandwidth), summed over the ops. Real steps are slower (kernel launches,
no kernel reaches its peak, attention and norms are rarely at the roofline): treat it as an ESTIMATE.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    half_tflops: float  # fp16/bf16 tensor cores, dense, fp32 accumulate where the sheet distinguishes
    fp32_tflops: float  # plain fp32 (no TF32)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    source: str


GPUS = (
    GPU("A100 80GB SXM", 80, 312, 19.5, 2039, "NVIDIA A100 Tensor Core GPU datasheet (2021)"),
    GPU("H100 SXM", 80, 989, 67, 3350, "NVIDIA H100 Tensor Core GPU datasheet (2023)"),
    GPU("RTX 4090", 24, 165.2, 82.6, 1008, "NVIDIA Ada Lovelace GPU architecture whitepaper v1.1, appendix A"),
    GPU("RTX 3090", 24, 71, 35.6, 936, "NVIDIA Ampere GA102 GPU architecture whitepaper v2.1, table 9"),
    GPU("T4", 16, 65, 8.1, 320, "NVIDIA T4 Tensor Core GPU datasheet (2019); no bf16 tensor cores"),
)
CARDS_GIB = (8, 12, 16, 24, 40, 80)


@dataclass(frozen=True)
class Margin:
    """What a GPU needs beyond the planned live tensor bytes (docs/gpu-memory.md says where each comes from):
    the caching allocator's rounding and fragmentation as a fraction of the peak, and a fixed amount for the
    CUDA context, cuBLAS/cuDNN workspaces and kernels that the plan does not see."""

    fragmentation: float = 0.10
    fixed_gib: float = 1.0

    def needed_gib(self, peak_bytes: int) -> float:
        return peak_bytes * (1 + self.fragmentation) / GIB + self.fixed_gib


def fitting_cards(peak_bytes: int, margin: Margin, cards=CARDS_GIB) -> list[float]:
    """The card sizes (GiB) that hold ``peak_bytes`` with ``margin``."""
    need = margin.needed_gib(peak_bytes)
    return [c for c in cards if need <= c]


def roofline_seconds(costs: list[tuple[int, int, bool]], gpu: GPU) -> float:
    """Sum over ops of max(compute time, memory time) at the card's published peaks (a lower bound)."""
    total = 0.0
    for flops, moved, half in costs:
        rate = (gpu.half_tflops if half else gpu.fp32_tflops) * 1e12
        total += max(flops / rate, moved / (gpu.bandwidth_gbs * 1e9))
    return total


def estimates(costs: list[tuple[int, int, bool]]) -> dict[str, float]:
    return {g.name: round(roofline_seconds(costs, g), 4) for g in GPUS}
