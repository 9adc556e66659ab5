"""Write a CUDA kernel the way nbalex writes them: leaky ReLU, forward pass.

    python examples/write_a_kernel.py            # check the kernel against NumPy
    python examples/write_a_kernel.py --static   # compile it for an H100 (sm_90), no GPU needed

The first form runs the kernel on the GPU, or under Numba's CUDA simulator when there is no
GPU (the script switches the simulator on itself, before numba is imported).  The second
compiles it to PTX and SASS for sm_90 with ``nbalex.cuda.static`` and prints its registers
and occupancy beside those of nbalex's own ReLU kernel.  The simulator cannot compile
anything, so ``--static`` runs itself again in a fresh process with the simulator off.

The three parts below (kernel, launcher, test) are the layout of every file in nbalex/cuda/.
"""

import os
import shutil
import subprocess
import sys

STATIC = "--static" in sys.argv[1:]

# The simulator is chosen when numba is first imported, so this must come before any
# `import numba` (nbalex.cuda imports it).  With a GPU (nvidia-smi present) the kernel runs
# for real; with --static the simulator stays off (see the module docstring).
if not STATIC and "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)          # run from a checkout, installed or not

import numpy as np  # noqa: E402
from numba import cuda, float32  # noqa: E402

from nbalex.cuda.launch import (THREADS_PER_BLOCK, check_array, flat, grid_1d,  # noqa: E402
                                stream_or_default)


# --- 1. The kernel --------------------------------------------------------------------
#
# A kernel is the code ONE thread runs.  Its docstring is a contract: which thread computes
# what, each array's shape, what is written.
#
# Notice the grid-stride loop.  Thread `start` (its index in the whole grid) handles elements
# start, start + G, start + 2G, ... where G is the number of threads in the grid.  So the
# kernel is correct for ANY grid size: one thread per element, or 32 threads for a million
# elements.  Consecutive threads touch consecutive elements at every step, so a warp's 32
# loads fall in one or two 128-byte segments ("coalesced"), which is what makes an
# elementwise kernel run at memory speed.

@cuda.jit
def leaky_relu_forward_kernel(y, x, slope):
    """y[i] = x[i] if x[i] > 0 else slope * x[i], for every i; one grid-stride loop.

    Thread t of a grid of G threads computes i = t, t + G, t + 2G, ... < len(x).
    x, y: 1-D float32 of the same length; y is written (it may be the same array as x).
    slope: float32 scalar (a float64 here would make every multiply double precision).
    """
    start = cuda.grid(1)          # index in the grid: blockIdx.x * blockDim.x + threadIdx.x
    step = cuda.gridsize(1)       # threads in the grid: gridDim.x * blockDim.x
    for i in range(start, x.shape[0], step):
        v = x[i]
        y[i] = v if v > float32(0.0) else slope * v


# The signature nbalex.cuda.static compiles it with (nbalex/cuda/relu.py lists its own
# kernels the same way, in STATIC_SIGNATURES): float32 contiguous 1-D arrays and a float32.
LEAKY_SIGNATURE = "void(float32[::1], float32[::1], float32)"


# --- 2. The launcher ------------------------------------------------------------------
#
# The launcher is ordinary Python.  It owns everything the kernel should not have to think
# about: it checks its arguments (a wrong dtype or shape is a clear ValueError here, not
# garbage or a crash inside the kernel), flattens the arrays, picks the grid
# (grid_1d: one thread per element, capped at MAX_BLOCKS blocks; the grid-stride loop
# covers the rest) and launches on the stream it is given.  Keeping the grid arithmetic out
# of the kernel means it can change (a cap, a different block size) without touching the
# code that runs on the GPU.  Outputs come first, as in every nbalex launcher.

def leaky_relu_forward(y, x, slope=0.01, stream=None):
    """y = x where x > 0, else slope * x; any shape, float32, C-contiguous; y may be x.

    x, y: device arrays (or host arrays, which numba copies around the launch).
    stream: the CUDA stream to launch on (None: the default stream).
    """
    check_array("x", x)
    check_array("y", y, shape=x.shape)
    if not 0.0 <= slope < 1.0:
        raise ValueError(f"slope must be in [0, 1), got {slope}")
    if x.size == 0:
        return                    # a grid of 0 blocks is an error; nothing to do anyway
    blocks = grid_1d(x.size)
    leaky_relu_forward_kernel[blocks, THREADS_PER_BLOCK, stream_or_default(stream)](
        flat(y), flat(x), np.float32(slope))


# --- 3. The test ----------------------------------------------------------------------
#
# Every kernel is checked against a NumPy one-liner (nbalex/reference/ holds one file per
# layer for this).  Shapes are deliberately awkward: 1155 elements is not a multiple of the
# block size, so the last block has idle threads.

