"""The CIFAR-10 distillation table of docs/results.md, from the runs bench/cifar10_distill.sh
made: ``python -m bench.distill_table [RUNS_DIR]`` prints it as Markdown (test top-1 mean ± std
over the finished seeds, each seed, the gain over the student alone, seconds per run).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROWS = [  # (label, run name without -s<seed>)
    ("resnet20 alone (labels only)", "c10-resnet20-alone"),
    ("kd (T 4, 0.9 kd + 0.1 ce)", "c10-resnet20-kd"),
    ("hard (0.5 teacher's top class + 0.5 ce)", "c10-resnet20-hard"),
    ("fitnet (100 × hint at stage 2, ConvReg) + ce", "c10-resnet20-fitnet"),
    ("at (1000 × attention, 3 stages summed) + ce", "c10-resnet20-at"),
    ("dkd (α 1, β 8, T 4, 2-epoch warm-up) + ce", "c10-resnet20-dkd"),
    ("dist (β 2, γ 2, T 4) + ce", "c10-resnet20-dist"),
    ("kd + logit standardization (T 2, × 9) + 0.1 ce", "c10-resnet20-kd-ls"),
    ("dkd + logit standardization (α 9, β 72, T 2) + ce", "c10-resnet20-dkd-ls"),
    ("rkd (25 × distance + 50 × angle) + ce", "c10-resnet20-rkd"),
    ("pkt (30000 ×) + ce", "c10-resnet20-pkt"),
    ("sp (3000 ×) + ce", "c10-resnet20-sp"),
    ("crd (0.8 ×, 16384 negatives) + ce", "c10-resnet20-crd"),
    ("reviewkd (0.6 ×, 2-epoch warm-up) + ce", "c10-resnet20-reviewkd"),
    ("function matching (kd T 1 on mixup, no labels)", "c10-resnet20-fm"),
    ("small ViT alone (labels only)", "c10-vit-alone"),
    ("small ViT, DeiT hard token distillation + ce", "c10-vit-token"),
]


def finished(runs: Path, name: str) -> dict[int, dict]:
    """Seed -> summary of the finished runs ``name-s<seed>``."""
    out = {}
    for path in sorted(runs.glob(f"{name}-s*/summary.json")):
        seed = path.parent.name.rsplit("-s", 1)[1]
        summary = json.loads(path.read_text())
        if seed.isdigit() and summary.get("status") == "finished":
            out[int(seed)] = summary
    return out


def table(runs: Path) -> str:
    lines = [
        "| student | test top-1 (%), mean ± std | per seed (0, 1) | vs alone | s per run |",
        "| --- | --- | --- | --- | --- |",
    ]
    base: dict[str, float] = {}
    for label, name in ROWS:
        done = finished(runs, name)
        if not done:
            lines.append(f"| {label} | not run yet | | | |")
            continue
        top1 = [done[s]["final_val_top1"] for s in sorted(done)]
        mean = statistics.mean(top1)
        spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else " (one seed)"
        if name.endswith("alone"):
            base[name.split("-")[1]] = mean
        ref = base.get(name.split("-")[1])
        gain = f"{mean - ref:+.2f}" if ref is not None and not name.endswith("alone") else ""
        seeds = ", ".join(f"{v:.2f}" for v in top1) + ("" if len(top1) > 1 else ", –")
        times = ", ".join(f"{done[s]['wall_time_s']:.0f}" for s in sorted(done))
        lines.append(f"| {label} | {mean:.2f}{spread} | {seeds} | {gain} | {times} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs")))
