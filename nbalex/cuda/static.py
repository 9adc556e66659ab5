"""Static analysis of every CUDA kernel: what an H100 would see, measured without a GPU.

Each module of ``nbalex.cuda`` that defines kernels lists them in ``STATIC_SIGNATURES``::

    STATIC_SIGNATURES = [(kernel, "void(float32[:, ::1], int32)", is_gemm), ...]
    STATIC_SIGNATURES = [(kernel, "void(...)", is_gemm, threads_per_block), ...]

The optional 4th element is the block size the launcher uses; without it the module's
``THREADS_PER_BLOCK`` (an int) is used, and without that :data:`DEFAULT_THREADS` (marked
``threads_assumed`` in the result).  Each kernel is compiled to PTX for sm_90 by Numba
(``numba.cuda.compile_ptx``), assembled by ``ptxas -arch=sm_90 -v`` (registers, spills,
stack/local memory, static shared memory) and disassembled by ``cuobjdump -sass`` (which
runs ``nvdisasm``).  The tools come from the pip packages ``nvidia-cuda-nvcc``,
``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` (same version as ``nvidia-nvvm``), or
from a CUDA toolkit on PATH.

**Main loop** (for ``is_gemm`` kernels).  Every backward branch in the SASS (a ``BRA`` whose
target address is at or before the branch) closes a loop whose body is the instruction range
[target, branch].  The main loop is the loop whose body holds the most ``FFMA``
instructions; among equals, the shortest body (the innermost).  ``ffma_share`` = FFMA
instructions / all instructions of that body, NOPs excluded.  This is a static count of one
pass over the body.  The GEMM kernels unroll their K tile completely, so their main loop is
the whole K-tile loop (512 FFMA plus fragment loads, the next tile's global loads and index
arithmetic, shared stores and the barrier); ``main_loop`` in the result gives its FFMA count
and opcode mix so that a rolled inner loop cannot pass for it.

**Occupancy** (resident warps / 64 on an H100, sm_90 limits): with ``R`` registers per
thread, ``S`` bytes of static shared memory and ``T`` threads (``W = ceil(T/32)`` warps) per
block,

* registers: a warp holds ``ceil(R*32 / 256) * 256`` registers (allocation unit 256);
  ``blocks_regs = floor(floor(65536 / regs_per_warp) / W)``;
* shared memory: a block holds ``ceil(S / 128) * 128 + 1024`` bytes (1 KB per block is
  reserved by the system on sm_8x/9x); ``blocks_smem = floor(233472 / that)`` (228 KB/SM);
* threads: ``blocks_warps = floor(64 / W)`` (2048 threads/SM); blocks: at most 32;

``blocks = min(all four)`` and ``occupancy = blocks * W / 64``.

Run ``python -m nbalex.cuda.static [--json]``.  It needs the real CUDA target of Numba, so
it refuses to run under the simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile

DEFAULT_THREADS = 256
CC = (9, 0)
ARCH = "sm_90"
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
SMEM_PER_SM = 228 * 1024
SMEM_ALLOC_UNIT = 128
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def _check_not_simulator():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise RuntimeError(
            "nbalex.cuda.static compiles kernels for sm_90 and cannot run under the CUDA "
            "simulator: unset NUMBA_ENABLE_CUDASIM and run it again")


def find_tool(name):
    """Path of ``ptxas``, ``cuobjdump`` or ``nvdisasm``: the pip NVIDIA packages first, then
    PATH, then the toolkit in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda."""
    candidates = []
    try:
        import nvidia
        for root in nvidia.__path__:
            for sub in ("cu13", "cuda_nvcc", "cuda_cuobjdump", "cuda_nvdisasm", "cu12"):
                candidates.append(os.path.join(root, sub, "bin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        path = os.path.join(home, "bin", name) if home else ""
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"{name} not found: install the CUDA 13 pieces (pip install 'numba-cuda[cu13]' "
        f"nvidia-cuda-nvcc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, the same version as "
        f"nvidia-nvvm) or put the CUDA toolkit's bin on PATH")


def tools_present():
    """True when ptxas, cuobjdump and nvdisasm can all be found (see :func:`find_tool`)."""
    try:
        for tool in ("ptxas", "cuobjdump", "nvdisasm"):
            find_tool(tool)
        return True
    except FileNotFoundError:
        return False


PINNED_CUDA = "13.5"
"""The CUDA release (ptxas and NVVM) the static thresholds in tests/test_cuda_static.py were
measured with; another release may allocate registers differently."""


def toolchain():
    """{"ptxas": release or None, "nvvm": the nvidia-nvvm package's version or None,
    "pinned": PINNED_CUDA, "matches": bool}: ``matches`` when ptxas is found and both
    known versions are release PINNED_CUDA."""
    from importlib import metadata

    ptxas = nvvm = None
    try:
        run = subprocess.run([find_tool("ptxas"), "--version"], capture_output=True, text=True,
                             timeout=30)
        found = re.search(r"release (\d+\.\d+)", run.stdout)
        ptxas = found.group(1) if found else None
    except (FileNotFoundError, OSError, subprocess.SubprocessError):
        pass
    try:
        nvvm = metadata.version("nvidia-nvvm")
    except metadata.PackageNotFoundError:
        pass
    same = (ptxas == PINNED_CUDA
            and (nvvm is None or nvvm == PINNED_CUDA or nvvm.startswith(PINNED_CUDA + ".")))
    return {"ptxas": ptxas, "nvvm": nvvm, "pinned": PINNED_CUDA, "matches": same}


def occupancy(registers, shared_bytes, threads):
    """Fraction of an H100 SM's 64 warp slots a kernel can fill (formula in the module doc)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks_regs = (REGS_PER_SM // regs_per_warp) // warps
    smem = -(-shared_bytes // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT + SMEM_RESERVED_PER_BLOCK
    blocks_smem = SMEM_PER_SM // smem
    blocks_warps = MAX_WARPS_PER_SM // warps
    blocks = min(blocks_regs, blocks_smem, blocks_warps, MAX_BLOCKS_PER_SM)
    return blocks * warps / MAX_WARPS_PER_SM


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_LMEM = re.compile(r"(\d+) bytes lmem")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*?(?:0x([0-9a-f]+)|\.L_x_(\d+))")
_LABEL = re.compile(r"^\.L_x_(\d+):")


def parse_ptxas(text):
    """registers, spill bytes (stores + loads), local (stack/lmem) bytes, static smem."""
    regs = _PTXAS_USED.search(text)
    smem = _PTXAS_SMEM.search(text)
    stack = _PTXAS_STACK.search(text)
    lmem = _PTXAS_LMEM.search(text)
    spill = int(stack.group(2)) + int(stack.group(3)) if stack else 0
    local = max(int(stack.group(1)) if stack else 0, int(lmem.group(1)) if lmem else 0)
    return {"registers": int(regs.group(1)) if regs else 0, "spill_bytes": spill,
            "local_bytes": local, "shared_bytes": int(smem.group(1)) if smem else 0}


def parse_sass(text):
    """[(address, opcode, instruction text)] plus {label number: address} of one cubin.

    Branch targets appear as addresses (``BRA 0x20f0``) in ``cuobjdump -sass`` and as labels
    (``BRA `(.L_x_3)``) in ``nvdisasm``; both are understood.
    """
    instrs, labels, pending = [], {}, []
    for raw in text.splitlines():
        line = raw.strip()
        label = _LABEL.match(line)
        if label:
            pending.append(int(label.group(1)))
            continue
        m = _SASS_LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        if body.startswith("@"):                     # predicate guard, e.g. "@!P0 BRA ..."
            body = body.split(None, 1)[1] if " " in body else body
        opcode = body.split()[0] if body else ""
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append((addr, opcode, body))
    return instrs, labels


def main_loop(instrs, labels):
    """(start, end, ffma, total) of the main loop (module doc), or None without loops."""
    best = None
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    for i, (addr, opcode, body) in enumerate(instrs):
        if opcode != "BRA":
            continue
        m = _BRANCH_TARGET.search(body)
        if not m:
            continue
        target = int(m.group(1), 16) if m.group(1) else labels.get(int(m.group(2)))
        if target is None or target > addr or target not in index:
            continue
        span = [op for _, op, _ in instrs[index[target]:i + 1] if op != "NOP"]
        ffma = sum(op.startswith("FFMA") for op in span)
        key = (ffma, -len(span))
        if best is None or key > best[0]:
            best = (key, (target, addr, ffma, len(span)))
    return best[1] if best else None


def opcode_mix(instrs, start=None, end=None):
    """{opcode family: count} over [start, end] (whole kernel by default)."""
    mix = {}
    for addr, op, _ in instrs:
        if (start is None or addr >= start) and (end is None or addr <= end) and op != "NOP":
            family = op.split(".")[0]
            mix[family] = mix.get(family, 0) + 1
    return mix


def _threads_for(entry, module):
    if len(entry) > 3 and entry[3]:
        return int(entry[3]), False
    hint = getattr(module, "THREADS_PER_BLOCK", None) if module is not None else None
    if isinstance(hint, int):
        return hint, False
    return DEFAULT_THREADS, True


def analyze(entries, module=None, workdir=None):
    """Compile and measure each ``(kernel, signature, is_gemm[, threads])`` entry."""
    _check_not_simulator()
    from numba import cuda
    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    nvdisasm = find_tool("nvdisasm")           # cuobjdump -sass runs it
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n, entry in enumerate(entries):
            kernel, sig, is_gemm = entry[0], entry[1], bool(entry[2])
            pyfunc = getattr(kernel, "py_func", kernel)
            name = getattr(pyfunc, "__name__", str(kernel))
            threads, assumed = _threads_for(entry, module)
            bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
            ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=CC, launch_bounds=bounds)
            ptx_path = os.path.join(tmp, f"k{n}.ptx")
            cubin = os.path.join(tmp, f"k{n}.cubin")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            run = subprocess.run([ptxas, f"-arch={ARCH}", "-v", "-o", cubin, ptx_path],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"ptxas failed on {name}: {run.stderr}")
            info = parse_ptxas(run.stdout + run.stderr)
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                                  env=env)
            if sass.returncode != 0:
                raise RuntimeError(f"cuobjdump failed on {name}: {sass.stderr}")
            sass = sass.stdout
            instrs, labels = parse_sass(sass)
            mix = opcode_mix(instrs)
            # Belt and braces: an LDL/STL in the SASS means local memory even if ptxas's
            # summary said 0 bytes (counted as at least one 4-byte word).
            if mix.get("LDL", 0) + mix.get("STL", 0):
                info["local_bytes"] = max(info["local_bytes"], 4)
            row = {"name": name, "module": getattr(module, "__name__", None),
                   "signature": sig, "is_gemm": is_gemm, **info,
                   "threads_per_block": threads, "threads_assumed": assumed,
                   "occupancy": occupancy(info["registers"], info["shared_bytes"], threads),
                   "instructions": len(instrs), "ffma_share": None, "main_loop": None}
            if is_gemm:
                loop = main_loop(instrs, labels)
                if loop is not None:
                    start, end, ffma, total = loop
                    row["ffma_share"] = ffma / total
                    row["main_loop"] = {"start": start, "end": end, "ffma": ffma,
                                        "instructions": total,
                                        "mix": opcode_mix(instrs, start, end)}
                else:
                    row["ffma_share"] = 0.0
            results.append(row)
    return results


