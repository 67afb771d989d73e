"""pipespec: hierarchical, asynchronous speculative decoding over a chain of causal language models.

The public API is what ``__all__`` lists; every other module is internal.
"""

from .errors import ConfigError, ModelLoadError, PipelineClosed, PipelineError, PipespecError
from .scheduler import Pipeline
from .types import Generation, GenerationStats, Snapshot
from .verify import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "Generation",
    "GenerationStats",
    "Snapshot",
    "SamplingParams",
    "PipespecError",
    "ConfigError",
    "ModelLoadError",
    "PipelineError",
    "PipelineClosed",
    "__version__",
]
