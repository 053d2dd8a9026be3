"""Memory of a whole search, driver plus every Ray process it started, and its overhead share (a benchmark).

    python bench/overhead_memory.py [--space search_spaces/cpu.yaml] [--num-samples N] [--data PATH] [--quick]

Runs ``python -m xray_ray.search`` in a subprocess with its own local Ray (its own RAY_TMPDIR) and every
--interval seconds sums the memory of that subprocess and all its descendants (gcs_server, raylet, Ray's
monitors, trial and data workers), plus any process whose command line names its private Ray folder.
No other Ray instance on the machine (a background search, say) is counted.
  rss       resident set size summed over the processes: counts shared pages (torch's libraries, Ray's
            object store in /dev/shm) once per process, so it overstates what the search costs the machine
  private   RSS less shared pages, summed (cheap, read every time): memory no other process shares
  pss       proportional set size (shared pages split between their processes), the fairest total; it costs
            the sampler 10-50 ms a process, so it is read only every --pss-every seconds
Reports the peak, the total right after each trial ended (trial ends from epochs.parquet ``ended_at``) with
a least-squares slope in MB per trial (does memory grow with trials? fitted without the last trial, whose
reading catches the search shutting down), and overhead.share_outside from the
run's run.json (share of slot-seconds outside training and validation steps). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# isort: off
import ray  # noqa: F401  (puts Ray's bundled psutil on the path: it must come first)
import psutil

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, default_data, derived_space, emit, machine, print_table  # noqa: E402

MB = 1024 * 1024
GROWTH = ("rss_mb", "private_mb", "rss_driver_mb", "rss_ray_core_mb")  # fitted against trials done
CORE = ("gcs_server", "raylet", "log_monitor", "monitor.py", "dashboard", "runtime_env", "agent")


def processes(root: psutil.Process, marker: str) -> dict[int, psutil.Process]:
    """The search's processes: the root's descendants plus any process naming our Ray folder."""
    found = {root.pid: root}
    try:
        found.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in found and marker in " ".join(p.info["cmdline"] or []):
            found[p.pid] = p  # a Ray daemon that outlived its parent would otherwise be missed
    return found


def role(p: psutil.Process, root_pid: int) -> str:
    if p.pid == root_pid:
        return "driver"
    try:
        text = " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "workers"
    return "ray_core" if any(k in text for k in CORE) and not text.startswith("ray::") else "workers"


def sample(root: psutil.Process, marker: str, with_pss: bool) -> dict:
    """One reading (MB): total RSS, private RSS (RSS less shared pages), RSS by role, and PSS when asked."""
    rss = private = pss = 0
    roles = {"driver": 0, "ray_core": 0, "workers": 0}
    n = 0
    for p in processes(root, marker).values():
        try:
            mem = p.memory_info()
            r = role(p, root.pid)
            # smaps_rollup costs ~10-50 ms a process, /proc/<pid>/statm microseconds: PSS only now and then
            pss += p.memory_full_info().pss if with_pss else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += mem.rss
        private += mem.rss - mem.shared
        roles[r] += mem.rss
        n += 1
    return {
        "t": time.time(),
        "rss_mb": rss / MB,
        "private_mb": private / MB,
        "pss_mb": pss / MB if with_pss else np.nan,
        "processes": n,
        **{f"rss_{k}_mb": v / MB for k, v in roles.items()},
    }


def after_each_trial(samples: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """The first reading after each trial's last report, in order of trial ends."""
    ends = epochs.groupby("trial_id")["ended_at"].max().sort_values()
    rows = []
    for k, (trial, end) in enumerate(ends.items(), start=1):
        later = samples[samples["t"] >= end]
        if len(later):
            rows.append({"trials_done": k, "trial_id": trial, **later.iloc[0].to_dict()})
    return pd.DataFrame(rows)


