"""convert_gguf's parity check at real size, llama.cpp on the GPU vs on the CPU (GPU machine).

Builds the real-shape FunctionGemma-270M (random init, ``train_throughput.py --_build``), converts it to
Q8_0 and runs ``dagtune.gguf.parity_check`` on ``--prompts`` chat prompts of ~``--tokens`` tokens, each
variant in its own process (faulthandler on, so a native crash names its stack):
  gpu      llama.cpp offloaded (needs LLAMA_CPP_LIB_PATH = a CUDA build, scripts/build_llama_cuda.sh)
  gpu2     two checks at once in two threads of one process (two convert_gguf nodes under thread isolation)
  cpu      llama.cpp on the CPU (the HF side stays on the GPU)
  llama_only  llama.cpp on the GPU in a process that never imports torch (evaluates the prompts only):
           tells a llama.cpp CUDA problem from a clash with torch's CUDA context
Writes JSON with each variant's seconds per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the weather in Cairo tomorrow will be sunny with a light wind from the north and".split()


def prompts(n: int, tokens: int) -> list[str]:
    out = []
    for i in range(n):
        body = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(tokens // 2))
        out.append(f"<bos><start_of_turn>user\n{i}: {body}<end_of_turn>\n<start_of_turn>model\n")
    return out


def llama_only(gguf: str, texts: list[str]) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=gguf, logits_all=True, n_ctx=1024, n_batch=1024, n_gpu_layers=-1, verbose=True
    )
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    for text in texts:
        llm.reset()
        llm.eval(llm.tokenize(text.removeprefix("<bos>").encode(), add_bos=True, special=True))
    return {"variant": "llama_only", "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
            "load_s": round(loaded, 3), "eval_s": round(time.perf_counter() - t, 3), "prompts": len(texts)}  # fmt: skip


def child(variant: str, model: str, gguf: str, n: int, tokens: int, new_tokens: int) -> dict:
    import faulthandler
    import logging
    from concurrent.futures import ThreadPoolExecutor

    faulthandler.enable(file=os.fdopen(os.dup(2), "w"))  # llama-cpp-python silences fd 2 while loading
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if variant == "llama_only":
        return llama_only(gguf, prompts(n, tokens))
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import dagtune.gguf.parity as parity

    ps = prompts(n, tokens)

    def one(_: int) -> dict:
        r = parity.parity_check(
            Path(model), Path(gguf), ps, max_new_tokens=new_tokens, top1_tie_tolerance=0.05,
            device=os.environ.get("PARITY_DEVICE", "cuda"), n_threads=8, greedy_prompts=n, llama_gpu=variant != "cpu",
        )  # fmt: skip
        return {k: r[k] for k in ("seconds", "phase_seconds", "llama_device", "top1_agreement_all_positions",
                                  "greedy_exact_match_rate", "n_positions", "passed")}  # fmt: skip

    k = 2 if variant == "gpu2" else 1
    with parity.float32_reference(), ThreadPoolExecutor(k) as pool:
        return {"variant": variant, "results": list(pool.map(one, range(k)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-root", default="/tmp/dagtune_models_real")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=["llama_only", "gpu", "gpu2", "cpu"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_real_size.json"))
    ap.add_argument("--_child", nargs=6, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        v, m, g, n, t, nt = a._child
        print("RESULT_JSON: " + json.dumps(child(v, m, g, int(n), int(t), int(nt))), flush=True)
        return
    from dagtune.gguf import convert_hf_to_gguf, quantize

    model = Path(a.model_root) / "functiongemma-270m"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--_build",
                        "functiongemma-270m", str(model), "--device", os.environ.get("PARITY_DEVICE", "cuda")], check=True)  # fmt: skip
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "parity_real_size"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    conv = convert_hf_to_gguf(model, work / "fc.f16.gguf", "f16")
    q = quantize(work / "fc.f16.gguf", work / "fc.q8_0.gguf", "q8_0", n_params=conv["n_params"])
    doc = {
        "benchmark": "parity_real_size",
        "device": os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip(),
        "model": "functiongemma-270m (real shape, random init)",
        "setup": {"prompts": a.prompts, "tokens": a.tokens, "new_tokens": a.new_tokens},
        "convert_s": conv["seconds"], "quantize_s": q["seconds"], "export_wall_s": time.perf_counter() - t0,
        "variants": [],
    }  # fmt: skip
    for v in a.variants:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--_child", v, str(model), str(work / "fc.q8_0.gguf"),
               str(a.prompts), str(a.tokens), str(a.new_tokens)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        res = next(
            (json.loads(x.split(": ", 1)[1]) for x in p.stdout.splitlines() if x.startswith("RESULT_JSON")),
            None,
        )
        entry = {"variant": v, "rc": p.returncode, "wall_s": round(time.perf_counter() - t, 2), "result": res}
        if p.returncode:
            entry["stderr_tail"] = p.stderr[-6000:]
        doc["variants"].append(entry)
        print(json.dumps(entry)[:3000], flush=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
