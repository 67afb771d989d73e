"""Reading a worker's few chosen tokens back to the host without waiting for other streams' work.

Why (issue 14, measured on an H200 with ``scripts/gpu_share.py``, commit 6717b23): a 68M draft whose result is read
back with ``tensor.tolist()`` made one forward per 5.7 ms beside a 7B looping on the same GPU in another thread (the
7B's own pace; 0.23 ms alone), at every stream priority and ``CUDA_DEVICE_MAX_CONNECTIONS``. The same loop waiting on
a CUDA event of its own stream instead made one per 0.40 ms (the 7B: 5.6 -> 6.6 ms); a 1B beside an 8B 6.6 -> 3.6 ms.
``tolist()`` on a device tensor copies into pageable host memory, and that copy waits for more than its own stream's
work. So the copy goes into a pinned buffer without blocking, and the host waits on an event recorded right after it
on the worker's stream: only this worker's work.
"""

from __future__ import annotations

from typing import Any

import torch


class HostReader:
    """One worker's read-backs (used from the worker's runner thread only). ``ints`` returns a small integer
    tensor's values as a list; on a CUDA device through a pinned buffer and an event of the current stream."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}  # pinned, 1-D, grown on demand
        self._event: Any = None

    def ints(self, tensor: torch.Tensor) -> list[int]:
        if tensor.device.type != "cuda":
            return [int(v) for v in tensor.reshape(-1).tolist()]
        flat = tensor.reshape(-1)
        n = flat.numel()
        buffer = self._buffers.get(flat.dtype)
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(max(n, 256), dtype=flat.dtype, pin_memory=True)
            self._buffers[flat.dtype] = buffer
        if self._event is None:
            self._event = torch.cuda.Event()
        out = buffer[:n]
        # the previous read-back out of this buffer has finished: its event was waited for before it returned
        out.copy_(flat, non_blocking=True)
        self._event.record(torch.cuda.current_stream(tensor.device))
        self._event.synchronize()
        return [int(v) for v in out.tolist()]
