"""Per-node phases of a real-size pipeline run, read from its log (``pipeline_real_size.py``'s
``<out>.cold.log``: the ``dagtune run`` stderr) when the benchmark's own JSON was not written (the run was
stopped by the device's time limit before the flow finished).

    python benchmarks/real_size_from_log.py RUN.cold.log --device "NVIDIA H200" --out RESULT.json

What it reads: dagtune's node lines (``computing``, ``training slot acquired at``, ``ran in``), the
training line (``train_X: N examples, S steps``), the Trainer's progress bar (elapsed at step 1 and 2)
and its final ``train_runtime`` / ``num_input_tokens_seen``. Per training node:

- ``load_s``: slot acquired -> the training line (model load, LoRA, datasets);
- ``first_step_s`` / ``first_two_steps_s``: the progress bar's elapsed time at steps 1 and 2 (kernel
  compilation and autotuning happen there);
- ``steady_s`` = train_runtime - first_two_steps_s, and ``steady_tokens_per_s`` = the tokens of the
  other steps (tokens seen x (S-2)/S) over it;
- ``merge_save_s``: end of training -> the node's ``ran`` line (merge, save, manifest).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
NODE = re.compile(TS + r" dagtune INFO node (\w+): (computing|training slot acquired|ran in ([\d.]+)s)")
TRAIN = re.compile(TS + r" dagtune INFO (train_\w+): (\d+) examples, (\d+) steps")
RUNTIME = re.compile(r"\{'train_runtime': '([\d.]+)'.*?'num_input_tokens_seen': (\d+)\}")
BAR = re.compile(r"\b(\d+)/(\d+) \[(\d+):(\d\d)<")


def _t(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _bar_elapsed(text: str, step: int, steps: int) -> float | None:
    for m in BAR.finditer(text):
        if int(m.group(1)) == step and int(m.group(2)) == steps:
            return int(m.group(3)) * 60 + int(m.group(4))
    return None


def _training(node: dict[str, Any], section: str, steps: int, start: float, tail: str) -> None:
    """Fill a training node's phases from the log text that follows its training line."""
    rt = RUNTIME.search(tail)
    node.update(steps=steps, load_s=round(start - node["slot_at"], 1) if "slot_at" in node else None)
    node["first_step_s"] = _bar_elapsed(section, 1, steps)
    node["first_two_steps_s"] = _bar_elapsed(section, 2, steps)
    if rt is None:
        return
    runtime, tokens = float(rt.group(1)), int(rt.group(2))
    node.update(train_runtime_s=runtime, tokens_seen=tokens, train_end_at=start + runtime)
    two = node["first_two_steps_s"]
    if two is not None and steps > 2 and runtime > two:
        node["steady_s"] = round(runtime - two, 1)
        node["steady_tokens_per_s"] = round(tokens * (steps - 2) / steps / (runtime - two))


def parse(text: str) -> dict[str, dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for m in NODE.finditer(text):
        n = nodes.setdefault(m.group(2), {"name": m.group(2)})
        at = _t(m.group(1))
        if m.group(3) == "computing":
            n["computing_at"] = at
        elif m.group(3) == "training slot acquired":
            n["slot_at"] = at
        else:
            n["done_at"] = at
            n["reported_s"] = float(m.group(4))
    trains = list(TRAIN.finditer(text))
    for i, m in enumerate(trains):
        end = trains[i + 1].start() if i + 1 < len(trains) else len(text)
        n = nodes.setdefault(m.group(2), {"name": m.group(2)})
        _training(n, text[m.end() : end], int(m.group(4)), _t(m.group(1)), text[m.end() :])
    for n in nodes.values():
        began = n.get("slot_at", n.get("computing_at"))
        if "done_at" in n and began is not None:
            n["wall_s"] = round(n["done_at"] - began, 1)  # the node's own time, without its slot wait
        if "done_at" in n and "train_end_at" in n:
            n["merge_save_s"] = round(n["done_at"] - n["train_end_at"], 1)
        n["status"] = "ran" if "done_at" in n else "not finished"
    return nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--device", required=True, help="the machine the run was on (the log does not say)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    nodes = parse(Path(args.log).read_text(errors="replace"))
    doc = {"device": args.device, "source": Path(args.log).name, "note": args.note, "nodes": nodes}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for n in nodes.values():
        keys = ("status", "wall_s", "load_s", "first_step_s", "first_two_steps_s", "steady_s",
                "steady_tokens_per_s", "merge_save_s")  # fmt: skip
        print(n["name"], {k: n.get(k) for k in keys if n.get(k) is not None})


if __name__ == "__main__":
    main()
