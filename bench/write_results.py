"""The GPU suite's records and results table (standard library only).

    python3 bench/write_results.py record OUT --step NAME --status S --rc RC --seconds T
        --limit L [--stdout FILE] [--stderr FILE] [--dry-run 0|1]
    python3 bench/write_results.py summary OUT     # the summary lines; exit 1 if a step failed
    python3 bench/write_results.py render OUT      # rewrite the table from OUT's records

``record`` appends one JSON line to OUT/steps.jsonl (the step's status, exit code, seconds,
its stdout parsed as JSON when it is JSON, else the tail of it, and the tail of its stderr),
then rewrites the table OUT/gpu-<card>-<date>.md from every record so far, so that a run cut
short still leaves a table of the steps that finished. Each write is one ``write`` call
(the record) or a temporary file renamed (the table). ``summary`` exits 1 when a step failed,
timed out or was skipped because the budget was spent; steps skipped on purpose (a dry run,
NBALEX_SUITE_SKIP, a missing tool) do not count.
"""

import argparse
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path

RECORDS = "steps.jsonl"
TAIL = 3000


def read_text(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


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


def tail(path, limit=TAIL):
    text = read_text(path) if path else None
    return None if text is None else text[-limit:]


def make_record(step, status, rc, seconds, limit, stdout=None, stderr=None, dry_run=False):
    """The record of one finished step (see the module docstring)."""
    text = read_text(stdout) if stdout else None
    data = None
    if text and text.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass
    return {"step": step, "status": status, "rc": int(rc) if str(rc).lstrip("-").isdigit() else None,
            "seconds": float(seconds), "limit_s": float(limit), "dry_run": bool(int(dry_run)),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": data, "stdout_tail": None if data is not None else (text or "")[-TAIL:] or None,
            "stderr_tail": tail(stderr)}


def append_record(out, record):
    """Append ``record`` to out/steps.jsonl as one line, in one write."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(Path(out) / RECORDS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records(out):
    """Every record of out/steps.jsonl (a torn last line, from a kill, is left out)."""
    records = []
    for line in (read_text(Path(out) / RECORDS) or "").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def card_info(records):
    """{name, driver, memory, sm_clock, max_sm_clock} from the nvidia-smi record."""
    info = dict.fromkeys(("name", "driver", "memory", "sm_clock", "max_sm_clock"), "unknown")
    rec = next((r for r in records if r["step"] == "nvidia-smi" and r["status"] == "ok"), None)
    lines = ((rec or {}).get("stdout_tail") or "").strip().splitlines()
    if lines:
        for key, value in zip(info, (p.strip() for p in lines[0].split(","))):
            info[key] = value
    return info


def not_ok(record):
    """True for a step that failed, timed out or had no time left (not a skip on purpose)."""
    status = record["status"]
    return status.startswith(("failed", "timeout")) or status == "skipped (budget spent)"


def steps_section(records):
    out = [md_table(records, [("step", "step"), ("status", "status"), ("seconds", "seconds", 0),
                              ("limit_s", "limit s", 0)])]
    for r in records:                       # the end of each failed step's stderr
        if not_ok(r) and (r.get("stderr_tail") or "").strip():
            out += ["", f"{r['step']} stderr (last lines):", "", "```",
                    *r["stderr_tail"].rstrip().splitlines()[-15:], "```"]
    return out


def software_section(by_step):
    lines = []
    env = (by_step.get("env") or {}).get("data") or {}
    if env:
        lines.append(f"python {env.get('python')}: " + ", ".join(
            f"{k} {v}" for k, v in env.get("found", {}).items()))
        if env.get("missing"):
            lines.append("missing: " + ", ".join(env["missing"]))
    pre = (by_step.get("preflight") or {}).get("data") or {}
    for key, value in (pre.get("versions") or {}).items():
        lines.append(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    if pre:
        lines.append(f"tiny kernel: {pre.get('kernel') or pre.get('error')}")
    return ["```", *(lines or ["not recorded"]), "```"]


def tests_section(out, by_step):
    log = read_text(Path(out) / "pytest.log")
    if log is None:
        return ["pytest.log missing: the test step did not run."], "not run"
    summary = [ln.strip("= ") for ln in log.splitlines()
               if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if summary:
        line = summary[-1]
    else:                               # killed: count the -v lines it did print
        counts = {w: len(re.findall(rf" {w}\b", log)) for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        started = re.findall(r"^(\S+::\S+)", log, re.M)
        line = ("cut short: " + ", ".join(f"{n} {w.lower()}" for w, n in counts.items() if n)
                + (f"; last test started: {started[-1]}" if started else ""))
    failures = [ln for ln in log.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if not failures:                    # no short summary (killed): the -v lines that failed
        failures = [ln for ln in log.splitlines() if re.search(r"::\S+ (FAILED|ERROR)\b", ln)]
    rows = [f"pytest: {line}"]
    if failures:
        rows += ["", "```", *failures[:40], "```"]
    return rows, line


_SANITIZER = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY)[^\n]*")


def sanitizer_section(by_step):
    rows = []
    for tool in ("memcheck", "racecheck"):
        r = by_step.get(tool)
        if r is None:
            continue
        data = r.get("data") or {}
        said = [m.group(0) for m in _SANITIZER.finditer(
            (r.get("stdout_tail") or "") + "\n" + (r.get("stderr_tail") or ""))]
        rows.append({"tool": tool, "status": r["status"], "summary": "; ".join(said) or None,
                     "launches": data.get("launches"),
                     "kernels": len(data.get("kernels", [])) or None,
                     "gemm_not_reached": ", ".join(data.get("gemm_not_reached", [])) or None,
                     "worst_rel_err": data.get("worst_rel_err")})
    if not rows:
        return ["not run"]
    return [md_table(rows, [("tool", "tool"), ("status", "status"), ("summary", "summary"),
                            ("launches", "launches"), ("kernels", "kernels"),
                            ("worst_rel_err", "rel err", 7),
                            ("gemm_not_reached", "GEMM kernels not reached")])]


def plan_section(by_step):
    """The plan's predicted rows beside the measured kernels rows (same layer and pass)."""
    plan = (by_step.get("plan") or {}).get("data")
    if not isinstance(plan, dict) or not plan.get("rows"):
        return ["no plan"], "plan: none"
    measured = {}
    for step in ("kernels-conv", "kernels-rest"):
        for r in (by_step.get(step) or {}).get("data") or []:
            if isinstance(r, dict) and r.get("ms") is not None:
                measured[(r.get("layer"), r.get("pass"))] = r["ms"]
    rows = [{**r, "measured_ms": measured.get((r.get("layer"), r.get("pass")))} for r in plan["rows"]]
    train = (by_step.get("train") or {}).get("data") or {}
    out = [f"Predicted step {cell(plan.get('predicted_step_ms'), 2)} ms "
           f"({cell(plan.get('predicted_images_per_s'), 0)} images/s); measured "
           f"{cell(train.get('ours_ms'), 2)} ms ({cell(train.get('ours_images_per_s'), 0)} images/s).",
           "", md_table(rows, [("layer", "layer"), ("pass", "pass"), ("kernel", "kernel"),
                               ("grid", "grid"), ("split_k", "split-K"), ("waves", "waves", 2),
                               ("predicted_ms", "predicted ms", 3), ("measured_ms", "measured ms", 3)]),
           "", "Assumptions:", "", *[f"- {a}" for a in plan.get("assumptions", [])]]
    return out, f"plan: predicted {cell(plan.get('predicted_step_ms'), 2)} ms/step"


def kernels_section(rows):
    rows, problems = [r for r in rows if isinstance(r, dict)], []
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


def sgemm_section(data):
    if not isinstance(data, list):
        return ["not run"], "sgemm: no results"
    table = md_table(data, [("shape", "shape"), ("M", "M"), ("N", "N"), ("K", "K"),
                            ("ours_ms", "ours ms", 3), ("ours_tflops", "ours TFLOP/s", 2),
                            ("peer_ms", "cuBLAS ms", 3), ("peer_tflops", "cuBLAS TFLOP/s", 2),
                            ("percent_of_peer", "ours/cuBLAS %", 1), ("error", "error")])
    pct = [r["percent_of_peer"] for r in data if r.get("percent_of_peer")]
    summary = (f"sgemm: ours at {min(pct):.0f}-{max(pct):.0f}% of cuBLAS" if pct
               else "sgemm: no comparison")
    return [table], summary


def train_section(r):
    if not isinstance(r, dict):
        return ["not run"], "train: no results"
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


def variants_section(data):
    """bench/elementwise_variants.py's rows: the unrolled elementwise kernels against ours."""
    if not isinstance(data, list):
        return ["not run"], "variants: no results"
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


def render(out, records=None):
    """(markdown text, card info, summary lines) for the records in ``out``."""
    records = read_records(out) if records is None else records
    by_step = {r["step"]: r for r in records}
    card = card_info(records)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    dry = any(r.get("dry_run") for r in records)
    tests, tests_line = tests_section(out, by_step)
    kernels, k_sum = kernels_section([r for s in ("kernels-conv", "kernels-rest")
                                      for r in ((by_step.get(s) or {}).get("data") or [])])
    sgemm, s_sum = sgemm_section((by_step.get("sgemm") or {}).get("data"))
    train, t_sum = train_section((by_step.get("train") or {}).get("data"))
    variants, v_sum = variants_section((by_step.get("variants") or {}).get("data"))
    plan, p_sum = plan_section(by_step)
    static = (by_step.get("static") or {}).get("data")
    md = [f"# GPU suite: {card['name']}, {today}" + (" (dry run, simulator)" if dry else ""), "",
          md_table([{**card, "date": today}],
                   [("name", "card"), ("driver", "driver"), ("memory", "memory"),
                    ("sm_clock", "SM clock at start"), ("max_sm_clock", "max SM clock"), ("date", "date")]),
          "", "Clocks were left as found. Software:", "", *software_section(by_step),
          "", "## Steps", "", *steps_section(records), "", "## Tests", "", *tests,
          "", "## compute-sanitizer", "", *sanitizer_section(by_step),
          "", "## Plan against measurement", "", *plan,
          "", "## Kernels", "", *kernels, "", "## SGEMM against cuBLAS (TF32 off)", "", *sgemm,
          "", "## Training", "", *train,
          "", "## Elementwise variants (bench/elementwise_variants.py)", "", *variants,
          "", "## Static analysis", "", generic_table(static) if static else "not run", ""]
    bad = [r["step"] for r in records if not_ok(r)]
    summary = [f"{card['name']} (driver {card['driver']}), {today}", f"tests: {tests_line}",
               k_sum, s_sum, t_sum, v_sum, p_sum, "steps not ok: " + (", ".join(bad) or "none")]
    return "\n".join(md), card, summary


def write_table(out):
    """Rewrite out/gpu-<card>-<date>.md atomically (older tables in ``out`` are removed)."""
    out = Path(out)
    text, card, _ = render(out)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = out / f"gpu-{slug(card['name'])}-{today}.md"
    tmp = out / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    for old in out.glob("gpu-*.md"):
        if old != path:
            old.unlink()
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/write_results.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("record", "summary", "render"))
    parser.add_argument("out", type=Path, help="the suite's output folder")
    for name in ("--step", "--status", "--rc", "--stdout", "--stderr"):
        parser.add_argument(name, default="")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--limit", type=float, default=0.0)
    parser.add_argument("--dry-run", default="0")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder")
    if args.action == "record":
        if not args.step or not args.status:
            parser.error("record needs --step and --status")
        append_record(args.out, make_record(args.step, args.status, args.rc, args.seconds, args.limit,
                                            args.stdout or None, args.stderr or None, args.dry_run))
    path = write_table(args.out)
    if args.action == "summary":
        print(f"wrote {path}")
        print("\n".join(render(args.out)[2]))
        return 1 if any(not_ok(r) for r in read_records(args.out)) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
