"""Host tensors onto the model's device without a stream synchronisation.

The forward builds small index tensors on the host (vision position ids, the crops' order, the image-token
positions, the packed rows' boundaries) from the sizes and spans it reads there. A plain `.to(cuda)` of one is a
blocking copy: torch waits for the whole CUDA stream to drain first (its `memcpy_and_sync`), so each such copy costs
the GPU its queue, like a device-to-host read. `host_to_device` queues the copy instead: from page-locked memory
(torch's caching host allocator keeps the block until the copy has run), `non_blocking`, so the host goes on
launching.

Off CUDA (the CPU tests, other accelerators) it is a plain `.to(device)`.

Tests: tests/unit/train/test_host_reads.py -k queues (CPU: every move of a host tensor to the device made by this
package in a training forward is queued) and tests/gpu/test_host_syncs_gpu.py (forward and backward under torch's
sync debug mode: no sync from this package).
"""
from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for CUDA is pinned and copied asynchronously (no stream sync)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device, non_blocking=True)
