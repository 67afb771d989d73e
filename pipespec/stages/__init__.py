"""Stage coroutines: the draft stage (stage 0) and the verifying stage (every later stage, the target included).

Stages know nothing of the scheduler: they get a ``Stage`` (their runner, model worker, channels and limits) and run
until cancelled, or, for the target, until its commit callback says the generation is over.
"""

from .base import Stage, StageConfig, StageIO
from .draft import run_draft
from .verifier import run_verifier

__all__ = ["Stage", "StageConfig", "StageIO", "run_draft", "run_verifier"]
