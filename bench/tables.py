"""The issue-14 tables of docs/results.md, from the runs their commands made:
``python -m bench.tables {adapt,transfer,lora,ssl,wise} [RUNS_DIR]`` prints one as Markdown (the
final val top-1, mean ± std over the finished seeds, each seed, extra scores from the last
epoch's metrics line, seconds per run). The distillation table is bench/distill_table.py.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.distill_table import finished

# (label, run name without -s<seed>); the metric columns each table adds after the seeds
TABLES: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "adapt": (
        [
            ("source only", "c10-adapt-source"),
            ("AdaBN (no training)", "c10-adapt-adabn"),
            ("pseudo-labelling (≥ 0.95, per-domain BN)", "c10-adapt-pseudo"),
            ("DANN (per-domain BN)", "c10-adapt-dann"),
            ("MCC (T 2.5, weight 1)", "c10-adapt-mcc"),
            ("CDAN+E (weight 1)", "c10-adapt-cdan"),
            ("SHOT, **source-free**", "c10-adapt-shot"),
            ("Tent offline, **source-free**", "c10-adapt-tent"),
            ("Tent online, **source-free**, scored while adapting", "c10-adapt-tent-online"),
        ],
        [
            ("clean test top-1 per seed", "source_val_top1"),
            ("test top-1 after the pass", "adapted_val_top1"),
        ],
    ),
    "transfer": (
        [
            ("fine-tune all (transfer.yaml)", "cifar5-transfer"),
            ("linear probe (backbone frozen)", "cifar5-probe"),
            ("LP-FT (10 epochs probe, then 10 all)", "cifar5-lpft"),
            ("L2-SP (α 0.01, β 0.01)", "cifar5-l2sp"),
        ],
        [],
    ),
    "lora": (
        [
            ("LoRA rank 8 (5% of the parameters train)", "cifar5-lora"),
            ("fine-tune all", "cifar5-vit-ft"),
            ("linear probe", "cifar5-vit-probe"),
        ],
        [],
    ),
    "ssl": (
        [
            ("SimCLR, fine-tuned", "c10-ssl-finetune"),
            ("BYOL, fine-tuned", "c10-byol-finetune"),
            ("SimSiam, fine-tuned", "c10-simsiam-finetune"),
            ("SimCLR, linear probe", "c10-ssl-probe"),
            ("BYOL, linear probe", "c10-byol-probe"),
            ("SimSiam, linear probe", "c10-simsiam-probe"),
            ("scratch", "c10-ssl-scratch"),
        ],
        [],
    ),
}


def last_metrics(run_dir: Path) -> dict:
    """The last line of a run's metrics.jsonl (the final epoch's scores)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def table(which: str, runs: Path) -> str:
    rows, extras = TABLES[which]
    head = ["run", "test top-1 (%), mean ± std", "per seed (0, 1)"] + [e[0] for e in extras]
    lines = ["| " + " | ".join(head + ["s per run"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for label, name in rows:
        done = finished(runs, name)
        if not done:
            lines.append(f"| {label} | not run yet |" + " |" * (len(head) - 1))
            continue
        seeds = sorted(done)
        top1 = [done[s]["final_val_top1"] for s in seeds]
        spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else " (one seed)"
        cells = [label, f"{statistics.mean(top1):.2f}{spread}", ", ".join(f"{v:.2f}" for v in top1)]
        for _, key in extras:
            vals = [last_metrics(Path(done[s]["run_dir"])).get(key) for s in seeds]
            cells.append(", ".join(f"{v:.2f}" for v in vals if v is not None) or "–")
        cells.append(", ".join(f"{done[s]['wall_time_s']:.0f}" for s in seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wise_table(runs: Path, name: str = "cifar5-transfer") -> str:
    """WiSE-FT: test top-1 per alpha (mean ± std over seeds) from ``NAME-s<seed>-wise``."""
    per_alpha: dict[float, list[float]] = {}
    for path in sorted(runs.glob(f"{name}-s*-wise/summary.json")):
        for row in json.loads(path.read_text())["wise"]["alphas"]:
            per_alpha.setdefault(row["alpha"], []).append(row["val_top1"])
    lines = ["| α | test top-1 (%), mean ± std | per seed |", "| --- | --- | --- |"]
    for alpha, vals in sorted(per_alpha.items()):
        spread = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        per = ", ".join(f"{v:.2f}" for v in vals)
        lines.append(f"| {alpha:g} | {statistics.mean(vals):.2f}{spread} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "adapt"
    runs = Path(sys.argv[2] if len(sys.argv) > 2 else "runs")
    print(wise_table(runs) if which == "wise" else table(which, runs))
