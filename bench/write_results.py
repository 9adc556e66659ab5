"""Turn the GPU suite's raw outputs into bench/results/gpu-<card>-<date>.md.

    python bench/write_results.py [RAW_DIR]        (default bench/results/raw)

RAW_DIR holds what bench/gpu_suite.sh wrote: gpu.csv and nvidia-smi.txt (the card),
steps.tsv (each step's status), pytest.log, and the JSON of ``nbalex bench static``,
``kernels`` (kernels-*.json), ``sgemm`` and ``train``, and variants.json from
``bench/elementwise_variants.py``. A missing or unreadable output
becomes a line saying so; the file is written whatever failed. A short summary is printed
last, and the markdown file's path is saved to RAW_DIR/results_path.txt.
"""

import datetime
import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def read_text(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def read_json(path):
    """(data, None) or (None, why it could not be read)."""
    text = read_text(path)
    if text is None:
        return None, f"{Path(path).name} missing"
    if not text.strip():
        return None, f"{Path(path).name} empty"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{Path(path).name} is not JSON ({exc})"


def card_info(raw):
    """{name, driver, memory, cuda} from gpu.csv and nvidia-smi.txt ('unknown' when absent)."""
    info = {"name": "unknown", "driver": "unknown", "memory": "unknown", "cuda": "unknown",
            "sm_clock": "unknown", "max_sm_clock": "unknown"}
    first = (read_text(raw / "gpu.csv") or "").strip().splitlines()
    if first:
        parts = [p.strip() for p in first[0].split(",")]
        for key, value in zip(("name", "driver", "memory", "sm_clock", "max_sm_clock"), parts):
            info[key] = value
    match = re.search(r"CUDA Version:\s*([\d.]+)", read_text(raw / "nvidia-smi.txt") or "")
    if match:
        info["cuda"] = match.group(1)
    return info


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cell(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "/")


def md_table(rows, columns):
    """Markdown table; columns are (key, header) or (key, header, digits)."""
    cols = [(c[0], c[1], c[2] if len(c) > 2 else 2) for c in columns]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), d) for k, _, d in cols) + " |")
    return "\n".join(lines)


def generic_table(data, limit=10):
    """A table of any list of flat dicts (or a dict holding one), scalar keys only."""
    rows = data
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        rows = lists[0] if lists else [data]
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return "```\n" + json.dumps(data, indent=1)[:4000] + "\n```"
    keys = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and (v is None or isinstance(v, (int, float, str, bool))):
                keys.append(k)
    return md_table(rows, [(k, k) for k in keys[:limit]])


def steps_section(raw):
    text = read_text(raw / "steps.tsv")
    if not text:
        return ["steps.tsv missing: the suite did not record its steps."], []
    rows = [dict(zip(("step", "status", "seconds"), line.split("\t")))
            for line in text.strip().splitlines()[1:]]
    out = [md_table(rows, [("step", "step"), ("status", "status"), ("seconds", "seconds")])]
    for r in rows:                      # the end of each failed step's stderr
        err = read_text(raw / f"{r['step']}.err")
        if err and err.strip() and not r.get("status", "").startswith(("ok", "skipped")):
            out += ["", f"{r['step']} stderr (last lines):", "", "```",
                    *err.rstrip().splitlines()[-15:], "```"]
    return out, rows


