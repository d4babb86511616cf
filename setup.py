"""Build script: the pure-Python package always, the CUDA extension only where it can build.

The extension in csrc/ builds when the installed torch is a CUDA build and a CUDA toolkit is
found (use `pip install --no-build-isolation .` so the build sees that torch), or when
SELFE_BUILD_CUDA=1 forces it. Everywhere else the install is pure Python and the kernels fall
back to Triton or PyTorch at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGE_DIRS = {"selfe": "engine", "selfe.kernels": "kernels", "selfe.train": "train"}


def find_packages_mapped() -> list[str]:
    """Every package under each mapped folder, named in the selfe namespace."""
    packages = []
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            packages.append(".".join([name, *rel.parts]) if rel.parts else name)
    return packages


def cuda_extensions() -> tuple[list, dict]:
    wanted = os.environ.get("SELFE_BUILD_CUDA", "auto")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if wanted == "1":
            raise RuntimeError("SELFE_BUILD_CUDA=1 but the installed torch is not a CUDA build or CUDA_HOME is unset")
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    arch = os.environ.get("SELFE_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a")
    ext = CUDAExtension(
        name="selfe._C",
        sources=sources,
        # No -std: BuildExtension passes the standard this torch's headers need (C++20 from torch 2.12 on;
        # an explicit -std=c++17 after it would win and trip on them).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", arch]},
    )
    return [ext], {"build_ext": BuildExtension}


# The shipped ShapesEval model (selfe.shapes.SHIPPED_MODEL_DIR): weights, config and its two text encoders.
SHIPPED_MODEL = "assets/shapes-selfe"
PACKAGE_DATA = {"selfe": [f"{SHIPPED_MODEL}/*", f"{SHIPPED_MODEL}/text_encoder/*", f"{SHIPPED_MODEL}/text_encoder_2/*"]}

ext_modules, cmdclass = cuda_extensions()
setup(
    packages=find_packages_mapped(),
    package_dir=PACKAGE_DIRS,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
