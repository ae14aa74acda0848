"""Print the README's Performance tables from the committed GPU results (benchmarks/results/*.json).

    .venv/bin/python benchmarks/summarize_gpu.py

Throughput: per case and device, each implementation's tokens/s and its peak memory *over the
baseline* (what an earlier case of the same process left allocated: the cases of one
``--share-process`` run follow each other, so the absolute peak of the second includes the first's
model), and the node / raw Unsloth ratios the issue's target is about (>= 0.95x tokens/s at no more
memory). Epoch: the reference recipe vs packing on the real length distributions.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def throughput_rows() -> list[dict]:
    rows = []
    for f in sorted(RESULTS.glob("train_throughput_*.json")):
        doc = json.loads(f.read_text())
        for r in doc.get("results", []):
            if r.get("status") != "ok":
                continue
            over = r.get("peak_over_baseline_gib", r.get("peak_allocated_gib"))
            rows.append({**r, "file": f.name, "over": over})
    return rows


def throughput_table() -> str:
    rows = throughput_rows()
    cases: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in rows:
        # one row per case and run (result file): ratios only between implementations of one run
        cases.setdefault((r["key"], r["device"], r["file"]), {})[r["impl"]] = r
    out = [
        "| case | GPU (results file) | node tok/s | raw Unsloth tok/s | raw Unsloth, head | plain HF tok/s "
        "| plain HF, head | node / raw Unsloth (like for like) | peak GiB node / Unsloth / HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (key, dev, file), impls in sorted(cases.items()):
        n, u, h = impls.get("node"), impls.get("unsloth"), impls.get("hf")
        uh, hh = impls.get("unsloth_head"), impls.get("hf_head")

        def tok(r):
            return f"{r['tokens_per_s']:,.0f}" if r else "-"

        def mem(r):
            return f"{r['over']:.2f}" if r else "-"

        # The node of Phi-4-mini is the classifier: its like-for-like raw loop is the one on the same
        # objective (unsloth_head) where it ran; otherwise the causal-LM loop.
        base = uh or u
        ratio = "-"
        if n and base:
            ratio = f"{n['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            med = base["step_s_median"] / n["step_s_median"]
            if abs(med - n["tokens_per_s"] / base["tokens_per_s"]) > 0.05:
                ratio += f" ({med:.2f}x by median step)"
        gpu = dev.replace("NVIDIA ", "").replace(" 80GB HBM3", "")
        out.append(
            f"| {key.replace('|', ' · ')} | {gpu} ({file.removeprefix('train_throughput_')}) | {tok(n)} "
            f"| {tok(u)} | {tok(uh)} | {tok(h)} | {tok(hh)} | {ratio} | {mem(n)} / {mem(base)} / {mem(h)} |"
        )
    return "\n".join(out)


def epoch_table() -> str:
    out = [
        "| model | lengths (mean tokens, pad waste at 8) | reference epoch s | packed epoch s | speed-up | peak GiB ref / packed |",
        "|---|---|---|---|---|---|",
    ]
    for f in sorted(RESULTS.glob("epoch_real_lengths_*.json")):
        doc = json.loads(f.read_text())
        for run in doc["runs"]:
            res = {r["variant"].rstrip("0123456789k") or r["variant"]: r for r in run["results"]}
            ref, packed = res.get("reference"), res.get("packed")
            if not (ref and packed):
                continue
            s = run["distribution_summary"]
            out.append(
                f"| {doc['model']} ({doc['device'].split(',')[0].replace('NVIDIA ', '')}) | {run['distribution']} "
                f"({s['tokens_mean']:.0f}, {s['pad_waste_b8_tokens']:.0%}) | {ref['epoch_s']:.1f} | {packed['epoch_s']:.1f} "
                f"| {ref['epoch_s'] / packed['epoch_s']:.2f}x | {ref['peak_allocated_gib']:.2f} / {packed['peak_allocated_gib']:.2f} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    print(throughput_table())
    print()
    print(epoch_table())
