"""One epoch on the real length distribution: the reference recipe (micro-batch 8 padded to the longest,
gradient accumulation 4, no packing) vs the SFT node's padding-free packing, at the same 32 examples per
optimizer step, through the node's own trainer (``benchmarks/node_hooks.run_rows``: Runtime.load_lora,
build_trainer, log_callback).

    # 1. here (CPU, needs ../shared): the length distributions, from the project's own data code
    .venv/bin/python benchmarks/epoch_real_lengths.py --build-lengths benchmarks/results/real_lengths.json
    # 2. on the GPU machine (model dirs as benchmarks/train_throughput.py builds them):
    export PYTHONPATH=$PWD/.gpu_site:$PWD/.gpu_pytest:$PWD HF_HUB_OFFLINE=1
    python3 benchmarks/epoch_real_lengths.py --model functiongemma-270m --out $OUT/epoch_real_lengths.json
    # a CPU check of the harness (tiny shapes, hf backend, a few dozen examples):
    .venv/bin/python benchmarks/epoch_real_lengths.py --tiny --device cpu --backend hf --examples 64

Lengths. ``--build-lengths`` renders the shared Arabic Mobile Actions sample
(``../shared/data/external/arabic_mobile_actions_sample/test_sample.jsonl``, 100 rows) exactly as
prepare_data does (parse, distractor tools as pipeline_config.yaml sets them, FunctionGemma's chat
template with the tool declarations) and counts prompt and completion tokens with the project's tiny
FunctionGemma tokenizer (``dagtune.models`` tiny-functiongemma: the real chat template, a BPE vocabulary
trained locally). Those counts APPROXIMATE the real 262k-vocabulary Gemma tokenizer's (not available
offline); the UTF-8 byte length of every rendering is stored too as a tokenizer-independent proxy (the
ratio tokens/bytes is the one free parameter; the padding waste and the packing gain depend on the
shape of the distribution, which both give alike). Two renderings are kept: ``with_distractors`` (the
pipeline's: each example also declares ``distractor_tools`` other tools) and ``own_tools`` (only the
tools the sample row declares). Extractor and classifier lengths come from their formats (the
synthetic generators rendered with the tiny Gemma-3 / Phi-3 templates). The timed set resamples one
distribution with replacement to ``--examples`` (2,048 by default: 64 optimizer steps of 32).

Rows are token ids of those lengths with the node's real structure (``<bos>``, the user turn marker,
filler, end of turn, the model turn marker; completion filler ending with ``<end_of_turn>``), so the
unpacked path's ``train_on_responses_only`` and the packed path's completion mask label the same tokens.
Each variant first trains a 3-step warm-up (its own trainer over the same loaded model: compilation and
autotuning for its shapes are not timed), then one timed epoch. Tokens per second count real (non-pad)
tokens. No checkpoints are written in either.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared/data/external/arabic_mobile_actions_sample/test_sample.jsonl"
LENGTHS = ROOT / "benchmarks/results/real_lengths.json"
GIB = 1024**3

# model (train_throughput.MODELS key) -> (pipeline section, length distribution)
MODEL_TASK = {
    "functiongemma-270m": ("train_function_calling", "function_calling"),
    "gemma-3-1b": ("train_extractor", "extractor"),
}


# ---------------------------------------------------------------------------------------------
# lengths (CPU, from the project's data code)
# ---------------------------------------------------------------------------------------------
def _render(task: str, pd_cfg, store) -> list[dict]:
    from dagtune.data.node import render_task, split_task

    prepared = split_task(task, pd_cfg, ROOT)
    frames, _ = render_task(task, pd_cfg, prepared, store)
    out = []
    for df in frames.values():
        for p, n, text in zip(df["n_prompt_tokens"], df["n_tokens"], df["text"], strict=True):
            out.append({"prompt": int(p), "completion": int(n) - int(p), "bytes": len(text.encode())})
    return out


def _summary(rows: list[dict], batch: int = 8, seed: int = 0) -> dict:
    n = [r["prompt"] + r["completion"] for r in rows]
    b = [r["bytes"] for r in rows]
    return {
        "examples": len(rows),
        "tokens_mean": round(statistics.mean(n), 1),
        "tokens_min": min(n),
        "tokens_max": max(n),
        "completion_tokens_mean": round(statistics.mean(r["completion"] for r in rows), 1),
        "bytes_mean": round(statistics.mean(b), 1),
        "bytes_per_token": round(sum(b) / sum(n), 3),
        "pad_waste_b8_tokens": round(pad_waste(n, batch, seed), 4),
        "pad_waste_b8_bytes": round(pad_waste(b, batch, seed), 4),
    }


def pad_waste(lengths: list[int], batch: int, seed: int, draws: int = 4000) -> float:
    """Expected share of padding when random batches of ``batch`` are padded to their longest."""
    rng = random.Random(seed)
    pad = tot = 0
    for _ in range(draws):
        s = rng.choices(lengths, k=batch)
        pad += batch * max(s) - sum(s)
        tot += batch * max(s)
    return pad / tot


def real_config():
    """pipeline_config.yaml's top level: the real (GPU) setup, without the default (tiny) profile."""
    from dagtune.config import PipelineConfig, read_raw

    raw, p = read_raw(None)
    raw.pop("profiles", None)
    raw.pop("default_profile", None)
    raw.update(profile="", config_dir=str(p.parent))
    return PipelineConfig.model_validate(raw)


