"""The oracle: greedy fake models of a chain, a pure function of the prefix, agreeing with their neighbours at a
set rate.

- the target's token at position p is a hash of (seed, the whole prefix seq[:p]), modulo ``vocab``;
- stage i's token equals stage i+1's with probability alpha_i, decided by a hash of (seed, i, prefix); otherwise it
  is a different token (never equal to stage i+1's). With a recorded trace instead of a rate, stage i agrees at the
  j-th generated position iff ``trace[j % len(trace)]`` is 1 (j counts from the end of the prompt).

So neighbours agree with probability alpha_i per position, i.i.d. over prefixes; the same prefix always gives the
same choice, as with a deterministic model, so every mode must commit the target's own tokens. Used by the
discrete-event simulation (``analysis.simulation``), the sleeping workers (``workers.simulated``) and the real-shape
synthetic workers (``workers.synthetic``). Pure integer arithmetic: no threads, no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["AcceptanceSpec", "MASK", "Oracle", "SALT_OTHER", "SALT_STAGE", "mix"]

MASK = (1 << 64) - 1
_ROOT = 0x5EED5EED5EED5EED
SALT_STAGE = 0xA24BAED4963EE407
SALT_OTHER = 0x632BE59BD9B4E019

# A per-token acceptance: a rate alpha in [0, 1], or a recorded trace of 0/1 per generated position.
AcceptanceSpec = float | Sequence[int]


def mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


class Oracle:
    """The greedy choices of every model of a simulated chain; pure and deterministic given the seed.

    ``acceptance[i]`` links stage i to stage i+1 (``len(acceptance) + 1`` stages). Prefixes are named by a rolling
    hash (``root`` for the empty sequence, ``extend`` for one more token), so a choice costs O(chain length).
    """

    def __init__(self, acceptance: Sequence[AcceptanceSpec], seed: int = 0, vocab: int = 32000) -> None:
        if vocab < 2:
            raise ConfigError(f"the simulated vocabulary needs at least 2 tokens, got {vocab}")
        self.vocab = vocab
        self.stages = len(acceptance) + 1
        self._salt = mix(seed & MASK)
        self.root = mix(self._salt ^ _ROOT)
        self._thresholds: list[int | None] = []
        self._traces: list[tuple[int, ...] | None] = []
        self.rates: list[float] = []  # alpha per link (a trace's mean), for the analytical model
        for i, spec in enumerate(acceptance):
            if isinstance(spec, (int, float)):
                if not 0.0 <= float(spec) <= 1.0:
                    raise ConfigError(f"acceptance[{i}] must be in [0, 1], got {spec!r}")
                # agree iff tag < alpha * 2^64; alpha = 1 must always agree (every tag is < 2^64)
                self._thresholds.append(int(float(spec) * 2.0**64))
                self._traces.append(None)
                self.rates.append(float(spec))
            else:
                trace = tuple(int(x) for x in spec)
                if not trace or any(x not in (0, 1) for x in trace):
                    raise ConfigError(f"acceptance trace {i} must be a non-empty list of 0/1")
                self._thresholds.append(None)
                self._traces.append(trace)
                self.rates.append(sum(trace) / len(trace))

    def extend(self, prefix_hash: int, token: int) -> int:
        return mix(prefix_hash ^ mix(token ^ self._salt))

    def choice(self, stage: int, prefix_hash: int, position: int) -> int:
        """Stage ``stage``'s greedy token after the prefix named by ``prefix_hash``; ``position`` counts generated
        tokens (0 = the first token after the prompt) and only matters to traces."""
        token = mix(prefix_hash ^ self._salt) % self.vocab  # the target's choice
        for j in range(self.stages - 2, stage - 1, -1):  # walk down the chain: M(j) vs M(j+1)
            tag = mix(prefix_hash ^ self._salt ^ (((j + 1) * SALT_STAGE) & MASK))
            trace, threshold = self._traces[j], self._thresholds[j]
            if trace is not None:
                agrees = trace[position % len(trace)] == 1
            else:
                agrees = tag < threshold  # type: ignore[operator]
            if not agrees:  # a different token: never equal to M(j+1)'s
                token = (token + 1 + mix(tag ^ SALT_OTHER) % (self.vocab - 1)) % self.vocab
        return token

    def with_prompt(self, prompt: Sequence[int]) -> Oracle:
        """The same models with ``root`` naming ``prompt``: what ``simulation.simulate(models=...)`` needs to replay
        the generation a real run made from that prompt."""
        view = copy.copy(self)
        view.root = self.hashes(prompt)[-1]
        return view

    def hashes(self, seq: Sequence[int]) -> list[int]:
        """hashes[p] names seq[:p], p = 0..len(seq)."""
        out = [self.root]
        for t in seq:
            out.append(self.extend(out[-1], t))
        return out
