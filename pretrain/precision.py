"""Which floating-point precision the hardware runs natively, and the ds_config that follows.

A bf16 matmul is only fast where the hardware has bf16 arithmetic:
- CUDA: compute capability >= 8.0 (A100, H100, ...). Older GPUs (V100, T4) run fp16 with dynamic
  loss scaling instead.
- CPU: AVX512-BF16 or AMX. Without them (e.g. AMD EPYC / Intel CPUs with AVX2 only) torch
  emulates bf16 and a matmul is 15-25x slower than fp32 (537 ms vs 31 ms for 4096x128 @ 128x512
  on an AVX2-only AMD EPYC, one thread); fp32 is the fast path there.

A ds_config asks for a precision with `"bf16": {"enabled": true}` / `"fp16": {"enabled": true}`, or
for the native one with `"enabled": "auto"` (configs/zero{1,2,3}.json); the trainer's
`--precision` flag overrides either. An explicit bf16 on a CPU that only emulates it still runs as
asked, with one warning at start that says how much slower it is (measured here, now) and what to
use instead.

`BERT_CPU_BF16=native|emulated` overrides the CPU detection (tests force either answer with it).
oneDNN's `ONEDNN_MAX_CPU_ISA` below AVX512_CORE_BF16 also means emulated: torch's bf16 matmuls
then cannot use the bf16 instructions even where the CPU has them.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
# fp16 with dynamic loss scaling, as configs/zero*_fp16.json (DeepSpeed's fields).
FP16_DYNAMIC = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                "hysteresis": 2, "min_loss_scale": 1}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "this CPU"


def cpu_has_native_bf16(flags: Optional[set] = None, env=None) -> bool:
    """True where a CPU bf16 matmul runs on bf16 instructions (AVX512-BF16 or AMX)."""
    env = os.environ if env is None else env
    forced = env.get("BERT_CPU_BF16", "").strip().lower()
    if forced in ("native", "emulated"):
        return forced == "native"
    if forced:
        raise ValueError(f"BERT_CPU_BF16={forced!r}: use 'native' or 'emulated' (or unset it to detect)")
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return False
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in _CPU_BF16_FLAGS)


def device_type(env=None) -> str:
    """Where training will run: "cuda" when a GPU is visible and DeepSpeed is not forced to CPU."""
    env = os.environ if env is None else env
    if env.get("DS_ACCELERATOR", "").lower() == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_capability() -> tuple:
    return torch.cuda.get_device_capability()


def native_precision(device: str, capability: Optional[tuple] = None, cpu_bf16: Optional[bool] = None) -> str:
    """The fastest precision that trains BERT well on `device` ("cuda" or "cpu")."""
    if device == "cuda":
        capability = cuda_capability() if capability is None else capability
        return "bf16" if tuple(capability) >= (8, 0) else "fp16"
    cpu_bf16 = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
    return "bf16" if cpu_bf16 else "fp32"


def requested_precision(ds: dict) -> str:
    """"fp32" | "bf16" | "fp16" | "auto" as a ds_config states it; ValueError if contradictory."""
    def enabled(block):
        value = ds.get(block, {}).get("enabled", False) if isinstance(ds.get(block), dict) else False
        if value not in (True, False, "auto"):
            raise ValueError(f"\"{block}\": {{\"enabled\": {value!r}}} must be true, false or \"auto\"")
        return value

    bf16, fp16 = enabled("bf16"), enabled("fp16")
    if "auto" in (bf16, fp16):
        if True in (bf16, fp16):
            raise ValueError("one of bf16/fp16 is \"auto\" and the other true: use \"auto\" alone or name one precision")
        return "auto"
    if bf16 and fp16:
        raise ValueError("enable either fp16 or bf16, not both")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def apply_precision(ds: dict, precision: str) -> dict:
    """A copy of `ds` whose bf16/fp16 blocks select `precision` (fp16 keeps the file's loss-scale
    settings, else dynamic scaling as configs/zero*_fp16.json)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {PRECISIONS}")
    out = dict(ds)
    bf16 = dict(out.get("bf16") or {})
    fp16 = dict(out.get("fp16") or {})
    bf16["enabled"] = precision == "bf16"
    if precision == "fp16":
        fp16 = {**FP16_DYNAMIC, **{k: v for k, v in fp16.items() if k != "enabled"}, "enabled": True}
    else:
        fp16["enabled"] = False
    out["bf16"], out["fp16"] = bf16, fp16
    return out


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """bf16 / fp32 time of one size^3 matmul on this CPU, measured now (best of `repeats`)."""
    a = torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # first call: allocation and kernel selection
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t)
        times[dtype] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def resolve(requested: str, device: str, source: str, measure=bf16_slowdown) -> tuple:
    """(precision to run, warning or None) for what the config or flag asked.

    "auto" -> the native precision of `device`. An explicit bf16 on a CPU without native bf16
    runs as asked, with a warning; fp16 on CPU is refused (DeepSpeed has no CPU fp16), so is a
    name that is not a precision.
    """
    if requested == "auto":
        return native_precision(device), None
    if requested not in PRECISIONS:
        raise ValueError(f"{source}: precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if device == "cpu" and requested == "fp16":
        raise ValueError(f"{source} asks for fp16, which DeepSpeed does not run on CPU; use --precision auto "
                         "(fp32, or bf16 where the CPU has it) or a bf16/fp32 ds_config")
    if device == "cuda" and requested == "bf16" and tuple(cuda_capability()) < (8, 0):
        major, minor = cuda_capability()
        return "bf16", (
            f"{source} asks for bf16, but this GPU (compute capability {major}.{minor}) has no bf16 tensor cores: "
            "it runs far slower than fp16, if at all. Use --precision auto (fp16 with dynamic loss scaling here) "
            "or an fp16 ds_config such as configs/zero2_fp16.json"
        )
    if device == "cpu" and requested == "bf16" and not cpu_has_native_bf16():
        ratio = measure()
        return "bf16", (
            f"{source} asks for bf16, but this CPU ({cpu_model_name()}) has no native bf16 (no AVX512-BF16 or AMX): "
            f"a bf16 matmul measured {ratio:.0f}x slower than fp32 here, so training will run several times slower. "
            "Use --precision auto (or a ds_config with \"bf16\": {\"enabled\": \"auto\"}, e.g. configs/zero2.json) "
            "to train in fp32 on this machine"
        )
    return requested, None