def slope(x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu.yaml")
    ap.add_argument("--num-samples", type=int, default=None, help="trials (default: the space's)")
    ap.add_argument("--image-size", type=int, default=None, help="override the space's image_size")
    ap.add_argument("--epochs", type=int, default=None, help="override the space's epochs (ASHA's max_t)")
    ap.add_argument("--data", default=default_data("synthetic"), help="default: real images if present")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between readings")
    ap.add_argument(
        "--pss-every",
        type=float,
        default=10.0,
        help="seconds between PSS readings (each costs the sampler CPU time; 0: never)",
    )
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the search's local Ray (default: all)")
    ap.add_argument("--export", action="store_true", help="also evaluate and export the winner (off: search only)")
    ap.add_argument("--cache", default=None, help="pixel cache folder (default: the package's)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for overhead_memory.json and its samples CSV")
    ap.add_argument(
        "--quick", action="store_true", help="smoke space, 1 epoch at 32 px, 2 trials one at a time, 120 images (CI)"
    )
    return ap.parse_args()


def search_command(args: argparse.Namespace, tmp: Path) -> tuple[list[str], str]:
    """The search's command line (its space derived for --quick or the overrides) and the space's label."""
    space, label = args.space, str(args.space)
    if args.quick:
        # a 1-CPU Ray runs the 2 trials one after the other in one reused worker
        args.data, args.num_samples, args.num_cpus = "synthetic:120", 2, 1
        space = derived_space(
            ROOT / "search_spaces" / "smoke.yaml", tmp, "quick", {"space": {"epochs": 1, "image_size": 32}}
        )
        label = "search_spaces/smoke.yaml with 1 epoch at 32 px"
    elif args.image_size or args.epochs:
        changes = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs)) if v}
        space = derived_space(args.space, tmp, "bench", {"space": changes})
        label = f"{args.space.name} with " + ", ".join(f"{k} {v}" for k, v in changes.items())
    cmd = [
        sys.executable,
        "-m",
        "xray_ray.search",
        "--data",
        args.data,
        "--space",
        str(space),
        "--results",
        str(tmp / "results"),
        "--name",
        "memory",
    ]
    for flag, value in (("--num-samples", args.num_samples), ("--num-cpus", args.num_cpus), ("--cache", args.cache)):
        if value is not None:
            cmd += [flag, str(value)]
    if not args.export:
        cmd.append("--no-export")
    return cmd, label


def watch(args: argparse.Namespace, cmd: list[str], tmp: Path) -> list[dict]:
    """Run the search with its own local Ray, reading its processes' memory every --interval seconds."""
    ray_tmp = tmp / "r"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never a running cluster
    log_path = tmp / "search.log"
    readings, last_pss = [], -np.inf
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            t0 = time.perf_counter()
            with_pss = args.pss_every > 0 and t0 - last_pss >= args.pss_every
            last_pss = t0 if with_pss else last_pss
            readings.append(sample(root, str(ray_tmp), with_pss))
            time.sleep(max(0.0, args.interval - (time.perf_counter() - t0)))
    args.out.mkdir(parents=True, exist_ok=True)
    log_text = log_path.read_text()
    (args.out / "overhead_memory_search.log").write_text(log_text)
    if proc.returncode != 0:
        sys.stderr.write(log_text[-4000:])
        raise SystemExit(f"the search failed (exit {proc.returncode}); its log: {args.out}/overhead_memory_search.log")
    return readings


