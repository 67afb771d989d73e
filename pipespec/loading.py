"""Where models come from: aliases, the built-in family, local folders, GGUF files and hub ids.

Model files are data, never code: ``trust_remote_code`` stays off unless asked for, safetensors is preferred, and a
pickle checkpoint loads only through torch's weights-only loader.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError, first_line

# transformers builds models under process-wide patches (empty weights on the meta device); two loads in two
# runner threads at once corrupt each other, so construction is serialised. Moving weights to devices is not.
_CONSTRUCT = threading.Lock()

__all__ = ["ALIASES", "BUILTIN", "DEFAULT_CHAIN", "Source", "resolve_source", "load_model", "load_tokenizer",
           "resolve_dtype", "preload_transformers"]

ASSETS = Path(__file__).resolve().parent / "assets" / "family"

# The built-in family: trained by scripts/train_family.py, shipped in the package, works offline.
BUILTIN: dict[str, Path] = {
    "tiny-draft": ASSETS / "draft",
    "tiny-middle": ASSETS / "middle",
    "tiny-target": ASSETS / "target",
}
DEFAULT_CHAIN = ("tiny-draft", "tiny-middle", "tiny-target")

# Short names for public checkpoints (need the hub or a local cache of it).
ALIASES: dict[str, str] = {
    "68m": "JackFram/llama-68m",
    "160m": "JackFram/llama-160m",
    "7b": "meta-llama/Llama-2-7b-hf",
    "13b": "meta-llama/Llama-2-13b-hf",
    "70b": "meta-llama/Llama-2-70b-hf",
    "1b": "meta-llama/Llama-3.2-1B-Instruct",
    "3b": "meta-llama/Llama-3.2-3B-Instruct",
    "8b": "meta-llama/Llama-3.1-8B-Instruct",
    "70b-3.1": "meta-llama/Llama-3.1-70B-Instruct",
    # the modern hierarchies: each family shares one tokenizer across its sizes, and all take the static fast path.
    # Qwen2.5's output layers differ in size (0.5B/1.5B: 151936 rows, 7B/72B: 152064 of padding past one
    # tokenizer); they chain across that split (scheduler.pipeline._check_vocabularies, docs/usage.md)
    "llama3-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
}


@dataclass(frozen=True, slots=True)
class Source:
    spec: str  # what the user typed
    kind: str  # "builtin" | "folder" | "gguf" | "hub"
    location: str  # a path, or a hub id
    name: str  # what the live view and stats call it

    @property
    def path(self) -> Path:
        return Path(self.location)


def preload_transformers() -> None:
    """Resolve transformers' lazy attributes on the calling thread. Its lazy module is not thread-safe: two runner
    threads resolving ``AutoModelForCausalLM`` at once can fail with an ImportError (seen with transformers 5.17)."""
    import transformers

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "DynamicCache", "LlamaForCausalLM", "LlamaConfig"):
        getattr(transformers, name)


def resolve_source(spec: str) -> Source:
    """Turn what the user typed into a place to load from; a missing local path fails here, clearly."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty model name in --models")
    if spec in BUILTIN:
        path = BUILTIN[spec]
        if not (path / "config.json").exists():
            raise ModelLoadError(f"built-in model {spec!r} is missing from this installation ({path})")
        return Source(spec, "builtin", str(path), spec)
    if spec in ALIASES:
        return Source(spec, "hub", ALIASES[spec], spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return Source(spec, "gguf", str(path), path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a folder but holds no config.json: not a transformers model folder")
        return Source(spec, "folder", str(path), path.name)
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_local or path.exists():
        raise ModelLoadError(f"model folder not found: {spec}")
    if spec.count("/") == 1:
        return Source(spec, "hub", spec, spec.split("/")[1])
    known = ", ".join([*BUILTIN, *ALIASES])
    raise ModelLoadError(f"unknown model {spec!r}: not an alias ({known}), a folder, a .gguf file or a hub id")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _local_dir(source: Source) -> Path:
    """A folder holding the model: local sources as they are, hub ids from the cache or (if reachable) the hub."""
    if source.kind in ("builtin", "folder"):
        return source.path
    if source.kind == "gguf":
        return source.path.parent
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(source.location, local_files_only=True, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"{source.spec!r} ({source.location}) is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE set); download it elsewhere and pass its local folder, e.g. "
            f"--models /path/to/{source.location.split('/')[-1]}")
    try:
        return Path(snapshot_download(source.location, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not download {source.location}: {first_line(exc) or type(exc).__name__}") from None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def _check_weights_are_data(folder: Path) -> bool:
    """True when the folder has safetensors weights; refuse pickles that need more than the weights-only loader."""
    if any(folder.glob("*.safetensors")):
        return True
    for pickle_file in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")):
        try:  # mmap only works on zip checkpoints; the legacy format goes through the same weights-only unpickler
            torch.load(pickle_file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(pickle_file))
        except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses anything that is not tensors
            raise ModelLoadError(
                f"refusing to load {pickle_file}: it is not a plain weights file ({_unpickling_refusal(exc)})"
            ) from None
    return False


def _unpickling_refusal(exc: Exception) -> str:
    """The reason in torch's long weights-only error (which goes on to explain how to load the file anyway)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"unpickling it would call {found.group(1)}; only tensors are allowed"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = found.group(1) if found else (first_line(exc, 120) or type(exc).__name__)
    return reason.strip()[:120]


def load_model(source: Source, device: torch.device, dtype: torch.dtype, *, trust_remote_code: bool = False) -> Any:
    """Load one causal LM onto ``device`` in eval mode. Runs on the model's runner thread."""
    from transformers import AutoModelForCausalLM

    folder = _local_dir(source)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    try:
        with _CONSTRUCT:
            if source.kind == "gguf":
                model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=source.path.name, **kwargs)
            else:
                kwargs["use_safetensors"] = _check_weights_are_data(folder)
                model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except ModelLoadError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"out of GPU memory loading {source.name} on {device}; "
                             "try another placement (--placement) or a smaller dtype") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        first = first_line(exc, 300) or type(exc).__name__
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            first = f"{first[:200]} (it ships its own Python code: pass --trust-remote-code only if you trust it)"
        raise ModelLoadError(f"could not load model {source.spec!r}: {first[:300]}") from None
    try:
        model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"out of GPU memory placing {source.name} on {device}; "
                             "try another placement (--placement) or a smaller dtype") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not move model {source.spec!r} to {device}: "
                             f"{first_line(exc) or type(exc).__name__}") from None
    model.eval()
    return model


def load_tokenizer(source: Source, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = _local_dir(source)
    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc, 300) or type(exc).__name__
        raise ModelLoadError(f"could not load the tokenizer of {source.spec!r}: {first[:300]}") from None
