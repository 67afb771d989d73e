"""The output's commit timeline and the steady decode rate mode auto's probes compare."""

from __future__ import annotations

import pytest

from pipespec.scheduler.output import Output, steady_rate

from helpers import limit


def test_steady_rate_leaves_out_the_start_and_the_last_commit() -> None:
    # a slow start (prefills: 1 s to the first commit), rounds of 4 tokens every 0.1 s, then a last round cut off
    # at the length limit (1 token for a whole round's time)
    commits = [(1.0, 4)] + [(1.0 + 0.1 * i, 4 + 4 * i) for i in range(1, 6)] + [(1.6, 25)]
    assert steady_rate(commits) == pytest.approx(40.0)  # 4 tokens per 0.1 s; whole-run rate: 25 / 1.6 s
    assert steady_rate(commits[:2]) is None  # too few commits to leave anything out
    assert steady_rate([(1.0, 1), (1.0, 2), (1.0, 3)]) is None  # no time between them


@limit(10)
async def test_output_records_each_commit() -> None:
    out = Output(None, max_new_tokens=5)
    assert not await out.commit((1, 2))
    assert await out.commit((3, 4, 5, 6))  # the length limit keeps 3 of these
    assert [n for _, n in out.commits] == [2, 5]
    assert out.commits[0][0] <= out.commits[1][0]
