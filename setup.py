"""Build of the fusedclr C++/CUDA extension.

The CPU sources are always built. The CUDA sources are built whenever torch is
a CUDA build and nvcc is found; a GPU need not be present (CI compiles and links
the CUDA kernels on a machine without one).

Build knobs (environment variables):

* ``FUSEDCLR_CUDA=auto|0|1``: ``auto`` (default) builds CUDA when possible,
  ``0`` skips it, ``1`` fails the build if it cannot be done.
* ``TORCH_CUDA_ARCH_LIST``: the architectures to compile for. When unset and
  no GPU is visible, a short default (``9.0``, Hopper) keeps the build fast.
* ``MAX_JOBS``: parallel compile jobs (torch's own knob).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Hopper code, and its PTX for newer GPUs to compile at load (set TORCH_CUDA_ARCH_LIST for others).
DEFAULT_ARCH_LIST = "9.0+PTX"


def _cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include (cusparse.h, ...) ship in the
    nvidia wheels under site-packages/nvidia/cu*/include; nvcc's own tree may
    lack them."""
    found = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if site and os.path.isdir(site):
            found += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
            found += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in found:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _want_cuda(torch) -> bool:
    mode = os.environ.get("FUSEDCLR_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"FUSEDCLR_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        print("fusedclr: FUSEDCLR_CUDA=0, skipping the CUDA kernels")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if shutil.which("nvcc") is None and not os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        reasons.append("nvcc was not found")
    if reasons:
        if mode == "1":
            raise SystemExit("fusedclr: FUSEDCLR_CUDA=1 but " + " and ".join(reasons))
        print("fusedclr: building without CUDA kernels: " + " and ".join(reasons))
        return False
    return True


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc", "include")]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -ffp-contract=off: products and sums round as torch's kernels round them [note: rounding as torch].
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    if _want_cuda(torch):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            try:
                visible = torch.cuda.is_available()
            except Exception:  # noqa: BLE001 - a broken driver means "no GPU"
                visible = False
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # --fmad=false: no contraction the source does not write [note: rounding as torch].
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
        print(f"fusedclr: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [
            CUDAExtension(
                "fusedclr._C",
                sources,
                include_dirs=include + _cuda_include_dirs(),
                define_macros=[("FUSEDCLR_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fusedclr._C",
            sources,
            include_dirs=include,
            define_macros=[],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _set_cuda_home() -> None:
    """torch.utils.cpp_extension fixes CUDA_HOME when first imported, from nvcc's
    location; where nvcc is a wrapper script outside the toolkit (as on our CI
    machines) that location has no libcudart, so point at the toolkit first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else ""
    has_cudart = any(os.path.exists(os.path.join(root, d, "libcudart.so")) for d in ("lib64", "lib"))
    if not has_cudart and os.path.exists("/usr/local/cuda/bin/nvcc"):
        root = "/usr/local/cuda"
    if root:
        os.environ["CUDA_HOME"] = root


def _write_build_info() -> None:
    """Records the torch this build compiles against, for the check at import
    (``fusedclr.ops.build_mismatch``): a plain ``pip install .`` builds in an
    isolated environment whose torch may not be the one fusedclr runs with."""
    import torch

    path = os.path.join(ROOT, "fusedclr", "_build_info.py")
    text = (
        '"""Written by setup.py at build time; not in git."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    _set_cuda_home()
    _write_build_info()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
