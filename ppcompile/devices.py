"""Device profiles for the roofline cost model.

Peak numbers come from vendor datasheets (dense, no sparsity); the CPU profile is a
conservative figure for a small x86 machine running PyTorch's CPU kernels. A profile
only has to rank stages correctly, not predict seconds exactly; measured profiles come
with the cost-model issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppcompile.errors import CompileError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops_fp32: float  # peak FLOP/s for float32 math
    flops_half: float  # peak FLOP/s for float16 / bfloat16 math
    memory_bandwidth: float  # bytes/s to device memory
    link_bandwidth: float  # bytes/s from one pipeline rank to the next
    link_latency: float  # seconds per message
    op_overhead: float  # seconds of fixed cost per operator (dispatch, kernel launch)
    memory_bytes: float  # device memory, for the default memory budget
    send_overhead: float = 0.0  # seconds of the sender's own time per message (its send call)
    idle_latency: float | None = None  # seconds per message to a rank blocked on it, if sooner

    @property
    def device_type(self) -> str:
        """The torch device type the profile's programs run on: ``torch.autocast("cuda")`` in a
        model changes dtypes there only."""
        return "cpu" if self.name == "cpu" else "cuda"

    def peak_flops(self, dtype: torch.dtype) -> float:
        return self.flops_half if dtype in (torch.float16, torch.bfloat16) else self.flops_fp32

    def compute_time(self, flops: float, bytes_moved: float, dtype: torch.dtype) -> float:
        """Roofline: the slower of arithmetic and memory traffic, plus the per-op overhead."""
        return max(flops / self.peak_flops(dtype), bytes_moved / self.memory_bandwidth) + self.op_overhead

    def transfer_time(self, nbytes: float) -> float:
        """When a message arrives after it was sent: latency plus its bytes over the bandwidth."""
        return self.link_latency + nbytes / self.link_bandwidth

    def transfer_occupancy(self, nbytes: float) -> float:
        """How long one direction of a tensor keeps a stage busy, as the partitioner counts it: its
        bytes over the bandwidth. The send call is per message, not per tensor (the partitioner
        adds ``send_overhead`` per cut), and the latency only delays the receiver, which
        meanwhile computes other micro-batches."""
        return nbytes / self.link_bandwidth


GiB = 1024**3

PROFILES = {
    # Two x86 cores with AVX2, gloo over loopback between ranks.
    "cpu": DeviceProfile("cpu", 5e10, 5e10, 1e10, 2e9, 5e-5, 4e-6, 24 * GiB),
    # A100 SXM4 80GB: 19.5 TFLOP/s FP32, 312 TFLOP/s BF16, 2039 GB/s HBM2e, NVLink 300 GB/s per direction.
    "a100": DeviceProfile("a100", 19.5e12, 312e12, 2.039e12, 300e9, 1e-5, 5e-6, 80 * GiB),
    # H100 SXM5 80GB: 67 TFLOP/s FP32, 989 TFLOP/s BF16, 3.35 TB/s HBM3, NVLink 450 GB/s per direction.
    "h100": DeviceProfile("h100", 67e12, 989e12, 3.35e12, 450e9, 1e-5, 4e-6, 80 * GiB),
}


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise CompileError(f"unknown device profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


def check_device(name: str, option: str = "--profile-device") -> torch.device:
    """The torch device ``name`` (cpu, cuda, cuda:N) that ``option`` gave, if this machine has it.

    >>> check_device("cpu")
    device(type='cpu')
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CompileError(f"{option} {name!r} is not a device name; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise CompileError(f"{option} {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompileError(f"{option} {name}: torch sees no CUDA device on this machine; use {option} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CompileError(f"{option} {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device
