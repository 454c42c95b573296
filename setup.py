"""Build fastablate and its compiled extension fastablate._C.

Knobs (environment variables):
  FASTABLATE_CUDA=auto|0|1   build the CUDA sources: auto = when nvcc and a CUDA build of
                             torch are present (default), 0 = never, 1 = always (fails if absent)
  TORCH_CUDA_ARCH_LIST       CUDA targets; default "8.0;9.0" when no GPU is visible
  FASTABLATE_DEBUG=1         -O0 -g
"""
import glob
import os
import re

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension


def _version() -> str:
    with open(os.path.join("fastablate", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _wheel_cuda_includes() -> list[str]:
    """Header folders of the nvidia-* wheels a CUDA build of torch installs (cuSPARSE,
    cuBLAS, ...): torch's CUDA headers include them, and a bare toolkit may lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def _want_cuda() -> bool:
    knob = os.environ.get("FASTABLATE_CUDA", "auto").lower()
    if knob not in ("auto", "0", "1"):
        raise SystemExit(f"FASTABLATE_CUDA={knob!r}: expected auto, 0 or 1")
    if knob == "0":
        return False
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there misleads it.
    headers = [os.path.join(home or "", "include")] + _wheel_cuda_includes()
    missing = [p for p in ("bin/nvcc",) if not os.path.exists(os.path.join(home or "", p))]
    if not glob.glob(os.path.join(home or "", "lib*", "libcudart.so*")):
        missing.append("lib64/libcudart.so")
    missing += [h for h in ("cuda_runtime.h", "cusparse.h")
                if not any(os.path.exists(os.path.join(d, h)) for d in headers)]
    problem = None
    if torch.version.cuda is None:
        problem = "torch is a CPU build"
    elif home is None or missing:
        problem = (f"the CUDA toolkit at CUDA_HOME={home} lacks {', '.join(missing) or 'everything'}; "
                   "set CUDA_HOME to the toolkit root (the folder with bin/nvcc and lib64/libcudart.so)")
    if problem and knob == "1":
        raise SystemExit(f"FASTABLATE_CUDA=1 but {problem}")
    if problem:
        print(f"fastablate: skipping CUDA kernels: {problem}")
    return problem is None


def extensions():
    debug = os.environ.get("FASTABLATE_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/fastablate.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno: sqrtf must not set errno, or the noise kernel's loops do not vectorize.
    # -fopenmp: at::parallel_for is inline; without it the kernels run on one thread. The
    # extension then loads torch's own libgomp (same soname), so torch.set_num_threads applies.
    # -ffp-contract=off: a*b+c is never fused into an FMA, whatever the compiler or -march a user
    # builds with, so the kernels round as the references do (CUDA: --fmad=false, same reason).
    cxx = opt + ["-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    link = ["-fopenmp"]
    use_cuda = _want_cuda()
    print(f"fastablate: building CPU kernels; CUDA kernels: {'yes' if use_cuda else 'no'}"
          f" (FASTABLATE_CUDA={os.environ.get('FASTABLATE_CUDA', 'auto')},"
          f" CUDA_HOME={cpp_extension.CUDA_HOME})")
    if not use_cuda:
        return [cpp_extension.CppExtension(
            "fastablate._C", sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the architecture from: build for A100 and Hopper (H100/H200).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"fastablate: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected)')}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = opt + ["-lineinfo", "--fmad=false"]
    return [cpp_extension.CUDAExtension(
        "fastablate._C", sources, include_dirs=[os.path.abspath("csrc")] + _wheel_cuda_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)]


setup(
    name="fastablate",
    version=_version(),
    description="Lesion, noise and adversarial robustness studies of ResNets and VGGs, with C++/CUDA kernels",
    packages=find_packages(include=["fastablate", "fastablate.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "click>=8.1",
        "ninja",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-timeout", "ray", "timm", "tensorboard", "mlflow"], "ray": ["ray"],
                    "timm": ["timm"], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"],
                    "bench": ["pytest-benchmark", "torchattacks==3.5.1", "kornia", "timm"]},
    entry_points={"console_scripts": ["fastablate=fastablate.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
