#!/usr/bin/env python3
"""Train pipespec's offline model family: three LLaMA-architecture causal LMs sharing one tokenizer.

The corpus is Python source that every machine has offline: the standard library's ``.py`` files
(``sysconfig.get_paths()["stdlib"]``, site-packages excluded) and, with ``--include-site-packages``, a
deterministic, size-capped sample of the installed site-packages.

Steps (all deterministic given ``--seed`` and the same Python installation):

1. collect the corpus: sorted file list, exact-duplicate files dropped, every ``--held-out-every``-th file
   (by sorted order) kept out of training as the held-out slice;
2. train a byte-level BPE tokenizer (``tokenizers``), saved as a ``transformers`` PreTrainedTokenizerFast folder;
3. train the target with cross-entropy (bf16 autocast + AdamW + cosine schedule);
4. train the middle and the draft together, on the same batches, distilled from the target's logits
   (``--distill-alpha`` * KL(target || student) + (1 - alpha) * CE); optionally (``--ablate-distill``) a
   CE-only draft on the same batches, for comparison only (never saved as an asset);
5. save each model as a standalone HF folder (float16 safetensors + tokenizer files) and measure, on the held-out
   slice: perplexity / bits per byte, teacher-forced greedy agreement and mean accepted length of 8-token greedy
   proposals, written to ``OUT/metrics.json``.

``--minutes`` is a time budget for the training steps of all three models: the script times the first steps of
each phase and picks the step count that fits; the chosen counts are printed and stored in metrics.json, and
passing them back as ``--target-steps`` / ``--student-steps`` (with ``--minutes 0``) reproduces the run's
schedule exactly (CUDA kernels themselves are not bitwise deterministic).

Smoke test on a CPU (about a minute)::

    python scripts/train_family.py --out /tmp/fam --device cpu --threads 1 --max-files 60 --vocab-size 512 \\
        --tiny --target-steps 4 --student-steps 4 --minutes 0 --seq-len 64 --batch-size 4
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SAMPLE_PROMPT = "def fibonacci(n):"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int


# Sizes: vocab 4096, tied embeddings. Parameters: draft ~0.9M, middle ~3.7M, target ~9.3M (~28 MB in float16).
DEFAULT_SPECS = {
    "draft": ModelSpec("draft", hidden=128, layers=2, heads=4, ffn=320),
    "middle": ModelSpec("middle", hidden=256, layers=4, heads=4, ffn=512),
    "target": ModelSpec("target", hidden=320, layers=7, heads=5, ffn=768),
}
TINY_SPECS = {
    "draft": ModelSpec("draft", hidden=32, layers=1, heads=2, ffn=64),
    "middle": ModelSpec("middle", hidden=48, layers=1, heads=2, ffn=96),
    "target": ModelSpec("target", hidden=64, layers=2, heads=2, ffn=128),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets draft/, middle/, target/, tokenizer/, metrics.json)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    # corpus
    p.add_argument("--include-site-packages", action="store_true", help="add a sample of the installed site-packages")
    p.add_argument("--site-packages-mb", type=float, default=120.0, help="cap on site-packages text (MB)")
    p.add_argument("--held-out-every", type=int, default=20, help="every N-th file (sorted order) is held out")
    p.add_argument("--held-out-fraction", type=float, default=None,
                   help="alternative to --held-out-every: held out = every round(1/fraction)-th file")
    p.add_argument("--max-files", type=int, default=0, help="use only the first N files of the sorted list (smoke tests)")
    p.add_argument("--max-file-kb", type=int, default=400, help="skip larger files")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-mb", type=float, default=40.0, help="text used to train the tokenizer (MB)")
    # models
    p.add_argument("--tiny", action="store_true", help="tiny sizes for smoke tests")
    for name, spec in DEFAULT_SPECS.items():
        p.add_argument(f"--{name}-size", default=None, metavar="HIDDEN,LAYERS,HEADS,FFN",
                       help=f"default {spec.hidden},{spec.layers},{spec.heads},{spec.ffn}")
    p.add_argument("--max-positions", type=int, default=2048)
    # training
    p.add_argument("--minutes", type=float, default=5.0, help="time budget for the training steps (0: use the step caps)")
    p.add_argument("--deadline-minutes", type=float, default=0.0,
                   help="wall-clock limit for the whole script: the training budget shrinks so that saving and "
                        "evaluation (--eval-reserve-s) still fit (0: no limit)")
    p.add_argument("--eval-reserve-s", type=float, default=75.0)
    p.add_argument("--target-share", type=float, default=0.55, help="share of the budget given to the target phase")
    p.add_argument("--target-steps", type=int, default=100000, help="cap on target steps")
    p.add_argument("--student-steps", type=int, default=100000, help="cap on middle+draft (distillation) steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--middle-lr", type=float, default=3e-3)
    p.add_argument("--draft-lr", type=float, default=4e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--distill-alpha", type=float, default=0.8, help="weight of KL(target||student); 0 = plain CE")
    p.add_argument("--ablate-distill", action="store_true", help="also train a CE-only draft, report it (not saved)")
    p.add_argument("--calib-steps", type=int, default=12, help="steps timed to size the schedule")
    p.add_argument("--log-every", type=int, default=50)
    # evaluation
    p.add_argument("--eval-tokens", type=int, default=262144, help="held-out tokens for perplexity/agreement")
    p.add_argument("--spec-prompts", type=int, default=50)
    p.add_argument("--spec-prompt-len", type=int, default=96)
    p.add_argument("--spec-gamma", type=int, default=8)
    p.add_argument("--spec-rounds", type=int, default=6, help="propose/verify rounds per prompt")
    p.add_argument("--sample-tokens", type=int, default=80)
    p.add_argument("--prepare-only", action="store_true", help="stop after the corpus and tokenizer (timing checks)")
    args = p.parse_args(argv)
    if args.held_out_fraction is not None:
        if not 0 < args.held_out_fraction < 1:
            p.error("--held-out-fraction must be in (0, 1)")
        args.held_out_every = max(2, round(1 / args.held_out_fraction))
    return args


def model_specs(args: argparse.Namespace) -> dict[str, ModelSpec]:
    base = TINY_SPECS if args.tiny else DEFAULT_SPECS
    specs = {}
    for name, spec in base.items():
        raw = getattr(args, f"{name}_size")
        if raw:
            h, l, nh, f = (int(x) for x in raw.split(","))
            spec = ModelSpec(name, h, l, nh, f)
        if spec.hidden % spec.heads:
            raise SystemExit(f"{name}: hidden {spec.hidden} is not a multiple of heads {spec.heads}")
        specs[name] = spec
    return specs


# ------------------------------------------------------------------------------------------------------- corpus
def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs = {Path(paths[k]).resolve() for k in ("purelib", "platlib") if k in paths}
    try:
        import site

        dirs.update(Path(d).resolve() for d in site.getsitepackages())
    except Exception:  # pragma: no cover - virtualenv oddities
        pass
    return sorted(d for d in dirs if d.is_dir())


def _usable(text: str) -> bool:
    if not text.strip():
        return False
    lines = text.split("\n")
    longest = max(len(line) for line in lines)
    return longest <= 2000 and len(text) / len(lines) <= 120


def _read(path: Path, max_bytes: int) -> str | None:
    try:
        if path.stat().st_size > max_bytes:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if _usable(text) else None


def _walk_py(root: Path, exclude: list[Path]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in ("site-packages", "dist-packages", "__pycache__") and (here / d).resolve() not in exclude
        )
        out.extend(here / f for f in filenames if f.endswith(".py"))
    return out


def collect_corpus(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, Any]]:
    """Return (train, held_out, info); each document is (name, text), names sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    site_dirs = _site_dirs()
    max_bytes = args.max_file_kb * 1024
    named: list[tuple[str, Path]] = [(f"stdlib/{p.relative_to(stdlib).as_posix()}", p) for p in _walk_py(stdlib, site_dirs)]
    if args.include_site_packages:
        cand: list[tuple[str, Path]] = []
        for i, d in enumerate(site_dirs):
            cand.extend((f"site{i}/{p.relative_to(d).as_posix()}", p) for p in _walk_py(d, [stdlib]))
        # deterministic sample: order by a hash of the name, take files until the cap, then sort again by name
        cand.sort(key=lambda t: hashlib.sha1(t[0].encode()).hexdigest())
        budget, taken = int(args.site_packages_mb * 1e6), []
        for name, path in cand:
            if budget <= 0:
                break
            text = _read(path, max_bytes)
            if text is not None:
                taken.append((name, path))
                budget -= len(text.encode())
        named.extend(taken)
    named.sort(key=lambda t: t[0])
    if args.max_files:
        named = named[: args.max_files]

    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    for name, path in named:
        text = _read(path, max_bytes)
        if text is None:
            continue
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in seen:  # exact duplicates are dropped before the split, so nothing held out leaks into training
            continue
        seen.add(h)
        docs.append((name, text))
    k = args.held_out_every
    held = [d for i, d in enumerate(docs) if i % k == k // 2]
    train = [d for i, d in enumerate(docs) if i % k != k // 2]
    digest = hashlib.sha1("\n".join(n for n, _ in docs).encode()).hexdigest()
    info = {
        "stdlib": str(stdlib),
        "site_packages": [str(d) for d in site_dirs] if args.include_site_packages else [],
        "files": len(docs),
        "train_files": len(train),
        "held_out_files": len(held),
        "held_out_rule": f"file index % {k} == {k // 2} in the sorted, deduplicated list",
        "train_bytes": sum(len(t.encode()) for _, t in train),
        "held_out_bytes": sum(len(t.encode()) for _, t in held),
        "file_list_sha1": digest,
    }
    return train, held, info


# ---------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train: list[tuple[str, str]], args: argparse.Namespace, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # deterministic subset: files ordered by a hash of their name until the byte budget is used
    order = sorted(train, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    budget, texts = int(args.tokenizer_mb * 1e6), []
    for _, text in order:
        if budget <= 0:
            break
        texts.append(text)
        budget -= len(text.encode())

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=args.max_positions,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # Make the folder explicit and version-independent: a plain PreTrainedTokenizerFast with its special tokens.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    keep = {k: cfg[k] for k in ("added_tokens_decoder",) if k in cfg}
    keep.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=args.max_positions,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
        padding_side="left",
    )
    cfg_path.write_text(json.dumps(keep, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
    )
    return load_tokenizer(out_dir)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def encode_docs(tok, docs: list[tuple[str, str]]) -> tuple[list[list[int]], int]:
    """Each document becomes <|bos|> text <|eos|>. Returns per-document ids and the total byte count."""
    backend = tok.backend_tokenizer
    bos, eos = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(EOS)
    encs = backend.encode_batch([t for _, t in docs], add_special_tokens=False)
    return [[bos, *e.ids, eos] for e in encs], sum(len(t.encode()) for _, t in docs)


# ------------------------------------------------------------------------------------------------------- models
def build_model(spec: ModelSpec, tok, args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        use_cache=True,
    )
    try:
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    except Exception:  # pragma: no cover - older/newer API differences
        model = LlamaForCausalLM(cfg)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()


def save_model(model, folder: Path, tok_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, do_sample=False
    )
    half = model.to(torch.float16)
    half.save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text())
    data["dtype"] = "float16"
    data["torch_dtype"] = "float16"
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copy2(tok_dir / f, folder / f)


def load_saved(folder: Path, device):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return m.to(device).eval()


# ----------------------------------------------------------------------------------------------------- training
class Batches:
    """Random windows of seq_len+1 tokens from the concatenated training stream, drawn with a seeded generator."""

    def __init__(self, stream, seq_len: int, batch: int, seed: int, device) -> None:
        import torch

        self.torch = torch
        self.stream = stream.to(device)
        self.seq_len, self.batch, self.device = seq_len, batch, device
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1, device=device)
        if len(stream) <= seq_len + 1:
            raise SystemExit(f"training stream of {len(stream)} tokens is shorter than --seq-len {seq_len}")

    def next(self):
        torch = self.torch
        starts = torch.randint(0, len(self.stream) - self.seq_len - 1, (self.batch,), generator=self.gen)
        idx = starts.to(self.device)[:, None] + self.offsets[None, :]
        w = self.stream[idx]
        return w[:, :-1], w[:, 1:]


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    warm = min(warmup, max(1, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_opt(model, lr: float, args: argparse.Namespace, device):
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_phase(name: str, step_fn, cap: int, budget_s: float, args: argparse.Namespace, device) -> tuple[int, float]:
    """Run step_fn(step, total) until `total` steps; total is fixed after timing the first calib steps."""
    calib = max(1, args.calib_steps)
    total = cap
    if budget_s > 0:  # provisional (only the warm-up lr depends on it), replaced after timing the first steps
        total = min(cap, max(calib + 2, int(budget_s / 0.005)))
    t0 = time.perf_counter()
    t_calib = None
    step = 0
    while step < total:
        if step == 2:  # skip the first steps (allocator warm-up, kernel selection) when timing
            _sync(device)
            t_calib = time.perf_counter()
        info = step_fn(step, total)
        step += 1
        if budget_s > 0 and step == calib + 2 and t_calib is not None:
            _sync(device)
            per = (time.perf_counter() - t_calib) / calib
            left = budget_s - (time.perf_counter() - t0)
            total = min(cap, step + max(0, int(left / per)))
            log(f"{name}: {per * 1000:.1f} ms/step -> {total} steps in {budget_s:.0f}s")
        if step % args.log_every == 0 or step == total:
            el = time.perf_counter() - t0
            tok = step * args.batch_size * args.seq_len
            log(f"{name} step {step}/{total} {info} | {el:.0f}s, {tok / max(el, 1e-9) / 1e6:.2f}M tok/s")
    _sync(device)
    return total, time.perf_counter() - t0


def train_target(model, batches: Batches, args, device, budget_s: float) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    opt = make_opt(model, args.target_lr, args, device)
    model.train()

    def step_fn(step: int, total: int) -> str:
        lr = lr_at(step, total, args.target_lr, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.next()
        with _autocast(device):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return f"loss {loss.item():.3f} lr {lr:.2e}" if (step + 1) % args.log_every == 0 or step + 1 == total else ""

    steps, secs = run_phase("target", step_fn, args.target_steps, budget_s, args, device)
    model.eval()
    return {"steps": steps, "seconds": round(secs, 1), "tokens": steps * args.batch_size * args.seq_len}


def train_students(teacher, students: dict[str, tuple[Any, float, float]], batches: Batches, args, device,
                   budget_s: float) -> dict[str, Any]:
    """students: name -> (model, peak lr, distill alpha). All see the same batches; one teacher forward per step."""
    import torch
    import torch.nn.functional as F

    opts = {n: make_opt(m, lr, args, device) for n, (m, lr, _) in students.items()}
    for m, _, _ in students.values():
        m.train()
    teacher.eval()
    need_teacher = any(a > 0 for _, _, a in students.values())

    def step_fn(step: int, total: int) -> str:
        x, y = batches.next()
        t_logp = None
        if need_teacher:
            with torch.no_grad(), _autocast(device):
                t_logits = teacher(input_ids=x, use_cache=False).logits
            t_logp = F.log_softmax(t_logits.float(), dim=-1).view(-1, t_logits.size(-1))
            del t_logits
        parts = []
        for n, (m, peak, alpha) in students.items():
            lr = lr_at(step, total, peak, args.warmup_steps, args.min_lr_ratio)
            for g in opts[n].param_groups:
                g["lr"] = lr
            with _autocast(device):
                logits = m(input_ids=x, use_cache=False).logits
            s_logp = F.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))
            ce = F.nll_loss(s_logp, y.reshape(-1))
            if alpha > 0:
                kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
                loss = alpha * kl + (1 - alpha) * ce
            else:
                kl, loss = None, ce
            opts[n].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip)
            opts[n].step()
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                parts.append(f"{n} ce {ce.item():.3f}" + (f" kl {kl.item():.3f}" if kl is not None else ""))
        return " | ".join(parts)

    steps, secs = run_phase("students", step_fn, args.student_steps, budget_s, args, device)
    for m, _, _ in students.values():
        m.eval()
    return {"steps": steps, "seconds": round(secs, 1), "tokens": steps * args.batch_size * args.seq_len}


# --------------------------------------------------------------------------------------------------- evaluation
def eval_windows(held_stream, args) -> "Any":
    import torch

    T = min(args.seq_len, 1024)
    n = min(len(held_stream) // (T + 1), max(1, args.eval_tokens // T))
    if n == 0:
        raise SystemExit("held-out slice too small for one evaluation window")
    stride = len(held_stream) // n  # spread the windows over the whole held-out slice
    return torch.stack([held_stream[i * stride: i * stride + T + 1] for i in range(n)])


def teacher_forced(models: dict[str, Any], windows, device, pairs: list[tuple[str, str]], batch: int = 16):
    """Per model: mean NLL (nats/token); per pair: fraction of positions where both argmaxes agree."""
    import torch
    import torch.nn.functional as F

    nll = {n: 0.0 for n in models}
    agree = {p: 0 for p in pairs}
    count = 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i: i + batch].to(device)
            x, y = w[:, :-1], w[:, 1:]
            argmax = {}
            for n, m in models.items():
                with _autocast(device):
                    logits = m(input_ids=x, use_cache=False).logits.float()
                nll[n] += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
                argmax[n] = logits.argmax(-1)
            for a, b in pairs:
                agree[(a, b)] += (argmax[a] == argmax[b]).sum().item()
            count += y.numel()
    return {n: v / count for n, v in nll.items()}, {p: v / count for p, v in agree.items()}, count


def spec_accept(small, large, prompts: list[list[int]], gamma: int, rounds: int, device) -> dict[str, float]:
    """Greedy speculative decoding: `small` proposes `gamma` greedy tokens, `large` keeps the longest prefix
    matching its own greedy choices and appends its correction/bonus token. Returns the mean accepted length."""
    import torch

    accepted: list[int] = []
    with torch.no_grad():
        for prompt in prompts:
            seq = torch.tensor([prompt], device=device)
            for _ in range(rounds):
                draft = seq
                for _ in range(gamma):
                    with _autocast(device):
                        nxt = small(input_ids=draft, use_cache=False).logits[:, -1].float().argmax(-1, keepdim=True)
                    draft = torch.cat([draft, nxt], dim=1)
                proposal = draft[0, seq.size(1):]
                with _autocast(device):
                    logits = large(input_ids=draft, use_cache=False).logits[0, seq.size(1) - 1:].float()
                choice = logits.argmax(-1)  # gamma + 1 verifier choices
                match = (choice[:gamma] == proposal).int()
                k = int(match.cumprod(0).sum().item())
                accepted.append(k)
                seq = torch.cat([seq, proposal[:k][None], choice[k: k + 1][None]], dim=1)
    n = max(1, len(accepted))
    return {
        "mean_accepted": sum(accepted) / n,
        "mean_tokens_per_verify": sum(a + 1 for a in accepted) / n,
        "acceptance_rate": sum(accepted) / (n * gamma),
        "rounds": len(accepted),
    }


def spec_prompts(held_docs_ids: list[list[int]], args) -> list[list[int]]:
    import random

    rng = random.Random(args.seed + 17)
    L = args.spec_prompt_len
    usable = [d for d in held_docs_ids if len(d) > L + 16]
    if not usable:
        return []
    prompts = []
    for i in range(args.spec_prompts):
        doc = usable[(i * len(usable)) // args.spec_prompts]
        end = rng.randrange(L, len(doc) - 8)
        prompts.append(doc[end - L: end])
    return prompts


def greedy_sample(model, tok, prompt: str, n: int, device) -> str:
    import torch

    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.size(1):], skip_special_tokens=True)


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import numpy as np
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = model_specs(args)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    log(f"env {env}")

    # corpus + tokenizer
    t0 = time.perf_counter()
    train_docs, held_docs, corpus = collect_corpus(args)
    log(f"corpus {corpus} ({time.perf_counter() - t0:.1f}s)")
    tok_dir = out / "tokenizer"
    tok = train_tokenizer(train_docs, args, tok_dir)
    log(f"tokenizer: {len(tok)} tokens ({time.perf_counter() - t0:.1f}s)")
    train_ids, train_bytes = encode_docs(tok, train_docs)
    held_ids, held_bytes = encode_docs(tok, held_docs)
    train_stream = torch.from_numpy(np.concatenate([np.asarray(d, dtype=np.int64) for d in train_ids]))
    held_stream = torch.from_numpy(np.concatenate([np.asarray(d, dtype=np.int64) for d in held_ids]))
    corpus.update(train_tokens=len(train_stream), held_out_tokens=len(held_stream),
                  bytes_per_token=round(train_bytes / len(train_stream), 3))
    log(f"tokens: train {len(train_stream):,} held-out {len(held_stream):,} "
        f"({train_bytes / len(train_stream):.2f} bytes/token, {time.perf_counter() - t0:.1f}s)")
    del train_docs, train_ids
    if args.prepare_only:
        return 0

    budget = args.minutes * 60
    if args.deadline_minutes > 0 and budget > 0:
        room = args.deadline_minutes * 60 - (time.time() - t_start) - args.eval_reserve_s
        if room < budget:
            log(f"deadline: training budget cut from {budget:.0f}s to {max(room, 30):.0f}s")
            budget = max(room, 30.0)
    corpus["training_budget_s"] = round(budget, 1)
    batches = Batches(train_stream, args.seq_len, args.batch_size, args.seed, device)

    # target
    torch.manual_seed(args.seed)
    target = build_model(specs["target"], tok, args).to(device)
    log(f"target: {n_params(target):,} params")
    train_info = {"target": train_target(target, batches, args, device, budget * args.target_share)}
    save_model(target, out / "target", tok_dir)

    # middle + draft, distilled from the target, on the same batches
    torch.manual_seed(args.seed + 1)
    middle = build_model(specs["middle"], tok, args).to(device)
    torch.manual_seed(args.seed + 2)
    draft = build_model(specs["draft"], tok, args).to(device)
    students = {"middle": (middle, args.middle_lr, args.distill_alpha), "draft": (draft, args.draft_lr, args.distill_alpha)}
    if args.ablate_distill:
        torch.manual_seed(args.seed + 2)  # same init as the distilled draft
        students["draft_ce"] = (build_model(specs["draft"], tok, args).to(device), args.draft_lr, 0.0)
    log("students: " + ", ".join(f"{n} {n_params(m):,} params" for n, (m, _, _) in students.items()))
    left = budget - train_info["target"]["seconds"] if budget > 0 else 0
    train_info["students"] = train_students(target, students, batches, args, device, max(left, 1.0) if budget > 0 else 0)
    save_model(middle, out / "middle", tok_dir)
    save_model(draft, out / "draft", tok_dir)
    train_seconds = train_info["target"]["seconds"] + train_info["students"]["seconds"]
    log(f"training done in {train_seconds:.0f}s")

    # evaluation on the saved float16 weights (computed in float32 / bf16 autocast on CUDA)
    del batches, train_stream
    models = {n: load_saved(out / n, device) for n in ("draft", "middle", "target")}
    if args.ablate_distill:
        models["draft_ce"] = students["draft_ce"][0].to(torch.float16).to(torch.float32).eval()
    del students, target, middle, draft
    pairs = [("draft", "middle"), ("middle", "target"), ("draft", "target")]
    if args.ablate_distill:
        pairs += [("draft_ce", "middle"), ("draft_ce", "target")]
    windows = eval_windows(held_stream, args)
    nll, agree, count = teacher_forced(models, windows, device, pairs)
    held_tokens_per_byte = len(held_stream) / held_bytes
    metrics: dict[str, Any] = {
        "env": env,
        "corpus": corpus,
        "training": train_info,
        "train_seconds": round(train_seconds, 1),
        "models": {},
        "held_out": {"eval_tokens": count, "seq_len": windows.size(1) - 1},
        "greedy_agreement": {f"{a}->{b}": round(v, 4) for (a, b), v in agree.items()},
        "speculative": {},
    }
    for n, m in models.items():
        entry = {
            "perplexity": round(math.exp(nll[n]), 3),
            "nll_per_token": round(nll[n], 4),
            "bits_per_byte": round(nll[n] * held_tokens_per_byte / math.log(2), 4),
            "params": n_params(m),
        }
        if n in specs:
            entry.update(asdict(specs[n]))
            entry["folder_mb"] = round(folder_mb(out / n), 2)
        metrics["models"][n] = entry
    prompts = spec_prompts(held_ids, args)
    metrics["speculative"]["setup"] = {"prompts": len(prompts), "prompt_tokens": args.spec_prompt_len,
                                       "gamma": args.spec_gamma, "rounds_per_prompt": args.spec_rounds,
                                       "decoding": "greedy; accepted = longest matching prefix of the proposal"}
    for a, b in pairs:
        t1 = time.perf_counter()
        res = spec_accept(models[a], models[b], prompts, args.spec_gamma, args.spec_rounds, device)
        metrics["speculative"][f"{a}->{b}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
        log(f"spec {a}->{b}: {res} ({time.perf_counter() - t1:.1f}s)")
    metrics["samples"] = {n: greedy_sample(models[n], tok, SAMPLE_PROMPT, args.sample_tokens, device)
                          for n in ("draft", "middle", "target")}
    if prompts:  # and one held-out file: the prompt is the file's own text, never seen in training
        held_prompt = tok.decode(prompts[0], skip_special_tokens=True)
        metrics["held_out_sample"] = {"prompt": held_prompt,
                                      **{n: greedy_sample(models[n], tok, held_prompt, args.sample_tokens, device)
                                         for n in ("draft", "middle", "target")}}
    metrics["family_mb"] = round(sum(folder_mb(out / n) for n in ("draft", "middle", "target")), 2)
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print("\n==== held-out metrics ====")
    for n, e in metrics["models"].items():
        print(f"{n:9s} params {e['params']:>10,}  ppl {e['perplexity']:8.3f}  bits/byte {e['bits_per_byte']:.4f}"
              + (f"  {e['folder_mb']:.2f} MB" if "folder_mb" in e else ""))
    for k, v in metrics["greedy_agreement"].items():
        s = metrics["speculative"][k]
        print(f"{k:16s} greedy agreement {v:.4f}   mean accepted of {args.spec_gamma}: {s['mean_accepted']:.3f}")
    print(f"family size {metrics['family_mb']} MB; training {train_seconds:.0f}s; total {metrics['total_seconds']}s")
    print(f"target sample:\n{SAMPLE_PROMPT}{metrics['samples']['target']}")
    if "held_out_sample" in metrics:
        h = metrics["held_out_sample"]
        print(f"target on a held-out file:\n{h['prompt'][-200:]}<<<{h['target']}>>>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
