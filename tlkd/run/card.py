"""The model card: README.md in a finished run directory, saying what the model is, what it
was trained on, how well it does, the command that made it and how to load it without tlkd."""

from __future__ import annotations

import json
import shlex
from contextvars import ContextVar
from typing import Any

# The command line of this process, set by the CLI (``tlkd finetune cfg.yaml k=v``) and
# recorded in summary.json at a run's first start; None when tlkd runs from Python.
COMMAND: ContextVar[str | None] = ContextVar("tlkd_command", default=None)
README = "README.md"


def command_line(*parts: str | None) -> str:
    """``tlkd ...`` as a shell would need it typed (quoted where needed)."""
    return shlex.join(["tlkd", *(p for p in parts if p)])


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}%"


def _fence(lang: str, body: str) -> list[str]:
    return ["```" + lang, body, "```", ""]


def model_card(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """README.md of a run from its summary.json and saved config (plain dicts)."""
    model, data = config.get("model", {}), config.get("data", {})
    resolved = config.get("resolved", {})
    name, classes = summary["model"], summary.get("classes", [])
    run_dir = summary["run_dir"]
    teachers = config.get("teachers") or ([config["teacher"]] if config.get("teacher") else [])
    lines = [f"# {summary['experiment']}", ""]
    lines += [
        f"A `{name}` image classifier for {len(classes)} classes, made by `tlkd {summary['mode']}` "
        f"(tlkd {summary.get('versions', {}).get('tlkd', '?')}). Status: {summary['status']}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| model | `{name}` (timm), {summary.get('params', 0):,} parameters |",
        f"| started from | {summary.get('weights_source', '–')} |",
    ]
    for t in teachers:
        lines.append(f"| teacher | `{t.get('name')}` ({t.get('pretrained')}) |")
    train_where = data.get("train") or data.get("dataset", "–")
    lines += [
        f"| data | {train_where}: {summary.get('train_images', 0):,} training images |",
        f"| val data | {data.get('val') or 'held out from the training data'}: "
        f"{summary.get('val_images', 0):,} images |",
        f"| classes | {', '.join(str(c) for c in classes)} |",
        f"| epochs | {summary.get('epochs_done', 0)} of {config.get('train', {}).get('epochs')} |",
        f"| best val top-1 | {_pct(summary.get('best_val_top1'))} "
        f"(epoch {summary.get('best_epoch', '–')}; the weights in model.safetensors) |",
        f"| final val top-1 / top-5 | {_pct(summary.get('final_val_top1'))} / "
        f"{_pct(summary.get('final_val_top5'))} |",
        f"| wall time | {summary.get('wall_time_s', 0):.0f} s on {summary.get('device', '?')}, "
        f"precision {summary.get('precision', '?')} |",
        "",
        "## How it was made",
        "",
    ]
    if summary.get("command"):
        lines += ["The command:", "", *_fence("console", summary["command"])]
    if summary.get("reproduce"):
        lines += ["Made again by:", "", *_fence("console", summary["reproduce"])]
    else:
        lines += [
            "The saved config (every default filled in, with the values tlkd chose under "
            "`resolved:`) runs it again, into a new run directory:",
            "",
            *_fence("console", command_line(summary["mode"], f"{run_dir}/config.yaml")),
        ]
    lines += ["## Use it", ""]

    def used(key: str) -> Any:  # the value the run used: given, else chosen by tlkd
        value = data.get(key)
        return value if value is not None else resolved.get(f"data.{key}")

    size, interpolation, crop = used("image_size"), used("interpolation"), used("crop_pct")
    mean, std = summary.get("input_mean"), summary.get("input_std")
    norm = f", normalised with mean {mean} and std {std}" if mean and std else ""
    lines += [
        f"Input: RGB images resized and centre-cropped to {size} px (crop_pct {crop}, "
        f"{interpolation} interpolation){norm}; outputs are "
        f"logits over the classes in the order above. With tlkd:",
        "",
        *_fence(
            "console",
            f"{command_line('evaluate', run_dir)}\n{command_line('export', run_dir)}",
        ),
    ]
    kwargs = dict(model.get("kwargs") or {})
    if model.get("head"):
        lines += [
            "The classifier is a new MLP head (`model.head`), which timm cannot build by "
            f"itself: load the weights with tlkd (`model.pretrained: {run_dir}` in any config).",
            "",
        ]
    else:
        args = ", ".join(
            [json.dumps(name), f"num_classes={len(classes)}"]
            + [f"{k}={v!r}" for k, v in kwargs.items()]
        )
        registered = _registered_by_tlkd(name.split(".")[0])
        lines += [
            "In plain timm (the file holds timm's own parameter names"
            + (", LoRA adapters merged in" if model.get("lora") else "")
            + "):",
            "",
            *_fence(
                "python",
                "import timm\n"
                + ("import tlkd.models  # adds tlkd's CIFAR models to timm\n" if registered else "")
                + "from safetensors.torch import load_file\n\n"
                + f"model = timm.create_model({args})\n"
                + f'model.load_state_dict(load_file("{run_dir}/model.safetensors"))\n'
                + "model.eval()",
            ),
        ]
    return "\n".join(lines).rstrip() + "\n"


def _registered_by_tlkd(name: str) -> bool:
    """Whether ``name`` is one of the models tlkd adds to timm's registry (plain timm needs
    ``import tlkd.models`` for it)."""
    import timm.models

    try:
        return timm.models.model_entrypoint(name).__module__.startswith("tlkd.")
    except (RuntimeError, KeyError):
        return False
