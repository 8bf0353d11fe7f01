"""Peak memory of the labevents scan of `launcher data build` as the file grows: it must stay flat.

    python benchmarks/labevents_memory.py                       # 1M and 4M rows (about 1 minute on 2 cores)
    python benchmarks/labevents_memory.py --sizes 1e6,2e6,4e6 --compare-naive

Writes raw-format labevents.csv.gz files (datasets_io.mimic_fixture.write_labevents) of each size, then scans each
in a fresh process with datasets_io.mimic_build.ehr.nearest_labs: the same streaming filter + per-(study, lab)
reduction the build runs on the real tens-of-GB file, for 3,000 studies of 1,000 patients. Each child reports its
resident set before the scan (imports and the study arrays), its peak (VmHWM), the peak of Arrow's buffers, and
the largest resident set in each quarter of the scan (a flat profile within one file, not only across files).
With --compare-naive, a second child reads the whole file with pyarrow.csv.read_csv for contrast: that peak grows
with the file. The remaining run-to-run spread (tens of MiB) is pyarrow's bounded read-ahead queue filling more or
less depending on how busy the CPUs are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SUBJECTS, STUDIES_PER_SUBJECT = 1000, 3


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def studies():
    import numpy as np

    subjects = 10_000_000 + np.arange(N_SUBJECTS, dtype=np.int64) * 7
    study_subject = np.repeat(subjects, STUDIES_PER_SUBJECT)
    t0 = np.datetime64("2150-01-01T00:00:00").astype("datetime64[s]").astype(np.int64)
    rng = np.random.default_rng(1)
    study_time = t0 + rng.integers(0, 3650 * 86400, len(study_subject))
    return subjects, study_subject, study_time


def panel_itemids():
    from datasets_io import mimic_fixture as fx
    from datasets_io.mimic_build.ehr import LAB_PANEL

    names = {
        (label.lower(), fluid.lower()): i for i, (labels, fluid) in enumerate(LAB_PANEL.values()) for label in labels
    }
    items = {
        itemid: names[(label.lower(), fluid.lower())]
        for itemid, label, fluid, _ in fx.D_LABITEMS
        if (label.lower(), fluid.lower()) in names
    }
    return items, len(LAB_PANEL)


def child(path: str, mode: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from datasets_io.mimic_build.ehr import nearest_labs

    _, study_subject, study_time = studies()
    items, n_items = panel_itemids()
    before = rss_mb("VmRSS")
    samples: list[float] = []  # VmRSS every 50 ms while scanning: a flat profile, not just a flat maximum
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append(rss_mb("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "stream":
        reducer, stats = nearest_labs(Path(path), items, n_items, study_subject, study_time, 24.0, desc=None)
        found = int((reducer.delta != np.iinfo(np.int64).max).sum())
    else:
        table = pacsv.read_csv(path)
        stats, found = {"rows_scanned": table.num_rows}, 0
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    quarters = [max(q) if len(q) else float("nan") for q in np.array_split(np.array(samples or [before]), 4)]
    arrow_peak = pa.default_memory_pool().max_memory() / 2**20  # peak of Arrow buffers (CSV blocks, batches)
    print(
        json.dumps(
            {
                "before_mb": before,
                "peak_mb": rss_mb("VmHWM"),
                "arrow_peak_mb": arrow_peak,
                "rss_by_quarter_mb": [float(q) for q in quarters],
                "seconds": seconds,
                "found": found,
                **stats,
            }
        )
    )


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--mode", mode],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,4e6", help="labevents row counts, comma-separated")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--compare-naive", action="store_true", help="also read each file whole, for contrast")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mode)
        return 0

    from datasets_io import mimic_fixture as fx

    subjects, _, _ = studies()
    items, _ = panel_itemids()
    import numpy as np

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = []
        for n in sizes:
            path = Path(tmp) / f"labevents_{n}.csv.gz"
            t = time.perf_counter()
            size = fx.write_labevents(path, n, subjects=subjects, itemids=np.array(sorted(items)), seed=n)
            print(f"wrote {n:,} rows ({size / 2**20:.0f} MiB gzip) in {time.perf_counter() - t:.0f} s", flush=True)
            row = {"rows": n, "gzip_mb": size / 2**20, "stream": measure(path, "stream")}
            if args.compare_naive:
                row["naive"] = measure(path, "naive")
            results.append(row)
            path.unlink()

    print(
        f"\nlabevents scan, {N_SUBJECTS * STUDIES_PER_SUBJECT:,} studies of {N_SUBJECTS:,} patients, "
        f"{len(items)} panel itemids, 24 h window"
    )
    print(
        f"{'rows':>10} {'gzip MiB':>9} {'RSS before':>11} {'peak RSS':>9} {'peak - before':>14} {'Arrow peak':>11} "
        f"{'RSS max per quarter of the scan':>32} {'rows kept':>10} {'seconds':>8}"
        + ("   naive read_csv peak" if args.compare_naive else "")
    )
    for r in results:
        s = r["stream"]
        quarters = " ".join(f"{q:>5.0f}" for q in s["rss_by_quarter_mb"]) + " M"
        line = (
            f"{r['rows']:>10,} {r['gzip_mb']:>9.0f} {s['before_mb']:>9.0f} M {s['peak_mb']:>7.0f} M "
            f"{s['peak_mb'] - s['before_mb']:>12.0f} M {s['arrow_peak_mb']:>9.0f} M {quarters:>32} "
            f"{s['rows_kept']:>10,} {s['seconds']:>8.1f}"
        )
        if "naive" in r:
            line += f"   {r['naive']['peak_mb']:>8.0f} M"
        print(line)
    first, last = results[0]["stream"], results[-1]["stream"]
    growth = (last["peak_mb"] - last["before_mb"]) - (first["peak_mb"] - first["before_mb"])
    print(
        f"\npeak growth from {results[0]['rows']:,} to {results[-1]['rows']:,} rows: {growth:+.0f} MiB "
        f"({results[-1]['rows'] / results[0]['rows']:.0f}x the rows)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
