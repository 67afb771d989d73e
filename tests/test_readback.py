"""HostReader: the workers' read-back of chosen tokens (pipespec/workers/readback.py says why it exists)."""

import pytest
import torch

from pipespec.workers.readback import HostReader


def test_reads_values_of_any_shape_as_python_ints_on_the_cpu() -> None:
    reader = HostReader()
    assert reader.ints(torch.tensor([[3, 4], [5, 6]])) == [3, 4, 5, 6]
    assert reader.ints(torch.tensor(7)) == [7]
    values = reader.ints(torch.tensor([2.0]))
    assert values == [2] and isinstance(values[0], int)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reads_back_through_a_pinned_buffer_on_the_worker_stream() -> None:
    reader = HostReader()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for n in (1, 5, 300, 3):  # grows past the first buffer, then reuses it
            t = torch.arange(n, device="cuda") * 3 + 1
            assert reader.ints(t) == [3 * i + 1 for i in range(n)]
        big = torch.full((4,), 2 ** 40, dtype=torch.long, device="cuda")
        assert reader.ints(big) == [2 ** 40] * 4
    assert all(b.is_pinned() for b in reader._buffers.values())
