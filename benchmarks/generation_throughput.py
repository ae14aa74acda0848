"""Evaluation's generation speed: batched greedy (``dagtune.evaluation.generate``) vs one example at a time.

    # CPU, the project's tiny models (seconds to minutes):
    PYTHONPATH=$PWD .venv/bin/python benchmarks/generation_throughput.py --device cpu --tiny \\
        --n 48 --n-sequential 48 --out benchmarks/results/generation_throughput_cpu_tiny.json
    # GPU, random-init models of the real shapes (built here with train_throughput's builder):
    python3 benchmarks/generation_throughput.py --device cuda --n 512 --n-sequential 16 \\
        --model-root /tmp/dagtune_models --out $OUT/generation_throughput.json

For each generative model (FunctionGemma-270M on function-calling prompts, Gemma-3-1B on extractor
prompts; synthetic rows rendered by the model's own chat template, as ``prepare_data`` does) it runs
``Generator.generate`` over ``--n`` prompts in batches (``--batch-size``; on CUDA by default chosen from
free memory) and over the first ``--n-sequential`` prompts one at a time (``batch_size=1``: the
one-example-at-a-time ``generate`` baseline), both with the task's stop strings, and writes examples/s
of each, the speed-up, and how many of the sequential rows the batched run reproduced token for token.
Random-init models rarely write a stop string, so most rows run to ``--max-new-tokens``: the worst case
for evaluation. The JSON names the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# model -> (task whose prompts it generates for, tiny model name, train_throughput.MODELS key)
CASES = {
    "functiongemma": ("function_calling", "tiny-functiongemma", "functiongemma-270m"),
    "gemma3": ("extractor", "tiny-gemma3", "gemma-3-1b"),
}


def device_name(device: str) -> str:
    import os

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def model_dir(case: str, args: argparse.Namespace, root: Path) -> str:
    """The tiny model (CPU) or a random-init model of the real shape, built once under ``root``."""
    _task, tiny, real = CASES[case]
    if args.tiny:
        from dagtune.models import resolve_model
        from dagtune.store import ArtifactStore

        return resolve_model(tiny, ArtifactStore(root / "store"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import build_model_dir

    out = root / real
    if not (out / "config.json").is_file():
        build_model_dir(real, out, False, args.device, args.tokenizer_cache)
    return str(out)


def prompts_for(task: str, tokenizer: Any, n: int) -> list[str]:
    from dagtune.data.render import render_extractor, render_function_calling
    from dagtune.data.synthetic import synthetic_extractor, synthetic_function_calling

    if task == "function_calling":
        rows, _ = synthetic_function_calling(n, 0.2, seed=7)
        dev = "You are a model that can do function calling with the following functions"
        return [render_function_calling(tokenizer, r, dev, "No tool fits.")["prompt"] for r in rows]
    return [render_extractor(tokenizer, r)["prompt"] for r in synthetic_extractor(n, seed=7)]


def _timed(fn: Any, device: str) -> tuple[Any, float]:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_case(case: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from dagtune.evaluation.generate import TASK_STOP_STRINGS, Generator

    task = CASES[case][0]
    g = Generator(model_dir(case, args, root), device=args.device)
    try:
        prompts = prompts_for(task, g.tokenizer, args.n)
        stops = TASK_STOP_STRINGS[task]
        g.generate(prompts[:2], 2, 4, stops)  # warm-up: kernels, allocator
        batched, t_b = _timed(
            lambda: g.generate(prompts, args.batch_size, args.max_new_tokens, stops), args.device
        )
        k = min(args.n_sequential, len(prompts))
        seq, t_s = _timed(lambda: g.generate(prompts[:k], 1, args.max_new_tokens, stops), args.device)
        same = sum(
            (a.text, a.new_tokens) == (b.text, b.new_tokens) for a, b in zip(seq, batched[:k], strict=True)
        )
        ex_b, ex_s = len(prompts) / t_b, k / t_s
        return {
            "task": task,
            "model": g.model_path,
            "n_batched": len(prompts),
            "n_sequential": k,
            "batch_size": args.batch_size or "auto",
            "max_new_tokens": args.max_new_tokens,
            "stop_strings": list(stops),
            "batched_s": round(t_b, 3),
            "sequential_s": round(t_s, 3),
            "batched_examples_per_s": round(ex_b, 3),
            "sequential_examples_per_s": round(ex_s, 3),
            "speedup": round(ex_b / ex_s, 2),
            "new_tokens_mean": round(sum(x.new_tokens for x in batched) / len(batched), 1),
            "finished_fraction": round(sum(x.finished for x in batched) / len(batched), 3),
            "sequential_rows_reproduced": f"{same}/{k}",
        }
    finally:
        g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="the project's tiny models (CPU check)")
    ap.add_argument("--models", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--n", type=int, default=512, help="prompts generated in batches")
    ap.add_argument("--n-sequential", type=int, default=16, help="of those, generated one at a time")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, by memory on CUDA")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--model-root", default=None, help="where models are built (default: a temp dir)")
    ap.add_argument("--tokenizer-cache", default=None, help="train_throughput's prebuilt tokenizers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_throughput.json"))
    args = ap.parse_args()
    if args.device == "cpu" and args.batch_size is None:
        args.batch_size = 16
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.model_root or tempfile.mkdtemp(prefix="dagtune_gen_"))
    doc: dict[str, Any] = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tiny": args.tiny,
        "results": {},
    }
    for case in [m.strip() for m in args.models.split(",") if m.strip()]:
        doc["results"][case] = run_case(case, args, root)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        print(case, json.dumps(doc["results"][case]), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
