"""The classifier node's training step alone in a fresh process (GPU): step times and the garbage
collector's seconds per step, for a model directory built by train_throughput.py's ``--_build``.

    python3 benchmarks/train_throughput.py --_build phi-4-mini /tmp/m/phi-4-mini --device cuda \
        --tokenizer-cache .bench_tokenizers
    python3 benchmarks/classifier_node_alone.py /tmp/m/phi-4-mini

train_throughput.py's ``--share-process`` runs several cases in one process; this is the control that
tells a step-time outlier of the node from one the earlier cases of that process left behind
(results/classifier_node_alone_h200_phi-4-mini.json).
"""

from __future__ import annotations

import json
import sys

import node_hooks


def main() -> None:
    r = node_hooks.classifier_train_steps(
        sys.argv[1], batch_size=8, seq_len=1024, gradient_checkpointing=True, load_in_4bit=False,
        lora_r=32, lora_alpha=64, lora_dropout=0.0,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], warmup_steps=3, timed_steps=8,
    )  # fmt: skip
    print(json.dumps({
        "step_s": [round(x, 3) for x in r["step_times_s"]],
        "gc_s": r["gc_s_per_step"],
        "tok_s": round(r["tokens"] / sum(r["step_times_s"]), 1),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
