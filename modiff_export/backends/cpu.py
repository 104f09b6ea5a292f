"""What this x86 CPU offers for int8 and bf16 (from /proc/cpuinfo): the speed tables print it, and the
OpenVINO runner decides by it whether int8 kernels compute the graph's codes exactly."""
from __future__ import annotations

CPU_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx512bw", "avx2")
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products accumulated in int32, no saturation


def cpu_int8_flags() -> dict[str, bool]:
    """Which int8-relevant x86 instruction sets /proc/cpuinfo reports."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return {f: f in flags for f in CPU_FLAGS}


def int8_dot_saturates() -> bool:
    """True on x86 CPUs without VNNI or AMX-INT8 (AVX2 / plain AVX-512): their int8 dot product sums u8 x s8
    pairs in int16 with saturation (OpenVINO's docs: "Saturation (overflow) issue workaround"). False where
    /proc/cpuinfo says nothing (not x86 Linux: no claim made)."""
    flags = cpu_int8_flags()
    return flags["avx2"] and not any(flags[f] for f in INT8_DOT)


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere). Loading a graph through
    an ONNX proto (the runners' load-time rewrites) frees hundreds of MB in pieces that glibc keeps in its
    arenas: measured on a 143M-parameter PixArt, the OpenVINO runner's resident memory after the first call
    2.7 GB without, 1.2 GB with this (docs/transformers.md)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
