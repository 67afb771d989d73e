"""Which device each stage runs on, and whether the models fit there.

Default on CUDA: one stage per GPU when there are enough GPUs; otherwise the target gets the last GPU to itself
(it is the bottleneck) and the smaller stages are packed onto the others. ``--placement 0,0,1`` chooses by hand;
``--placement 0,0,1+2`` puts the target on GPUs 1 and 2 (a *multi-device stage*, spelled ``cuda:1+cuda:2``: split
tensor-parallel or layer-wise, ``SPLITS``); with the Ray backend, ``--placement node1:0,node1:1,node2:0`` also names
each stage's node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["SPLITS", "NodeSlot", "free_gpu_memory", "gpu_shares", "layer_assignment", "parse_node_placement", "plan_placement",
           "parse_placement", "resolve_device", "stage_devices"]

# How a model placed on several devices is split: "tensor" (heads and MLP columns over the GPUs, one process per GPU,
# all GPUs read at once; the default) or "layers" (consecutive layers per GPU, one GPU reads at a time)
SPLITS = ("tensor", "layers")


def stage_devices(entry: str) -> list[str]:
    """One stage's device entry -> its devices: 'cuda:0' -> ['cuda:0'], 'cuda:0+cuda:1' -> both (rank 0 first)."""
    return [part.strip() for part in str(entry).split("+")]


def plan_placement(n_models: int, n_gpus: int) -> list[int]:
    """GPU index per model (smallest first). Pure: tested on the CPU."""
    if n_models <= 0:
        raise ConfigError("no models to place")
    if n_gpus <= 0:
        raise ConfigError("no GPU to place models on")
    if n_gpus >= n_models:
        return list(range(n_models))
    if n_gpus == 1:
        return [0] * n_models
    # the target alone on the last GPU; the others spread round-robin over the rest
    others = [i % (n_gpus - 1) for i in range(n_models - 1)]
    return [*others, n_gpus - 1]


def layer_assignment(n_layers: int, n_devices: int) -> list[int]:
    """The device (0..n_devices-1) of every layer of a layer-wise split: consecutive runs, as even as they can be
    (the first ``n_layers % n_devices`` devices take one more). Pure."""
    if n_devices < 1:
        raise ConfigError(f"a layer-wise split needs at least one device, got {n_devices}")
    base, extra = divmod(n_layers, n_devices)
    return [d for d in range(n_devices) for _ in range(base + (d < extra))]


def parse_placement(text: str, n_models: int, n_gpus: int) -> list[str]:
    """'0,0,1+2' -> ['cuda:0', 'cuda:0', 'cuda:1+cuda:2']; 'cpu' entries allowed. One entry per model; 'G+G[+G...]'
    is one model on several distinct GPUs."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n_models:
        raise ConfigError(f"--placement {text!r} has {len(parts)} entries for {n_models} models")
    devices: list[str] = []
    for part in parts:
        if part == "cpu":
            devices.append("cpu")
            continue
        gpus = [g.strip() for g in part.split("+")]
        if not all(g.isdigit() for g in gpus):
            raise ConfigError(f"--placement entry {part!r} is not a GPU index, GPU indices joined by '+', or 'cpu'")
        if len(set(map(int, gpus))) != len(gpus):
            raise ConfigError(f"--placement entry {part!r} names a GPU twice; a model's GPUs must be distinct")
        for g in gpus:
            if int(g) >= n_gpus:
                raise ConfigError(f"--placement uses GPU {g} but this machine has {n_gpus} GPU(s)")
        devices.append("+".join(f"cuda:{int(g)}" for g in gpus))
    return devices


def devices_for(n_models: int, device: str, placement: str | None, n_gpus: int) -> Sequence[str]:
    """The device of every model from the CLI's --device and --placement."""
    if placement:
        return parse_placement(placement, n_models, n_gpus)
    if device in ("auto", "cuda") and n_gpus > 0:
        return [f"cuda:{i}" for i in plan_placement(n_models, n_gpus)]
    return [device] * n_models


def estimate_bytes(folder: str, dtype_bytes: int, quantize: str | None = None) -> int | None:
    """Weights' size once loaded: the safetensors files' size, rescaled from the stored dtype. None if unknown.

    ``quantize`` ("int8", "fp8": weight-only, one byte a weight; "int4": half a byte plus a float32 scale per 128
    weights): everything but the embedding and lm_head (read off config.json's vocab_size x hidden_size, once where
    tied) shrinks to that; int8's per-channel scales and norms are lost in the rounding."""
    import json
    from pathlib import Path

    path = Path(folder)
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    if not files:
        return None
    stored = 2
    config: dict = {}
    try:
        config = json.loads((path / "config.json").read_text())
        name = str(config.get("dtype") or config.get("torch_dtype") or "float16")
        stored = 4 if "32" in name else 2
    except (OSError, ValueError):
        pass
    total = sum(f.stat().st_size for f in files) * dtype_bytes // stored
    if quantize is None:
        return total
    try:
        embed = int(config["vocab_size"]) * int(config["hidden_size"]) * dtype_bytes
    except (KeyError, TypeError, ValueError):
        embed = 0
    embed = min(total, embed if config.get("tie_word_embeddings", False) else 2 * embed)
    weights = (total - embed) // dtype_bytes
    if quantize == "int4":  # 128: kernels.quant.INT4_GROUP (placement is vocabulary: it may not import kernels)
        return embed + weights // 2 + weights * 4 // 128
    return embed + weights