def check():
    if SIMULATOR:
        where = "Numba's CUDA simulator"
    else:
        name = cuda.get_current_device().name
        where = f"GPU {name.decode() if isinstance(name, bytes) else name}"
    print(f"leaky ReLU forward, on {where}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7, 11), dtype=np.float32)
    slope = 0.1
    expected = np.where(x > 0, x, np.float32(slope) * x)          # the NumPy oracle

    # Explicit stream: copies and the launch are queued on it, in order; synchronize()
    # waits for all of them.  (A training step queues everything and waits once.)
    stream = cuda.stream()
    d_x = cuda.to_device(x, stream=stream)
    d_y = cuda.device_array_like(d_x, stream=stream)
    leaky_relu_forward(d_y, d_x, slope, stream=stream)
    y = d_y.copy_to_host(stream=stream)
    stream.synchronize()
    print(f"  launcher: {x.size} elements, grid {grid_1d(x.size)} blocks x {THREADS_PER_BLOCK} "
          f"threads, max abs difference vs NumPy {np.abs(y - expected).max():.3g}")

    # The grid-stride loop at work: one block of 32 threads, each walks 1155/32 ~ 37 elements.
    d_y2 = cuda.device_array_like(d_x, stream=stream)
    leaky_relu_forward_kernel[1, 32, stream](flat(d_y2), flat(d_x), np.float32(slope))
    y2 = d_y2.copy_to_host(stream=stream)
    stream.synchronize()
    print(f"  kernel alone, 1 block x 32 threads: max abs difference vs NumPy "
          f"{np.abs(y2 - expected).max():.3g}")

    # In place (y is x), as the contract allows.
    d_z = cuda.to_device(x, stream=stream)
    leaky_relu_forward(d_z, d_z, slope, stream=stream)
    z = d_z.copy_to_host(stream=stream)
    stream.synchronize()
    print(f"  in place (y is x): max abs difference vs NumPy {np.abs(z - expected).max():.3g}")

    # The launcher refuses what the kernel cannot handle, with a message naming the argument.
    refused = False
    try:
        leaky_relu_forward(cuda.device_array(10, np.float32), cuda.to_device(np.zeros(10)))
        print("  float64 input: accepted (it should not be)")
    except ValueError as err:
        refused = True
        print(f"  float64 input refused: ValueError: {err}")

    ok = refused and all(np.array_equal(out, expected) for out in (y, y2, z))
    print("OK: bit for bit equal to NumPy" if ok else "MISMATCH")
    return 0 if ok else 1


# --- 4. What the GPU would see --------------------------------------------------------
#
# nbalex.cuda.static compiles a kernel to PTX (Numba/NVVM), assembles it for sm_90 (ptxas -v
# reports the registers each thread needs) and disassembles the SASS.  What to notice:
#   * registers: an SM has 65536 of them; a thread that needs R of them limits how many
#     threads can be resident at once.
#   * occupancy: resident warps / 64, the most an H100 SM holds.  An elementwise kernel needs
#     few registers, so it fills every slot (1.00): while one warp waits ~500 cycles for
#     memory, others have loads in flight.  The GEMM kernels run at 0.25 (128 registers for
#     an 8x8 tile per thread) and hide latency with independent FMAs instead; high occupancy
#     is a means, not the goal.
#   * spills: registers that did not fit and went to (slow) local memory; should be 0.
#   * instructions: leaky ReLU is ReLU plus one multiply, so it should be about as long.
#     The third row compiles the same kernel with a float64 slope, which is what a plain
#     Python float would give: x[i] is converted to double, multiplied in double precision
#     and converted back, in every iteration.  That is why the launcher passes
#     np.float32(slope).

def static_report():
    from nbalex.cuda import relu, static
    float64_slope = LEAKY_SIGNATURE.replace("float32)", "float64)")
    entries = [(leaky_relu_forward_kernel, LEAKY_SIGNATURE, False, THREADS_PER_BLOCK),
               relu.STATIC_SIGNATURES[0],            # (relu_forward_kernel, its signature, False)
               (leaky_relu_forward_kernel, float64_slope, False, THREADS_PER_BLOCK)]
    labels = ["leaky_relu_forward_kernel", "relu_forward_kernel (nbalex)",
              "leaky_relu, float64 slope"]
    rows = static.analyze(entries, module=relu)
    print("sm_90 static report (ptxas -v, cuobjdump -sass):")
    print(f"  {'kernel':<30} {'registers':>9} {'spills':>6} {'threads':>7} {'occupancy':>9} "
          f"{'instructions':>12}")
    for label, r in zip(labels, rows):
        print(f"  {label:<30} {r['registers']:>9} {r['spill_bytes']:>6} "
              f"{r['threads_per_block']:>7} {r['occupancy']:>9.2f} {r['instructions']:>12}")
    return 0


def main():
    if not STATIC:
        return check()
    if SIMULATOR:
        # The simulator was switched on in this process; compile in a fresh one without it.
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), "--static"],
                              env=env).returncode
    try:
        return static_report()
    except (FileNotFoundError, RuntimeError) as err:  # ptxas/cuobjdump missing or failing
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
