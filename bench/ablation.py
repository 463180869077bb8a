"""The central claim as an ablation: s3 from the same s2 state with and without the per-layer English loss.

    python bench/ablation.py --run-dir runs/default          # a run whose s2 finished (bash run.sh makes one)
    python bench/ablation.py --run-dir runs/default --max-steps 20

Each variant copies the run up to s2 into OUT/VARIANT and runs stages/s3_korean.py there with the same seed and
data order, so they differ only in the per-layer loss: none (--layer-weight 0), mse and kl. The guard's recovery
rounds are off (--guard-rounds 0), so what is measured is the training itself. For each variant it prints the
Korean held-out loss, the English held-out loss and the English drift (KL from the teacher, nats per token), each
a mean over held-out texts with a 95% bootstrap interval, the Korean loss change from s2 and each variant's drift
minus the drift without the per-layer loss (both paired over the same texts), with their intervals.
The claim holds when drift with the per-layer loss sits clearly below drift without it at a comparable Korean loss.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shared_logic as sl  # noqa: E402
from engine.stats import bootstrap_difference, bootstrap_mean  # noqa: E402

VARIANTS = {"none": ["--layer-weight", "0"], "mse": ["--layer-loss", "mse"], "kl": ["--layer-loss", "kl"]}


def interval(values: list[float]) -> str:
    low, high = bootstrap_mean(values)
    return f"{sum(values) / len(values):.4f} [{low:.4f}, {high:.4f}]"


def change(d: dict[str, float]) -> str:
    return f"{d['change']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="a run whose s2 finished")
    parser.add_argument("--out", type=Path, default=None, help="where the variants run (default RUN_DIR/ablation)")
    parser.add_argument("--variants", default="none,mse,kl", help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--keep", action="store_true", help="reuse variants whose s3 already finished in OUT "
                        "(e.g. variants run one per process)")
    args, stage_args = parser.parse_known_args(argv)  # anything else goes to s3 (--max-steps, --device, ...)
    if sl.stage_meta(args.run_dir, "s2") is None:
        print(f"ablation: {args.run_dir} has no finished s2; run bash run.sh (or stages up to s2) first",
              file=sys.stderr)
        return 1
    out = args.out or args.run_dir / "ablation"
    keep = [s.directory for s in sl.STAGE_TABLE[:sl.STAGE_TABLE.index(sl.STAGES["s3"])]]
    s2 = sl.stage_meta(args.run_dir, "s2")["after"]
    rows, afters = [], {}
    for name in args.variants.split(","):
        run_dir = out / name
        done = run_dir / "s3_korean" / "meta.json"
        if not (args.keep and done.is_file()):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            for directory in keep:
                if (args.run_dir / directory).is_dir():
                    shutil.copytree(args.run_dir / directory, run_dir / directory)
            cmd = [sys.executable, str(ROOT / "stages" / "s3_korean.py"), "--run-dir", str(run_dir), "--guard-rounds",
                   "0", *VARIANTS[name], *stage_args]
            subprocess.run(cmd, check=False)  # a guard that fails still leaves its meta.json to read
        after = afters[name] = json.loads(done.read_text())["after"]
        ko = bootstrap_difference(s2["ko_losses"], after["ko_losses"])
        # Drift against the variant without the per-layer loss, paired over the same held-out texts.
        drift = bootstrap_difference(afters["none"]["drifts"], after["drifts"]) if "none" in afters else None
        rows.append((name, interval(after["ko_losses"]), change(ko), interval(after["en_losses"]),
                     interval(after["drifts"]), change(drift) if drift and name != "none" else "–"))
    header = ("per-layer loss", "Korean held-out loss", "change from s2", "English held-out loss", "English drift",
              "drift minus none's")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