def cuda_modules():
    """Every module of the nbalex.cuda package (imported), in name order."""
    import nbalex.cuda as pkg
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
    return [importlib.import_module(f"nbalex.cuda.{n}") for n in names if n != "static"]


def _analyze_entry(module_name, index):
    """:func:`analyze` of entry ``index`` of ``module_name``'s ``STATIC_SIGNATURES`` (one row)."""
    module = importlib.import_module(module_name)
    return analyze([module.STATIC_SIGNATURES[index]], module=module)[0]


def analyze_all(jobs=None):
    """:func:`analyze` over ``STATIC_SIGNATURES`` of every module that defines it.

    Kernels compile one by one (NVVM, ptxas and cuobjdump are single-threaded), so they are
    spread over ``jobs`` processes (default: one per CPU core); rows keep module order.
    """
    _check_not_simulator()
    tasks = [(module.__name__, i) for module in cuda_modules()
             for i in range(len(getattr(module, "STATIC_SIGNATURES", None) or ()))]
    jobs = min(len(tasks), jobs or os.cpu_count() or 1)
    if jobs <= 1:
        return [_analyze_entry(name, i) for name, i in tasks]
    import concurrent.futures
    from nbalex.io import children      # compile workers die with this process
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=children.context("spawn"), initializer=children.worker_init,
            initargs=(os.getpid(),)) as pool:
        return list(pool.map(_analyze_entry, *zip(*tasks)))


def format_table(rows):
    head = f"{'module':<14} {'kernel':<40} {'regs':>4} {'spill':>5} {'lmem':>4} {'smem':>6} " \
           f"{'thr':>4} {'occ':>5} {'ffma':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        share = "" if r["ffma_share"] is None else f"{r['ffma_share']:.2f}"
        mod = (r["module"] or "").rsplit(".", 1)[-1]
        lines.append(f"{mod:<14} {r['name'][:40]:<40} {r['registers']:>4} "
                     f"{r['spill_bytes']:>5} {r['local_bytes']:>4} {r['shared_bytes']:>6} "
                     f"{r['threads_per_block']:>4} {r['occupancy']:>5.2f} {share:>5}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m nbalex.cuda.static",
        description="Compile every nbalex CUDA kernel for sm_90 and report registers, spills, "
                    "shared memory, occupancy and the GEMM main loop's FFMA share.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiler processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    try:
        rows = analyze_all(args.jobs)
    except (RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
