"""Pure analysis of a chain: the paper's analytical model (``model``), the oracle of greedy fake models
(``oracle``), the discrete-event simulation (``simulation``) and what ``plan`` predicts and recommends (``plan``).
No threads, no torch, no logging; everything else may import it, it imports only the shared vocabulary."""

from .model import (
    expected_tokens_per_step,
    lockstep_speedup,
    pipespec_speedup,
    predict_throughput,
    verification_probability,
    window_tokens,
)
from .simulation import SimResult, StageCounts, simulate

__all__ = ["SimResult", "StageCounts", "expected_tokens_per_step", "lockstep_speedup", "pipespec_speedup",
           "predict_throughput", "simulate", "verification_probability", "window_tokens"]
