"""Run the Edge TPU compiler when it is installed.

``edgetpu_compiler`` ships only in Coral's own apt repository (x86-64 Debian/Ubuntu; last
release 16.0), not on PyPI or in Debian. When it is on PATH, the int8 model is compiled and the
``*_edgetpu.tflite`` plus the compiler's log travel in the bundle; when it is not, the report says
so plainly and the bundle carries the int8 model, which the Edge TPU runtime would run on its
CPU. The executable is looked up on PATH (or given), so tests can point it at a stand-in.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["EdgeTpuCompileResult", "compile_for_edgetpu", "COMPILER"]

COMPILER = "edgetpu_compiler"


@dataclass
class EdgeTpuCompileResult:
    status: str  # "compiled" | "compiler-not-found" | "failed"
    message: str
    compiled: Optional[bytes] = None
    log: str = ""
    compiler_version: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "message": self.message, "compiler_version": self.compiler_version}


def compile_for_edgetpu(model: bytes, *, compiler: Optional[str] = None, timeout: float = 600.0) -> EdgeTpuCompileResult:
    exe = shutil.which(compiler or COMPILER)
    if exe is None:
        return EdgeTpuCompileResult(
            "compiler-not-found",
            "edgetpu_compiler is not on PATH (it ships only in Coral's apt repository for x86-64 Debian/Ubuntu): "
            "the bundle carries the int8 model; compile it where the compiler is installed to run it on the Edge TPU",
        )
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    with tempfile.TemporaryDirectory(prefix="edgesdk-edgetpu-") as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(model)
        try:
            proc = subprocess.run(
                [exe, "-s", "-o", tmp, str(src)], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return EdgeTpuCompileResult("failed", f"edgetpu_compiler timed out after {timeout:.0f} s", compiler_version=version)
        out = Path(tmp) / "model_edgetpu.tflite"
        log_file = Path(tmp) / "model_edgetpu.log"
        log = (log_file.read_text(errors="replace") if log_file.exists() else "") + proc.stdout + proc.stderr
        if proc.returncode != 0 or not out.exists():
            first = (proc.stderr or proc.stdout).strip().splitlines()
            return EdgeTpuCompileResult(
                "failed",
                f"edgetpu_compiler exited {proc.returncode}: {first[-1] if first else 'no output'}",
                log=log,
                compiler_version=version,
            )
        return EdgeTpuCompileResult("compiled", "compiled for the Edge TPU", out.read_bytes(), log, version)
