"""Only for the optional CUDA extension in csrc/ (everything else is in pyproject.toml).

Built when TIEDLORA_BUILD_CUDA=1 and torch with CUDA plus a CUDA toolchain are importable in the
build environment (use `pip install --no-build-isolation`); otherwise skipped with a message, and
the package works on its Triton kernels and the torch reference alone.
"""

import os
import sys

from setuptools import setup


def cuda_extension():
    if os.environ.get("TIEDLORA_BUILD_CUDA", "0") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("tiedlora-kernels: torch is not importable at build time; skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("tiedlora-kernels: no CUDA toolchain (torch.version.cuda / CUDA_HOME); skipping the CUDA extension",
              file=sys.stderr)
        return [], {}
    ext = CUDAExtension("tiedlora_kernels._C", ["csrc/tied_lora_decode.cu"], extra_compile_args={"nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