def check_fits(needs: Sequence[tuple[str, str, int | None]], free: dict[str, int]) -> None:
    """needs: (model name, device entry, bytes or None) per model; free: bytes free per CUDA device. A model on
    several devices ('cuda:0+cuda:1') puts 1/n of its bytes on each (either split: tensor or layers).

    Raises a ConfigError naming the device, the models and a placement to try when a device would overflow.
    """
    per_device: dict[str, int] = {}
    for _, entry, size in needs:
        parts = stage_devices(entry)
        for device in parts:
            if device.startswith("cuda") and size:
                per_device[device] = per_device.get(device, 0) + size // len(parts)
    for device, total in per_device.items():
        available = free.get(device)
        if available is not None and total > 0.95 * available:
            names = ", ".join(n for n, d, _ in needs if device in stage_devices(d))
            raise ConfigError(
                f"{names} need about {total / 2**30:.1f} GiB on {device} but only {available / 2**30:.1f} GiB is "
                f"free; spread the models over more GPUs (e.g. --placement {','.join(str(i) for i in range(len(needs)))}) "
                "or use a smaller dtype")


def free_gpu_memory(workers_here: bool) -> dict[str, int] | None:
    """Bytes free per visible CUDA device ("cuda:N"). ``torch.cuda.mem_get_info`` only where the workers live in
    this process (the thread backend makes the contexts anyway): it creates a CUDA context on every GPU it asks
    about (some 500 MB each), which the process backend's parent must not hold, so there nvidia-smi answers. None
    when it cannot (the check is then skipped; a model that does not fit fails as it loads)."""
    import os
    import subprocess

    import torch

    if workers_here:
        return {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode:
        return None
    return smi_free_memory(done.stdout, os.environ.get("CUDA_VISIBLE_DEVICES"))


def smi_free_memory(text: str, visible: str | None) -> dict[str, int] | None:
    """Parse ``nvidia-smi --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits`` (MiB) into bytes free
    per CUDA device as this process numbers them (``visible``: CUDA_VISIBLE_DEVICES, indices or UUIDs, possibly
    abbreviated); None when an entry cannot be mapped (MIG instances, say). Pure: tested on the CPU."""
    free: dict[str, int] = {}  # physical index and UUID -> bytes
    uuids: list[str] = []
    try:
        for line in text.strip().splitlines():
            index, uuid, mib = (x.strip() for x in line.split(","))
            free[index] = free[uuid] = int(mib) * 2**20
            uuids.append(uuid)
    except ValueError:
        return None
    if visible is None:
        order = sorted((k for k in free if k.isdigit()), key=int)
    else:
        order = [v.strip() for v in visible.split(",") if v.strip()]
    out: dict[str, int] = {}
    for i, entry in enumerate(order):
        if entry not in free:
            matches = [u for u in uuids if u.startswith(entry)] if entry.startswith("GPU-") else []
            if len(matches) != 1:
                return None
            entry = matches[0]
        out[f"cuda:{i}"] = free[entry]
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; anything else is checked, not trusted."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!s} was asked for but CUDA is not available on this machine")
        index = dev.index if dev.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!s} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!s}: use auto, cpu, cuda or cuda:N")
    return dev


@dataclass(frozen=True, slots=True)
class NodeSlot:
    """Where one stage runs on a Ray cluster: a node (the name of a custom resource that node was started with:
    ``ray start --resources='{"node2": 1}'``) and its GPUs there (empty: the CPU). GPU indices only say which stages
    share a GPU: Ray chooses the physical GPU, and the stage sees it as ``cuda:0``."""

    node: str
    gpus: tuple[int, ...] = ()

    @property
    def device(self) -> str:
        return "cuda:0" if self.gpus else "cpu"


def parse_node_placement(text: str, n_models: int) -> list[NodeSlot]:
    """'node1:0,node1:1,node2:0+1' -> one NodeSlot per model ('node2:cpu' for the CPU; 'a+b' is several GPUs)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n_models:
        raise ConfigError(f"--placement {text!r} has {len(parts)} entries for {n_models} models")
    slots: list[NodeSlot] = []
    for part in parts:
        node, sep, spec = part.partition(":")
        if not sep or not node or not spec:
            raise ConfigError(f"--placement entry {part!r} is not NODE:GPU, NODE:GPU+GPU or NODE:cpu")
        if spec == "cpu":
            slots.append(NodeSlot(node))
            continue
        gpus = spec.split("+")
        if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
            raise ConfigError(f"--placement entry {part!r}: {spec!r} is not GPU indices joined by '+', or 'cpu'")
        slots.append(NodeSlot(node, tuple(int(g) for g in gpus)))
    return slots


def gpu_shares(slots: Sequence[NodeSlot]) -> list[float]:
    """The fraction of a GPU each stage asks Ray for: stages naming the same GPUs of a node split them."""
    users: dict[tuple[str, int], int] = {}
    for slot in slots:
        for gpu in slot.gpus:
            users[(slot.node, gpu)] = users.get((slot.node, gpu), 0) + 1
    shares = []
    for slot in slots:
        if not slot.gpus:
            shares.append(0.0)
        elif len(slot.gpus) == 1:
            shares.append(1.0 / users[(slot.node, slot.gpus[0])])
        else:  # a whole-GPU request: Ray gives fractions only below one GPU
            if any(users[(slot.node, g)] > 1 for g in slot.gpus):
                raise ConfigError(f"--placement: {slot.node}:{'+'.join(map(str, slot.gpus))} spans several GPUs "
                                  "that other stages use too; a stage on several GPUs needs them to itself")
            shares.append(float(len(slot.gpus)))
    return shares
