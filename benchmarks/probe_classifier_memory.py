"""Where the classifier node's extra GPU memory goes (issue 8's "no more peak memory" target).

The node (`LastTokenClassifier` on the decoder body) peaked above the raw Unsloth causal-LM loop on
Phi-4-mini although it skips the 200k-vocabulary head. This probe loads the model once the way the
node does (`dagtune.runtime.Runtime.load_lora`, Unsloth, LoRA r=32 on all linear layers) and
measures peak memory over the loaded baseline of one forward+backward in each way of calling it:

  lm          peft_model(input_ids, attention_mask, labels)   (the raw Unsloth loop's call)
  body        the node's LastTokenClassifier on decoder_of(peft_model), under the node's autocast
  body_noac   the same without autocast

    # GPU machine (source scripts/gpu_unpack.sh; a model dir from benchmarks/train_throughput.py --_build)
    python3 benchmarks/probe_classifier_memory.py --model-dir /tmp/models/phi-4-mini --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--modes", default="lm,body,body_noac,lm")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from dagtune.runtime import unsloth_module

    unsloth_module()  # before transformers
    from dagtune.config import RuntimeConfig, TrainClassifierConfig
    from dagtune.runtime import Runtime
    from dagtune.store import ArtifactStore
    from dagtune.training import classifier as K

    sec = TrainClassifierConfig.model_validate(
        {
            "model": {"name": args.model_dir, "load_in_4bit": args.load_in_4bit, "max_seq_length": args.seq},
            # Phi-3's fused projections, as benchmarks/train_throughput.py targets them
            "lora": {
                "r": 32,
                "alpha": 64,
                "dropout": 0.0,
                "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            },
            "gradient_checkpointing": True,
        }
    )
    rt = Runtime.decide(RuntimeConfig(device="cuda", backend="unsloth"), sec.model)
    loaded = rt.load_lora(
        sec, ArtifactStore(Path("/tmp/probe-store")), loader="FastLanguageModel", task_type=None
    )
    peft_model = loaded.model
    hidden = peft_model.get_base_model().config.get_text_config().hidden_size
    clf = K.LastTokenClassifier(K.decoder_of(peft_model), hidden, 2)
    clf.head.to("cuda")
    clf.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 3000, (args.batch, args.seq), generator=g).cuda()
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (args.batch,), generator=g).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    big = sorted(
        ((p.numel() * p.element_size(), n, str(p.dtype)) for n, p in peft_model.named_parameters()),
        reverse=True,
    )[:5]
    res = {
        "model_dir": args.model_dir,
        "device": torch.cuda.get_device_name(),
        "batch": args.batch,
        "seq": args.seq,
        "load_in_4bit": args.load_in_4bit,
        "dtype": str(rt.dtype),
        "baseline_allocated_gib": round(base / GIB, 3),
        "largest_params": [(n, dt, round(b / GIB, 3)) for b, n, dt in big],
        "checkpointing": {
            "base_is_gradient_checkpointing": bool(
                getattr(peft_model.get_base_model(), "is_gradient_checkpointing", None)
            ),
            "body_gradient_checkpointing": bool(
                getattr(K.decoder_of(peft_model), "gradient_checkpointing", None)
            ),
            "body_forward": getattr(type(K.decoder_of(peft_model)).forward, "__qualname__", "?"),
            "body_forward_module": getattr(type(K.decoder_of(peft_model)).forward, "__module__", "?"),
        },
        "runs": [],
    }
    for mode in args.modes.split(","):
        peft_model.zero_grad(set_to_none=True)
        clf.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        ac = torch.autocast("cuda", dtype=loaded.dtype) if mode == "body" else contextlib.nullcontext()
        with ac:
            if mode == "lm":
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
            else:
                loss = F.cross_entropy(clf(ids, mask).float(), y)
        fwd_peak = torch.cuda.max_memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        r = {
            "mode": mode,
            "seconds": round(time.perf_counter() - t0, 3),
            "start_over_base_gib": round((start - base) / GIB, 3),
            "forward_peak_over_base_gib": round((fwd_peak - base) / GIB, 3),
            "peak_over_base_gib": round((torch.cuda.max_memory_allocated() - base) / GIB, 3),
            "after_backward_over_base_gib": round((torch.cuda.memory_allocated() - base) / GIB, 3),
            "loss": float(loss),
        }
        del loss
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))


if __name__ == "__main__":
    main()
