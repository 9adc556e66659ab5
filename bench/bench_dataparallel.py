"""Images/s of one process against N ranks on the same cores, and the share of a step spent
waiting on the gradient allreduce.

    .venv/bin/python bench/bench_dataparallel.py [--model alexnet-mini] [--batch 32]
        [--steps 8] [--repeats 3] [--ranks 2] [--threads 2]

Alternates, ``--repeats`` times: one process of ``--threads`` threads, then ``--ranks``
ranks of ``threads / ranks`` threads each (``mpiexec``), each timing ``--steps`` training
steps of synthetic data at the global batch ``--batch`` on the cpu backend (after one
warm-up step, which compiles).  Prints each run and the medians; the machine may be shared,
so read the spread, not one number.  Each rank's own numbers come from the worker mode
(``--worker``), which this script runs under ``mpiexec``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args):
    from nbalex.distributed import world as process_group
    w = process_group.init_or_exit()
    process_group.size_threads(w)
    import numpy as np
    from nbalex.model import Net
    from nbalex.parallel_run import Ranks
    ranks = Ranks(w)
    local = ranks.local_batch(args.batch)
    net = Net(args.model, backend="cpu", batch_size=local, seed=0)
    sync = ranks.grad_sync(net)
    rng = np.random.default_rng(w.rank)
    x = rng.standard_normal((local, *net.input_shape)).astype(np.float32)
    y = rng.integers(0, net.num_classes, local).astype(np.int32)
    waits, total = 0.0, 0.0
    for step in range(args.steps + 1):
        w.barrier()
        t0 = time.perf_counter()
        net.forward_backward(x, y, seed=step, batch_offset=w.rank * local, grad_sync=sync)
        if sync is not None:
            sync.wait()
        net.sgd_step(0.001)
        ranks.agree_step(0.0, local, False, False)
        if step:   # step 0 compiles
            total += time.perf_counter() - t0
            waits += sync.wait_seconds if sync is not None else 0.0
    if w.is_root:
        print(json.dumps({"ranks": w.size, "threads": w.threads or os.environ.get(
            "NUMBA_NUM_THREADS"), "images_per_s": args.batch * args.steps / total,
            "wait_share": waits / total}), flush=True)


def launch(args, ranks):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    me = [sys.executable, __file__, "--worker", "--model", args.model, "--batch",
          str(args.batch), "--steps", str(args.steps)]
    if ranks == 1:
        env.update(NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   OPENBLAS_NUM_THREADS=str(args.threads))
        cmd = me
    else:
        share = str(max(1, args.threads // ranks))
        for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = share
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks),
               "--bind-to", "none"] + me
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.exit(f"Error: {' '.join(cmd[:4])}... failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="alexnet-mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"# {args.model}, global batch {args.batch}, {args.steps} steps per run, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    one, many = [], []
    for r in range(args.repeats):
        for ranks, into in ((1, one), (args.ranks, many)):
            row = launch(args, ranks)
            into.append(row)
            print(f"run {r + 1}: {ranks} rank(s) x {row['threads']} thread(s): "
                  f"{row['images_per_s']:.1f} img/s, waiting on communication "
                  f"{100 * row['wait_share']:.1f}% of a step", flush=True)
    a = statistics.median(r["images_per_s"] for r in one)
    b = statistics.median(r["images_per_s"] for r in many)
    share = statistics.median(r["wait_share"] for r in many)
    print(f"median: 1 process {a:.1f} img/s, {args.ranks} ranks {b:.1f} img/s "
          f"({b / a:.2f}x), communication wait {100 * share:.1f}% of a step")


if __name__ == "__main__":
    main()
