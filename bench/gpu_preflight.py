"""The GPU suite's first step: can this machine run the GEMM core at all? (about 10 s)

    python bench/gpu_preflight.py

Prints one JSON object on stdout: the versions of numba, numba-cuda, NVVM, nvJitLink, the
CUDA driver (the driver API's version and nvidia-smi's driver string), the ptxas release and
whether it is the one the static thresholds are pinned to (``nbalex.cuda.static.PINNED_CUDA``),
then compiles and launches one tiny kernel built the way ``nbalex/cuda/gemm.py`` builds its
kernels: ``launch_bounds`` and a 16-byte aligned shared array (under the simulator, which
takes neither, a plain kernel). The kernel's result is checked on the host.

Exit status 0 when the kernel ran and gave the right answer; otherwise 1, with the JSON
(``ok`` false, ``error`` set) on stdout and one line saying what failed on stderr.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from numba import config, cuda, float32  # noqa: E402


def _version(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a version we cannot read is reported as such
        return f"unknown ({type(exc).__name__}: {exc})"


def versions():
    """{name: version string} of the pieces a launch goes through."""
    from importlib import metadata

    import numba

    out = {"python": sys.version.split()[0], "numba": numba.__version__}
    out["numba_cuda"] = _version(lambda: metadata.version("numba-cuda"))

    def nvvm():
        from numba.cuda.cudadrv import nvvm as nv
        lib = nv.NVVM()
        return f"libNVVM {'.'.join(map(str, lib.get_version()))}"
    out["nvvm"] = _version(nvvm)
    out["nvvm_package"] = _version(lambda: metadata.version("nvidia-nvvm"))

    def nvjitlink():
        from cuda.bindings import nvjitlink as nj
        return ".".join(map(str, nj.version()))
    out["nvjitlink"] = _version(nvjitlink)

    def driver_api():
        from numba import cuda
        return ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
    out["driver_api"] = _version(driver_api)

    def smi():
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return run.stdout.strip().splitlines()[0] if run.returncode == 0 else f"exit {run.returncode}"
    out["nvidia_smi"] = _version(smi)

    from nbalex.cuda import static
    out["toolchain"] = static.toolchain()
    return out


THREADS = 64
ALIGN = None if config.ENABLE_CUDASIM else 16     # the simulator rejects alignment requests


def reverse_plus_one(out, x):
    """out[i] = x[THREADS - 1 - i] + 1 through a shared array (the reversal proves the barrier)."""
    tile = cuda.shared.array(THREADS, float32, alignment=ALIGN)
    i = cuda.threadIdx.x
    tile[i] = x[i]
    cuda.syncthreads()   # every element is stored before any thread reads its mirror
    out[i] = tile[THREADS - 1 - i] + float32(1)


def tiny_kernel_check():
    """Compile and launch ``reverse_plus_one`` with launch_bounds and an aligned shared array;
    return a short description, or raise with what went wrong."""
    import numpy as np

    if config.ENABLE_CUDASIM:            # the simulator takes no launch bounds
        kernel, mode = cuda.jit(reverse_plus_one), "simulator (no launch_bounds, no alignment)"
    else:
        kernel = cuda.jit(reverse_plus_one, launch_bounds=(THREADS, 1))
        mode = f"launch_bounds=({THREADS}, 1), shared alignment {ALIGN}"
    x = np.arange(THREADS, dtype=np.float32)
    out = cuda.to_device(np.zeros(THREADS, np.float32))
    kernel[1, THREADS](out, cuda.to_device(x))
    got = out.copy_to_host()
    if not np.array_equal(got, x[::-1] + 1):
        raise RuntimeError(f"the tiny kernel ran but gave wrong values: {got[:4]}...")
    return mode


def main():
    result = {"ok": False}
    try:
        result["versions"] = versions()
        result["kernel"] = tiny_kernel_check()
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the whole point is to say what failed, in one line
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    print(json.dumps(result, indent=1))
    if not result["ok"]:
        print(f"preflight failed: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