def tests_section(raw):
    log = read_text(raw / "pytest.log")
    if log is None:
        return ["pytest.log missing."], "not run"
    summary = [ln.strip("= ") for ln in log.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    line = summary[-1] if summary else "no summary line (interrupted?)"
    failures = [ln for ln in log.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    out = [f"pytest: {line}"]
    if failures:
        out += ["", "```", *failures[:40], "```"]
    return out, line


def kernels_section(raw):
    rows, problems = [], []
    for path in sorted(raw.glob("kernels*.json")):
        data, why = read_json(path)
        if why:
            problems.append(why)
        else:
            rows += data
    out = []
    if rows:
        first = next((r for r in rows if "batch" in r), {})
        out.append(f"Batch {first.get('batch', '?')}, backend {first.get('backend', '?')}; "
                   "torch/ours = PyTorch's time over ours (above 1: ours is faster).")
        out.append("")
        out.append(md_table(rows, [("layer", "layer"), ("pass", "pass"), ("ms", "ms", 3),
                                   ("gflops", "GFLOP/s", 0), ("gbs", "GB/s", 0),
                                   ("torch_ms", "torch ms", 3), ("torch_over_ours", "torch/ours", 2),
                                   ("check_error", "rel err", 7), ("error", "error")]))
    out += [f"- {p}" for p in problems]
    ratios = [r["torch_over_ours"] for r in rows if r.get("torch_over_ours")]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None
    failed = sum(1 for r in rows if r.get("error"))
    summary = (f"kernels: {len(rows)} rows, {failed} failed, geometric mean torch/ours "
               f"{cell(geo)}" if rows else "kernels: no results")
    return out or ["no results"], summary


def sgemm_section(raw):
    data, why = read_json(raw / "sgemm.json")
    if why:
        return [why], "sgemm: no results"
    table = md_table(data, [("shape", "shape"), ("M", "M"), ("N", "N"), ("K", "K"),
                            ("ours_ms", "ours ms", 3), ("ours_tflops", "ours TFLOP/s", 2),
                            ("peer_ms", "cuBLAS ms", 3), ("peer_tflops", "cuBLAS TFLOP/s", 2),
                            ("percent_of_peer", "ours/cuBLAS %", 1), ("error", "error")])
    pct = [r["percent_of_peer"] for r in data if r.get("percent_of_peer")]
    summary = (f"sgemm: ours at {min(pct):.0f}-{max(pct):.0f}% of cuBLAS" if pct
               else "sgemm: no comparison")
    return [table], summary


def train_section(raw):
    r, why = read_json(raw / "train.json")
    if why:
        return [why], "train: no results"
    out = [md_table([r], [("model", "model"), ("batch", "batch"), ("ours_images_per_s", "ours img/s", 1),
                          ("torch_images_per_s", "torch img/s", 1), ("ours_over_torch", "torch/ours", 2),
                          ("launches_per_step", "launches/step", 0),
                          ("launch_overhead_ms", "launch overhead ms", 2),
                          ("loader_images_per_s", "loader img/s", 1)])]
    if r.get("layers"):
        out += ["", f"Per-layer share of a profiled step ({cell(r.get('profile_ms'), 1)} ms, "
                    "synchronised around every launch):", "",
                md_table(r["layers"], [("layer", "layer"), ("ms", "ms/step", 2), ("share", "share", 3)])]
    out += [f"- {k[:-6]} failed: {v}" for k, v in r.items() if k.endswith("_error")]
    summary = (f"train: ours {cell(r.get('ours_images_per_s'), 1)} img/s, "
               f"torch {cell(r.get('torch_images_per_s'), 1)} img/s")
    return out, summary


def variants_section(raw):
    """bench/elementwise_variants.py's rows: the unrolled elementwise kernels against ours."""
    data, why = read_json(raw / "variants.json")
    if why:
        return [why], "variants: no results"
    table = md_table(data, [("op", "op"), ("size", "size"), ("variant", "variant"),
                            ("grid", "grid"), ("blocks", "blocks"), ("ms", "ms", 4),
                            ("gbps", "GB/s", 0), ("vs_package", "vs package", 2),
                            ("queued_ms", "queued ms", 4), ("queued_gbps", "queued GB/s", 0),
                            ("queued_vs_package", "queued vs package", 2)])
    wins = [f"{r['op']}/{r['size']} {r['variant']} ({r['grid']}) {r['queued_vs_package']:.2f}x"
            for r in data if r.get("variant") != "package"
            and (r.get("queued_vs_package") or 0) > 1.05]
    summary = "variants: " + ("faster than ours: " + ", ".join(wins) if wins
                              else "none faster than ours by more than 5%")
    return [table], summary


def render(raw):
    """(markdown text, card info, summary lines) for the raw outputs in ``raw``."""
    raw = Path(raw)
    card = card_info(raw)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    steps, step_rows = steps_section(raw)
    tests, tests_line = tests_section(raw)
    kernels, k_sum = kernels_section(raw)
    sgemm, s_sum = sgemm_section(raw)
    train, t_sum = train_section(raw)
    variants, v_sum = variants_section(raw)
    static, why = read_json(raw / "static.json")
    versions = read_text(raw / "python.txt") or "not recorded\n"
    md = [f"# GPU suite: {card['name']}, {today}", "",
          md_table([{**card, "date": today}],
                   [("name", "card"), ("driver", "driver"), ("cuda", "CUDA"), ("memory", "memory"),
                    ("sm_clock", "SM clock at start"), ("max_sm_clock", "max SM clock"), ("date", "date")]),
          "", "Clocks were left as found. Software:", "", "```", versions.rstrip(), "```",
          "", "## Steps", "", *steps, "", "## Tests", "", *tests,
          "", "## Kernels", "", *kernels, "", "## SGEMM against cuBLAS (TF32 off)", "", *sgemm,
          "", "## Training", "", *train,
          "", "## Elementwise variants (bench/elementwise_variants.py)", "", *variants,
          "", "## Static analysis", "", why if why else generic_table(static), ""]
    bad = [r["step"] for r in step_rows if not r.get("status", "").startswith("ok")]
    summary = [f"{card['name']} (driver {card['driver']}, CUDA {card['cuda']}), {today}",
               f"tests: {tests_line}", k_sum, s_sum, t_sum, v_sum,
               "steps not ok: " + (", ".join(bad) if bad else "none")]
    return "\n".join(md), card, summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    raw = Path(argv[0]) if argv else RESULTS / "raw"
    out_dir = Path(argv[1]) if len(argv) > 1 else RESULTS
    text, card, summary = render(raw)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{slug(card['name'])}-{today}.md"
    path.write_text(text)
    try:
        (raw / "results_path.txt").write_text(str(path))
    except OSError:
        pass
    print(f"wrote {path}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