def build_lengths(out: Path, n_synthetic: int) -> dict:
    from dagtune.store import ArtifactStore

    if not SAMPLE.is_file():
        raise SystemExit(f"{SAMPLE} not found (the shared sample lives beside the checkout)")
    cfg = real_config()  # the real (GPU) configuration: its distractor_tools and templates
    store = ArtifactStore(tempfile.mkdtemp(prefix="dagtune-lengths-"))
    base = cfg.prepare_data.model_dump()
    base["tokenizers"] = {
        "function_calling": "tiny-functiongemma",
        "extractor": "tiny-gemma3",
        "classifier": "tiny-phi3",
    }
    k = base["function_calling"]["distractor_tools"]
    doc: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sample": str(SAMPLE.relative_to(ROOT.parent)),
        "tokenizer_note": "token counts from the project's tiny tokenizers (real chat templates, "
        "locally trained vocabularies): an approximation of the real tokenizers; "
        "'bytes' is the UTF-8 length of each rendering, a tokenizer-independent proxy",
        "distributions": {},
    }
    for name, kk in (("with_distractors", k), ("own_tools", 0)):
        d = json.loads(json.dumps(base))
        d["function_calling"]["source"] = {"kind": "file", "path": str(SAMPLE), "format": "mobile_actions"}
        d["function_calling"]["distractor_tools"] = kk
        rows = _render("function_calling", type(cfg.prepare_data).model_validate(d), store)
        doc["distributions"][f"function_calling/{name}"] = {
            "distractor_tools": kk,
            "summary": _summary(rows),
            "rows": rows,
        }
    for task in ("extractor", "classifier"):
        d = json.loads(json.dumps(base))
        d[task]["source"] = {"kind": "synthetic", "num_examples": n_synthetic}
        rows = _render(task, type(cfg.prepare_data).model_validate(d), store)
        doc["distributions"][task] = {
            "source": f"synthetic x{n_synthetic}",
            "summary": _summary(rows),
            "rows": rows,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    for k_, v in doc["distributions"].items():
        print(k_, json.dumps(v["summary"]))
    return doc


def resample(rows: list[dict], n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(r["prompt"], r["completion"]) for r in rng.choices(rows, k=n)]


# ---------------------------------------------------------------------------------------------
# the timed epochs (GPU)
# ---------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    from train_throughput import device_info  # its nvidia-smi query, without a CUDA context here

    info = device_info(device)
    return ", ".join(x for x in (info["device"], info.get("device_memory")) if x)


def ensure_model(model: str, root: Path, tiny: bool, device: str, tokenizer_cache: str | None) -> Path:
    """The random-init model of the real shape, built by train_throughput.py in its own process
    (transformers must not be imported before Unsloth here)."""
    mdir = root / model
    if (mdir / "bench_model.json").is_file() and (mdir / "config.json").is_file():
        return mdir
    cmd = (
        [
            sys.executable,
            str(ROOT / "benchmarks/train_throughput.py"),
            "--_build",
            model,
            str(mdir),
            "--device",
            device,
        ]
        + (["--tiny"] if tiny else [])
        + (["--tokenizer-cache", tokenizer_cache] if tokenizer_cache else [])
    )
    subprocess.run(cmd, check=True, cwd=str(ROOT))
    return mdir


def run_variant(hooks, name: str, section, warm, rows, backend: str, work: Path, loaded) -> dict:
    t0 = time.perf_counter()
    r = hooks.run_rows(section, rows, backend=backend, workdir=work / name, warm_section=warm, loaded=loaded)
    loaded = r.pop("loaded")
    times = r.pop("step_times_s")
    tokens = sum(len(x["input_ids"]) for x in rows)
    res = {
        "variant": name,
        "examples": len(rows),
        "examples_per_step": section.optim.batch_size * section.optim.grad_accum,
        "micro_batch": section.optim.batch_size if not section.packing else "packed",
        "grad_accum": section.optim.grad_accum
        if not section.packing
        else r.get("packed_micro_batches_per_step"),
        "epoch_s": round(sum(times), 3),
        "train_wall_s": r["train_wall_s"],
        "steps": r["steps"],
        "step_s_median": round(statistics.median(times), 4) if times else None,
        "real_tokens": tokens,
        "real_tokens_per_s": round(tokens / sum(times), 1) if times else None,
        "variant_wall_s": round(time.perf_counter() - t0, 1),
        **{k: v for k, v in r.items() if k not in ("device",)},
    }
    if "peak_allocated_bytes" in r:
        res["peak_allocated_gib"] = round(r["peak_allocated_bytes"] / GIB, 2)
        res["peak_reserved_gib"] = round(r["peak_reserved_bytes"] / GIB, 2)
    print(
        f"{name:10s} epoch {res['epoch_s']:.2f}s  steps {res['steps']}  "
        f"{res['real_tokens_per_s']} real tok/s  peak {res.get('peak_allocated_gib')} GiB  "
        f"loss {r.get('loss_first')} -> {r.get('loss_last')}",
        flush=True,
    )
    return res, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--build-lengths", default=None, metavar="OUT", help="CPU: write the length distributions"
    )
    ap.add_argument("--synthetic-examples", type=int, default=400)
    ap.add_argument("--lengths", default=str(LENGTHS))
    ap.add_argument("--model", default="functiongemma-270m", choices=sorted(MODEL_TASK))
    ap.add_argument(
        "--distribution",
        default=None,
        help="comma list of keys in the lengths file, each timed in turn (default: "
        "function_calling/with_distractors for FunctionGemma, extractor for Gemma-3)",
    )
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument(
        "--packed-tokens",
        default="16384",
        help="comma list of packed_tokens_per_batch values, one packed run each",
    )
    ap.add_argument("--variants", default="reference,packed", help="reference and/or packed")
    ap.add_argument("--backend", default="unsloth")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="scaled-down model shapes: checks the harness")
    ap.add_argument("--model-root", default=None)
    ap.add_argument("--tokenizer-cache", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/epoch_real_lengths.json"))
    args = ap.parse_args()

    if args.build_lengths:
        build_lengths(Path(args.build_lengths), args.synthetic_examples)
        return

    lengths_doc = json.loads(Path(args.lengths).read_text())
    node, task = MODEL_TASK[args.model]
    dists = (
        args.distribution or ("function_calling/with_distractors" if task == "function_calling" else task)
    ).split(",")
    root = Path(args.model_root or os.environ.get("TMPDIR", "/tmp")) / (
        "dagtune_bench_models" + ("_tiny" if args.tiny else "")
    )
    mdir = ensure_model(args.model, root, args.tiny, args.device, args.tokenizer_cache)

    if args.backend == "unsloth":
        from dagtune.runtime import unsloth_module

        unsloth_module()  # before transformers/trl
    import node_hooks
    from transformers import AutoTokenizer

    from dagtune.training import sft

    spec = sft.FUNCTION_CALLING if task == "function_calling" else sft.EXTRACTOR
    tok = AutoTokenizer.from_pretrained(str(mdir))
    real = getattr(real_config(), node)  # the pipeline's recipe for this model
    max_len = real.model.max_seq_length
    common = dict(
        batch_size=real.optim.batch_size,
        grad_accum=real.optim.grad_accum,
        max_seq_length=max_len,
        gradient_checkpointing=real.gradient_checkpointing,
        load_in_4bit=real.model.load_in_4bit if args.device == "cuda" else False,
        lora_r=real.lora.r,
        lora_alpha=real.lora.alpha,
        lora_dropout=real.lora.dropout,
        target_modules=real.lora.target_modules,
        node=node,
    )
    doc = {
        "benchmark": "epoch_real_lengths",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_name(args.device),
        "model": args.model,
        "model_dir_meta": json.loads((mdir / "bench_model.json").read_text()),
        "tiny_shapes": args.tiny,
        "backend": args.backend,
        "tokenizer_note": lengths_doc.get("tokenizer_note"),
        "recipe": {k: v for k, v in common.items() if k != "target_modules"},
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dagtune-epoch-"))
    loaded = None
    wanted = [v.strip() for v in args.variants.split(",")]
    plan = []
    if "reference" in wanted:
        plan.append(("reference", False, 0))
    if "packed" in wanted:
        plan += [(f"packed{int(t) // 1024}k", True, int(t)) for t in args.packed_tokens.split(",")]
    for dist in dists:
        shapes = resample(lengths_doc["distributions"][dist]["rows"], args.examples, args.seed)
        rows = node_hooks.marker_rows(tok, shapes, seed=args.seed, spec=spec)
        rows = [{k: v[:max_len] for k, v in r.items()} for r in rows]  # as tokenize_prompt_completion cuts
        run = {
            "distribution": dist,
            "distribution_summary": lengths_doc["distributions"][dist]["summary"],
            "resampled": {
                "examples": len(rows),
                "seed": args.seed,
                "tokens_mean": round(statistics.mean(len(r["input_ids"]) for r in rows), 1),
                "pad_waste_b8_expected": round(pad_waste([len(r["input_ids"]) for r in rows], 8, 1), 4),
            },
            "results": [],
        }
        doc["runs"].append(run)
        for name, packing, cap in plan:
            extra = {"packing": packing, "packed_tokens_per_batch": cap or 16384}
            sec = node_hooks.bench_section(str(mdir), **common, **extra)
            warm = node_hooks.bench_section(str(mdir), **common, **extra, max_steps=3)
            print(f"== {dist} {name}", flush=True)
            try:
                res, loaded = run_variant(
                    node_hooks, name, sec, warm, rows, args.backend, work / dist.replace("/", "_"), loaded
                )
            except Exception as e:  # one variant's failure (an OOM, say) must not lose the others
                import traceback

                traceback.print_exc()
                res = {"variant": name, "status": "error", "error": f"{type(e).__name__}: {str(e)[:400]}"}
            run["results"].append(res)
            ref = next((r for r in run["results"] if r["variant"] == "reference" and "epoch_s" in r), None)
            for r in run["results"]:
                if ref and "epoch_s" in r and r is not ref:
                    r["speedup_vs_reference"] = round(ref["epoch_s"] / r["epoch_s"], 3)
            out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
