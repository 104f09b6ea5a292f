"""CPU speed of FP32 / peer / PTQ / MoDiff graphs on ONNX Runtime and OpenVINO at three model sizes (digits,
the CIFAR-10 DDPM architecture, Stable Diffusion 1.5's UNet at a small latent). The measuring code lives in
modiff_export/harness/speed.py (the demo's speed section uses it too); `--help` lists the options.

    python benchmarks/runtime_speed.py --models digits,cifar,sd15 --threads 1,2 --rounds 5 --doc docs/speed.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modiff_export.harness.speed import main  # noqa: E402

if __name__ == "__main__":
    main()
