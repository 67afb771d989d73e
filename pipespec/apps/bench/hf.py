"""HF ``generate`` in a child process of its own, for ``pipespec bench --hf-isolation process``.

Why a process: HF's compiled static-cache ``generate`` (torch.compile ``reduce-overhead``: inductor CUDA-graph trees
with their own memory pool and per-thread state) and pipespec's own CUDA graphs in one process ended in an illegal
memory access on CUDA (issue 13). A child process shares no CUDA context, allocator, graph pool or compiled state
with the pipeline, so neither can corrupt the other, and a crash of the child is one method's failure.

Protocol: the parent starts ``python -m pipespec.apps.bench.hf`` and writes length-prefixed pickles to its stdin; the
child answers on a private copy of its original stdout (fd 1 itself is pointed at stderr first, so whatever a
library prints cannot corrupt the stream). Messages are plain dicts of builtins:

- ``{"op": "load", "target": (spec, device), "drafts": [(spec, device), ...], "dtype": str, ...}`` -> ``{"ok": True}``
- ``{"op": "generate", "prompt": [ids], "static": bool, "assistant": int | None}``
  -> ``{"ids": [ids], "seconds": float}``: the child's own clock, from the call to the ids on the host
- ``{"op": "exit"}``

Any failure in the child is answered ``{"error": "Type: message"}``; a dead child is a ``RuntimeError`` naming its
exit status and the tail of its stderr (kept in a temporary file).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from ...errors import first_line

__all__ = ["HFProcess"]

_HEADER = struct.Struct("<Q")


def _send(stream: IO[bytes], message: dict[str, Any]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)  # noqa: S301 - our own child process, over an anonymous pipe


class HFProcess:
    """The parent's side: one child process, used from one thread at a time (calls are serialised by a lock)."""

    def __init__(self, name: str, load: dict[str, Any], *, timeout: float = 900.0) -> None:
        self.name = name
        self.timeout = timeout
        self._lock = threading.Lock()
        self._stderr = tempfile.NamedTemporaryFile(prefix=f"pipespec-{name}-", suffix=".log", delete=False)
        root = str(Path(__file__).resolve().parents[3])  # the pipespec the parent runs, not an installed one
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self._proc = subprocess.Popen([sys.executable, "-m", "pipespec.apps.bench.hf"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=root)
        try:
            self.request({"op": "load", **load})
        except BaseException:  # a child that cannot load is stopped, and its log removed, before the error goes up
            self.close()
            raise

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message and wait for its answer; raises RuntimeError for an error answer or a dead child."""
        with self._lock:
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _send(proc.stdin, message)
                # a hung child must not hang the bench: wait for its answer at most `timeout` seconds
                ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
                if not ready:
                    proc.kill()
                    raise RuntimeError(f"HF worker process {self.name} gave no answer in {self.timeout:.0f} s "
                                       f"(killed); its stderr ends: {self.stderr_tail()}")
                answer = _receive(proc.stdout)
            except (BrokenPipeError, OSError):
                answer = None
            if answer is None:
                try:
                    code = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    code = None
                raise RuntimeError(f"HF worker process {self.name} died (exit status {code}); its stderr ends: "
                                   f"{self.stderr_tail()}")
            if "error" in answer:
                raise RuntimeError(f"in the HF worker process: {answer['error']}")
            return answer

    def stderr_tail(self, lines: int = 6) -> str:
        try:
            text = Path(self._stderr.name).read_text(errors="replace")
        except OSError:
            return "(unreadable)"
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) or "(empty)"

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                _send(proc.stdin, {"op": "exit"})
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=10)
        self._stderr.close()
        try:
            os.unlink(self._stderr.name)
        except OSError:
            pass


# -- HF generate, in whichever process runs it --------------------------------------------------------------------------------------------------


def hf_compile_config(mode: str) -> Any:
    """HF's CompileConfig for a torch.compile mode other than HF's default (reduce-overhead); None for the default."""
    if mode == "reduce-overhead":
        return None
    from transformers import CompileConfig

    return CompileConfig(mode=mode)


def hf_generate(model: Any, device: Any, prompt: tuple[int, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, prompt]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, prompt + generated]
    return tuple(out[0, len(prompt):].tolist())  # .tolist() waits for the GPU: the timing covers the whole run


# -- the child ---------------------------------------------------------------------------------------------------


class _Child:
    def __init__(self, load: dict[str, Any]) -> None:
        import torch

        from ...loading import load_model, resolve_dtype, resolve_source
        from ...placement import resolve_device

        torch.set_grad_enabled(False)
        spec, device = load["target"]
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(load["dtype"], self.device)
        trust = load.get("trust_remote_code", False)
        self.model = load_model(resolve_source(spec), self.device, self.dtype, trust_remote_code=trust)
        self.drafts: list[Any] = []
        for d_spec, d_device in load.get("drafts", []):
            dev = resolve_device(d_device)
            self.drafts.append(load_model(resolve_source(d_spec), dev, resolve_dtype(load["dtype"], dev),
                                          trust_remote_code=trust))
        self.kwargs: dict[str, Any] = dict(load["kwargs"])
        self.static_kwargs: dict[str, Any] = dict(load["static_kwargs"])
        config = hf_compile_config(load.get("compile_mode", "reduce-overhead"))
        if config is not None:
            self.static_kwargs["compile_config"] = config

    def generate(self, prompt: list[int], static: bool, assistant: int | None) -> dict[str, Any]:
        import torch

        kwargs = dict(self.kwargs)
        if static:
            kwargs.update(self.static_kwargs)
        if assistant is not None:
            kwargs["assistant_model"] = self.drafts[assistant]
        start = time.perf_counter()
        with torch.inference_mode():
            ids = hf_generate(self.model, self.device, tuple(prompt), kwargs)
        return {"ids": list(ids), "seconds": time.perf_counter() - start}


def _child_main() -> int:
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel
    os.dup2(2, 1)  # anything printed from here on goes to stderr
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    child: _Child | None = None
    while True:
        message = _receive(inp)
        if message is None or message.get("op") == "exit":
            return 0
        try:
            if message["op"] == "load":
                child = _Child(message)
                answer: dict[str, Any] = {"ok": True}
            elif message["op"] == "generate":
                if os.environ.get("PIPESPEC_TEST_HF_CHILD_CRASH") == "1":  # tests: a child that dies mid-run
                    os._exit(3)
                if child is None:
                    raise RuntimeError("generate before load")
                answer = child.generate(message["prompt"], message.get("static", False), message.get("assistant"))
            else:
                raise ValueError(f"unknown op {message.get('op')!r}")
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as an answer
            answer = {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
        _send(out, answer)


if __name__ == "__main__":
    sys.exit(_child_main())