def summarize(
    args: argparse.Namespace, label: str, samples: pd.DataFrame, after: pd.DataFrame, run: dict, t_start: float
) -> dict:
    """The JSON result: peaks, readings after each trial, growth slopes and the search's overhead."""
    peak = samples.loc[samples["rss_mb"].idxmax()]
    # the last trial ends with the search: its reading catches the processes shutting down, not a trend
    fit = after.iloc[:-1] if len(after) > 2 else after
    k = fit["trials_done"].to_numpy(float) if len(fit) else np.zeros(0)
    overhead = run.get("overhead", {})
    pss_peak = samples["pss_mb"].max()
    result = {
        "benchmark": "overhead_memory",
        "quick": args.quick,
        "machine": machine(),
        "space": label,
        "data": args.data,
        "trials": run.get("trials"),
        "trial_epochs": run.get("trial_epochs"),
        "concurrency": run.get("concurrency"),
        "wall_seconds": run.get("wall_seconds"),
        "interval_s": args.interval,
        "readings": len(samples),
        "peak_rss_mb": float(peak["rss_mb"]),
        "peak_private_mb": float(samples["private_mb"].max()),
        "peak_pss_mb": None if np.isnan(pss_peak) else float(pss_peak),
        "pss_every_s": args.pss_every,
        "peak_processes": int(samples["processes"].max()),
        "at_peak_rss_mb": {r: float(peak[f"rss_{r}_mb"]) for r in ("driver", "ray_core", "workers")},
        "after_trials": [
            {
                "trials_done": int(r["trials_done"]),
                "t_s": round(float(r["t_s"]), 1),
                "processes": int(r["processes"]),
                **{c: round(float(r[c]), 1) for c in GROWTH},
            }
            for r in after.to_dict("records")
        ],
        # the long-lived processes (driver, gcs/raylet) are where a leak would show; workers come and go
        **{f"{c[:-3]}_slope_mb_per_trial": slope(k, fit[c].to_numpy()) if len(fit) else None for c in GROWTH},
        "slope_fitted_over_trials": [int(x) for x in k],
        "overhead": overhead,
        "share_outside": overhead.get("share_outside"),
        "share_outside_busy": overhead.get("share_outside_busy"),
        "files": {
            "samples": str(args.out / "overhead_memory_samples.csv"),
            "search_log": str(args.out / "overhead_memory_search.log"),
        },
        "seconds": time.perf_counter() - t_start,
    }

    return result


def print_result(
    args: argparse.Namespace, label: str, samples: pd.DataFrame, after: pd.DataFrame, result: dict
) -> None:
    peak = samples.loc[samples["rss_mb"].idxmax()]

    def row(what: str, trials: int | None, r) -> list:
        return [
            what,
            float(r["t_s"]),
            trials,
            float(r["rss_mb"]),
            float(r["private_mb"]),
            float(r["rss_driver_mb"]),
            float(r["rss_ray_core_mb"]),
            int(r["processes"]),
        ]

    rows = [row("peak", None, peak)] + [
        row(f"after trial {int(a['trials_done'])}", int(a["trials_done"]), a) for a in after.to_dict("records")
    ]
    print(
        f"\n{label}, data {args.data}: {len(samples)} readings every {args.interval}s of the search's own "
        f"processes (MB; private = RSS less shared pages)"
    )
    print_table(["reading", "t_s", "trials", "rss_mb", "private_mb", "driver_mb", "ray_core_mb", "procs"], rows)
    slopes = ", ".join(f"{c[:-3]} {result[f'{c[:-3]}_slope_mb_per_trial'] or 0:+.1f}" for c in GROWTH)
    print(
        f"peak PSS {result['peak_pss_mb'] if result['peak_pss_mb'] is None else round(result['peak_pss_mb'])} MB "
        f"(read every {args.pss_every:g}s); growth per finished trial (MB, least squares): {slopes}; "
        f"overhead.share_outside = {result['share_outside']}"
    )
    emit(result, args.out, "overhead_memory")


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xrbm", dir="/tmp") as tmp:  # short: Ray's socket paths live in it
        cmd, label = search_command(args, Path(tmp))
        readings = watch(args, cmd, Path(tmp))
        run_dir = Path(tmp) / "results" / "memory"
        run = json.loads((run_dir / "run.json").read_text())
        epochs = pd.read_parquet(run_dir / "epochs.parquet")
    samples = pd.DataFrame(readings)
    samples["t_s"] = samples["t"] - samples["t"].iloc[0]
    samples.to_csv(args.out / "overhead_memory_samples.csv", index=False)
    after = after_each_trial(samples, epochs)
    result = summarize(args, label, samples, after, run, t_start)
    print_result(args, label, samples, after, result)


if __name__ == "__main__":
    sys.exit(main())
