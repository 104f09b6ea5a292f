"""What this x86 CPU offers for int8 and bf16 (from /proc/cpuinfo), and the one decision the runners take from
it: `CpuPath`. The speed tables print the flags; the OpenVINO and ONNX Runtime runners take every CPU-dependent
choice from a CpuPath, detected or forced.

CPU classes this project meets, and what the runners do on each (docs/design.md section 4.1):

    class      int8 dot product             runners' int8 layers                       default precision
    avx2       u8 x s8 pairs summed in      OpenVINO: <= 7-bit layers as uint8 codes    f32
               int16, saturating            around a small zero point (cannot
                                            saturate), 8-bit layers' weights
                                            dequantized at load; ORT: all dequantized
    vnni       int32 accumulation (exact)   int8 kernels on the graph's codes           f32
    vnni_bf16  int32 accumulation (exact)   int8 kernels on the graph's codes           bf16
    amx        AMX-INT8 (exact)             int8 kernels on the graph's codes           bf16

A path can be forced (a runner's `cpu_path=`, or the environment variable MODIFF_CPU_PATH for a person
reproducing a report from another machine) to any class, on any CPU: that runs the same rewrites, kernels
choice and default precision that CPU class gets. Two things a CPU cannot borrow: bf16 where it has no
bf16 (the default precision is then f32, `precision_here`), and exact int8 kernels where its dot product
saturates (`exact` is False: outputs are not the graph's arithmetic, only shapes, I/O and the cut can be
checked). The block-reuse cut into stateful parts (backends/ov_split.py) is the same on every class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

CPU_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx512bw", "avx2")
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products accumulated in int32, no saturation
BF16 = ("avx512_bf16", "amx_bf16")  # native bf16: OpenVINO's CPU plugin then defaults to bf16
ENV = "MODIFF_CPU_PATH"
CPU_CLASSES = ("avx2", "vnni", "vnni_bf16", "amx")
# distinct runner behaviour: amx takes vnni_bf16's choices (the plugin picks AMX kernels by itself)
DISTINCT_PATHS = ("avx2", "vnni", "vnni_bf16")


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


def has_bf16() -> bool:
    """Native bf16 (AVX512_BF16 or AMX-BF16): OpenVINO's CPU plugin then runs float ops in bf16 by default."""
    flags = cpu_int8_flags()
    return any(flags[f] for f in BF16)


def cpu_class() -> str:
    """This CPU's class (module docstring). A CPU without /proc/cpuinfo flags counts as vnni (no claim of
    saturation, f32 default), which is what the runners did before there were classes."""
    flags = cpu_int8_flags()
    if flags["amx_int8"]:
        return "amx"
    if int8_dot_saturates():
        return "avx2"
    return "vnni_bf16" if has_bf16() else "vnni"


class CpuPathError(ValueError):
    """An unknown CPU path name (runner option or MODIFF_CPU_PATH)."""


@dataclass(frozen=True)
class CpuPath:
    """The runners' CPU-dependent choices, one object: which class's choices (`cpu_class`), whether they were
    forced, and what follows from them. Build it with CpuPath.resolve()."""
    cpu_class: str
    forced: bool = False

    def __post_init__(self):
        if self.cpu_class not in CPU_CLASSES:
            raise CpuPathError(f"unknown CPU path {self.cpu_class!r}; expected one of {list(CPU_CLASSES)} "
                               f"(or 'auto')")

    @classmethod
    def resolve(cls, name: str | CpuPath | None = None) -> CpuPath:
        """`name` (a class, 'auto', or a CpuPath); None: MODIFF_CPU_PATH if set, else this CPU's class."""
        if isinstance(name, CpuPath):
            return name
        source = name if name is not None else os.environ.get(ENV, "").strip() or "auto"
        if source == "auto":
            return cls(cpu_class())
        where = "" if name is not None else f" (from {ENV})"
        if source not in CPU_CLASSES:
            raise CpuPathError(f"unknown CPU path {source!r}{where}; expected one of {list(CPU_CLASSES)} or 'auto'")
        return cls(source, forced=source != cpu_class())

    # -- the decisions -----------------------------------------------------------------------
    @property
    def int8_kernels(self) -> bool:
        """Quantized layers run as int8 kernels on the graph's own (signed) codes."""
        return self.cpu_class != "avx2"

    @property
    def u8_codes(self) -> bool:
        """OpenVINO: <= 7-bit layers re-expressed as uint8 codes around a small zero point (export/ov_variant.py's
        u8 lever), still int8 kernels; the other layers' weights dequantized at load (export/passes.py)."""
        return not self.int8_kernels

    def rewrites(self, role: str, levers: tuple[str, ...]) -> bool:
        """OpenVINO: whether the runner rewrites an exported ONNX graph of `role` at load time: the step and
        shallow graphs with the levers or the u8 codes; every graph where weights are dequantized."""
        return not self.int8_kernels or (role != "prime" and bool(levers or self.u8_codes))

    @property
    def default_precision(self) -> str:
        """What OpenVINO's CPU plugin runs float ops in without a precision hint, on a CPU of this class."""
        return "bf16" if self.cpu_class in ("vnni_bf16", "amx") else "f32"

    @property
    def precision_here(self) -> str:
        """default_precision as this CPU can run it (bf16 only with native bf16)."""
        return "bf16" if self.default_precision == "bf16" and has_bf16() else "f32"

    @property
    def exact(self) -> bool:
        """Whether this path computes the graphs' arithmetic on this CPU: not where int8 kernels meet a
        saturating int8 dot product (int8 kernels forced on an AVX2 CPU)."""
        return not (self.int8_kernels and int8_dot_saturates())

    def describe(self) -> str:
        """One line for reports: the class, forced or detected, and what the runners do."""
        how = ("int8 kernels" if self.int8_kernels
               else "u8 codes for <= 7-bit layers, 8-bit layers' weights dequantized at load")
        prec = self.default_precision + ("" if self.precision_here == self.default_precision
                                         else f" (runs {self.precision_here}: this CPU has no bf16)")
        return f"{self.tag}: {how}, default precision {prec}" + ("" if self.exact else ", NOT exact on this CPU")

    @property
    def tag(self) -> str:
        """The class, and the CPU it was forced on if it was (the first words of every report line)."""
        return f"{self.cpu_class} (forced on a {cpu_class()} CPU)" if self.forced else self.cpu_class


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
