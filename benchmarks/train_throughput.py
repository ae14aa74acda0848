"""LoRA training throughput on the GPU: the project's node vs raw Unsloth vs plain transformers+peft.

    # on the GPU machine (see scripts/gpu_site.sh for the Unsloth site):
    export PYTHONPATH=$PWD/.gpu_site:$PWD HF_HUB_OFFLINE=1
    python3 benchmarks/train_throughput.py --preset priority --budget-s 400 --out $OUT/train_throughput.json
    # on a CPU, a seconds-long check of the harness (tiny shapes, transformers+peft only):
    .venv/bin/python benchmarks/train_throughput.py --tiny --impl hf --preset priority --device cpu

For each case (model x gradient checkpointing x 4-bit x batch) and each implementation it measures
tokens per second (non-pad tokens of the timed steps over their wall time), the median step time and
the peak GPU memory (allocated and reserved, reset after the model is loaded) of

  node     the project's own training node step (trainer, collation, logging), through the hook
           ``sft_train_steps`` (FunctionGemma, Gemma-3) or ``classifier_train_steps`` (Phi-4-mini) of
           ``benchmarks/node_hooks.py``; reported "not available" while that import
           fails -- never estimated. Contract: see ``NODE_HOOK_DOC`` below.
  unsloth  a raw loop: ``FastLanguageModel.from_pretrained`` + ``get_peft_model`` + torch AdamW,
           ``model(input_ids, attention_mask, labels)`` -> loss.backward() -> step.
  hf       the same loop on ``AutoModelForCausalLM`` (SDPA attention) + ``peft.get_peft_model``;
           checkpointing through ``gradient_checkpointing_enable(use_reentrant=False)``.

Models are random-init bf16 models of the real shapes (``MODELS``), built once on the device with
``from_config`` + ``save_pretrained`` next to a small tokenizer (the project's tiny tokenizer with the
real chat template when ``dagtune.models.tiny`` builds one, else a minimal word-level one); the
embedding keeps the real vocabulary size. (b) and (c) feed fixed-length batches of random token ids
(labels = inputs, no padding), LoRA r=32 alpha=64 dropout 0 on every linear layer of the blocks,
AdamW lr 1e-4, 3 warm-up + 8 timed steps by default -- the setup of the issue's reference numbers.

Note on Phi-4-mini: the project's classifier puts an ``nn.Linear`` head on the last non-pad token.
``unsloth`` and ``hf`` measure the causal-LM loss (200k-vocab logits) like the reference table;
``unsloth_head`` and ``hf_head`` are the same raw loops on the classifier's objective (decoder body ->
last token's hidden state -> fp32 Linear -> cross-entropy, no project code): the like-for-like
baselines of the node.

Every case runs in its own child process (Unsloth patches transformers on import, so the plain loop
must never share a process with it; an OOM stays in its case). Results are written after each case,
so a run cut off by ``--budget-s`` or the device's time limit still leaves its finished cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dagtune.models.tiny import PHI4_MINI_ARCH  # noqa: E402  (the checkout's dagtune)

GIB = 1024**3

# ---------------------------------------------------------------------------------------------
# the models (real shapes; random weights)
# ---------------------------------------------------------------------------------------------
_GEMMA_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


# What FunctionGemma-270M and Gemma-3-1B share besides their sizes.
_GEMMA_COMMON = {
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262144,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "rope_parameters": _GEMMA_ROPE,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def _gemma_layers(n: int) -> list[str]:
    # Gemma-3: five sliding-window layers, then one global layer.
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]


def _gemma(reference: str, tiny_tokenizer: str, hidden: int, intermediate: int, layers: int) -> dict:
    """A Gemma-3 entry of MODELS: the SFT node's hook, LoRA on every block linear, the given sizes."""
    return {
        "family": "gemma3",
        "reference": reference,
        "tiny_tokenizer": tiny_tokenizer,
        "node_hook": ("node_hooks", "sft_train_steps"),
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "config": {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            **_GEMMA_COMMON,
        },  # fmt: skip
    }


MODELS: dict[str, dict] = {
    "functiongemma-270m": _gemma("unsloth/functiongemma-270m-it", "tiny-functiongemma", 640, 2048, 18),
    "gemma-3-1b": _gemma("unsloth/gemma-3-1b-it", "tiny-gemma3", 1152, 6912, 26),
    "phi-4-mini": {
        "family": "phi3",
        "reference": "microsoft/Phi-4-mini-instruct",
        "tiny_tokenizer": "tiny-phi3",
        "node_hook": ("node_hooks", "classifier_train_steps"),
        # Phi-3 fuses q/k/v and gate/up: these four are all its block linears ("all-linear").
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "config": {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "vocab_size": 200064,
            "max_position_embeddings": 131072,
            **PHI4_MINI_ARCH,
        },
    },
}

# Scaled-down shapes for checking the harness on a CPU (--tiny).
TINY_OVERRIDES = {
    "gemma3": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "vocab_size": 4096,
    },
    "phi3": {
        "hidden_size": 96,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
    },
}

# The reference table (H100 80GB): tok/s and peak GiB, "oom" where the loop ran out of memory.
REFERENCE = {
    "functiongemma-270m|ckpt|16bit|b16": {"hf": (44407, 57.0), "unsloth": (106581, 16.8)},
    "functiongemma-270m|nockpt|16bit|b16": {"hf": "oom", "unsloth": (135112, 27.2)},
    "gemma-3-1b|nockpt|16bit|b8": {"hf": (23768, 55.5), "unsloth": (47480, 27.0)},
    "gemma-3-1b|ckpt|16bit|b8": {"hf": (17875, 30.7), "unsloth": (36163, 10.4)},
    "phi-4-mini|nockpt|16bit|b8": {"hf": (12942, 68.2), "unsloth": (27978, 36.5)},
    "phi-4-mini|ckpt|16bit|b8": {"hf": (9511, 30.7), "unsloth": (20258, 8.9)},
    "phi-4-mini|ckpt|4bit|b8": {"unsloth": (21980, 4.3)},
}

# Configurations in priority order: (model, gradient checkpointing, 4-bit, batch, impls that apply).
PRESETS = {
    "priority": [
        ("functiongemma-270m", True, False, 16, ("node", "unsloth", "hf")),
        ("gemma-3-1b", False, False, 8, ("node", "unsloth", "hf")),
        ("phi-4-mini", True, False, 8, ("node", "unsloth", "unsloth_head", "hf", "hf_head")),
        ("phi-4-mini", True, True, 8, ("node", "unsloth", "unsloth_head")),
    ],
}
PRESETS["table"] = PRESETS["priority"] + [
    # HF without checkpointing on FunctionGemma b16 ran out of memory in the reference (262k-vocab
    # logits); it is attempted only with --try-expected-oom.
    ("functiongemma-270m", False, False, 16, ("node", "unsloth", "hf?")),
    ("gemma-3-1b", True, False, 8, ("node", "unsloth", "hf")),
    ("phi-4-mini", False, False, 8, ("node", "unsloth", "unsloth_head", "hf", "hf_head")),
    ("gemma-3-1b", False, True, 8, ("node", "unsloth")),  # the recipe's 4-bit extractor base
]

NODE_HOOK_DOC = """
sft_train_steps / classifier_train_steps(model_dir: str, *, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                      load_in_4bit: bool, lora_r: int, lora_alpha: int, lora_dropout: float,
                      target_modules: list[str], warmup_steps: int, timed_steps: int,
                      backend: str = "unsloth") -> dict
  Loads model_dir (a random-init model of the real shape + tokenizer) the way the node does, builds
  `batch_size * (warmup_steps + timed_steps)` training examples of exactly `seq_len` tokens through
  the node's own collation, and runs the node's trainer for warmup_steps + timed_steps optimizer
  steps (grad_accum 1) with its usual logging. Returns
    {"step_times_s": [timed_steps floats, each step ended by torch.cuda.synchronize()],
     "tokens": non-pad tokens in the timed steps,
     "peak_allocated_bytes"/"peak_reserved_bytes": optional, measured from the first training step
       (else the benchmark reports the peak over the whole call, loading included),
     "notes": optional str}
"""


def case_key(model: str, ckpt: bool, four_bit: bool, batch: int) -> str:
    return f"{model}|{'ckpt' if ckpt else 'nockpt'}|{'4bit' if four_bit else '16bit'}|b{batch}"


# ---------------------------------------------------------------------------------------------
# model directories
# ---------------------------------------------------------------------------------------------
def _minimal_tokenizer(out_dir: Path, family: str, n: int = 512):
    """A word-level tokenizer: enough for throughput (the loops feed random ids of the full vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        kw = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    else:
        specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
        kw = {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(n - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=kw["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=131072, **kw)
    tok.save_pretrained(str(out_dir))
    return tok


def build_tokenizer(out_dir: Path, spec: dict) -> tuple[object, str]:
    """The project's tiny tokenizer (real chat template) if it builds, else a minimal one."""
    try:
        sys.path.insert(0, str(ROOT))
        from dagtune.models import tiny

        sp = tiny.spec(spec["tiny_tokenizer"])
        if spec["family"] == "gemma3":
            tok = tiny.build_gemma_tokenizer(sp, out_dir)
        else:
            tok = tiny.build_phi_tokenizer(sp, out_dir)
        return tok, f"dagtune.models.tiny:{spec['tiny_tokenizer']}"
    except Exception as e:  # the tiny module is optional here
        for f in out_dir.glob("*"):
            f.unlink()
        tok = _minimal_tokenizer(out_dir, spec["family"])
        return tok, f"minimal word-level ({type(e).__name__}: {str(e)[:120]})"


def build_model_dir(
    model: str, out_dir: Path, tiny: bool, device: str, tokenizer_cache: str | None = None
) -> dict:
    import torch

    spec = MODELS[model]
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = Path(tokenizer_cache) / model if tokenizer_cache else None
    if cached is not None and (cached / "tokenizer_kind.txt").is_file():
        from transformers import AutoTokenizer

        for f in cached.iterdir():
            if f.name != "tokenizer_kind.txt":
                shutil.copyfile(f, out_dir / f.name)
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        tok_kind = (cached / "tokenizer_kind.txt").read_text().strip() + " (prebuilt)"
    else:
        tok, tok_kind = build_tokenizer(out_dir, spec)
    cfg = dict(spec["config"])
    if tiny:
        cfg.update(TINY_OVERRIDES[spec["family"]])
    if len(tok) > cfg["vocab_size"]:
        raise RuntimeError(f"tokenizer ({len(tok)}) larger than the vocabulary ({cfg['vocab_size']})")
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if spec["family"] == "gemma3":
        from transformers import Gemma3ForCausalLM as cls
        from transformers import Gemma3TextConfig

        cfg["layer_types"] = _gemma_layers(cfg["num_hidden_layers"])
        config = Gemma3TextConfig(**cfg, **ids)
    else:
        from transformers import Phi3Config
        from transformers import Phi3ForCausalLM as cls

        config = Phi3Config(**cfg, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        m = cls._from_config(config, dtype=torch.bfloat16)
    m.save_pretrained(str(out_dir))
    n_params = sum(p.numel() for p in m.parameters())
    del m
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    meta = {
        "model": model,
        "params": int(n_params),
        "vocab_size": cfg["vocab_size"],
        "tokenizer": tok_kind,
        "tokenizer_size": len(tok),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "bench_model.json").write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------------------------------------
# the loops (child process)
# ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _batches(n: int, batch: int, seq: int, vocab: int, device: str, low: int = 8):
    import torch

    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(low, vocab, (batch, seq), generator=g)
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.clone().to(device),
            }
        )
    return out


def _last_token_head_step(model, head):
    """The classifier's objective without the project's code: the decoder body (no LM head) -> hidden
    state of the last token (fixed-length rows, no padding) -> fp32 Linear -> cross-entropy."""
    import torch

    base = model.get_base_model()
    body = base.get_decoder() if hasattr(base, "get_decoder") else base.model

    def step(b):
        hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)[0]
        logits = head(hidden[:, -1].float())
        return torch.nn.functional.cross_entropy(logits, b["class_labels"])

    return step


def _run_loop(model, case: dict, device: str) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().weight.shape[0]
    # Two distinct batches alternate: no step reads a batch another step just left in cache.
    data = _batches(2, case["batch"], case["seq"], vocab, device)
    if case["impl"].endswith("_head"):
        head = torch.nn.Linear(model.config.hidden_size, 2, device=device, dtype=torch.float32)
        params += list(head.parameters())
        g = torch.Generator().manual_seed(7)
        for b in data:
            b["class_labels"] = torch.randint(0, 2, (case["batch"],), generator=g).to(device)
        head_step = _last_token_head_step(model, head)
    else:
        head_step = None
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused)
    model.train()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses, gc_steps = [], [], []
    gc_s = [0.0, 0.0]  # [start of the running collection, total seconds]

    def on_gc(phase, info):
        if phase == "start":
            gc_s[0] = time.perf_counter()
        else:
            gc_s[1] += time.perf_counter() - gc_s[0]

    gc.callbacks.append(on_gc)
    for i in range(case["warmup"] + case["steps"]):
        gc0 = gc_s[1]
        b = data[i % 2]
        _sync(device)
        t0 = time.perf_counter()
        if head_step is None:
            loss = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
            ).loss
        else:
            loss = head_step(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= case["warmup"]:
            times.append(dt)
            gc_steps.append(round(gc_s[1] - gc0, 4))
    gc.callbacks.remove(on_gc)
    return {
        "step_times_s": times,
        "gc_s_per_step": gc_steps,
        "tokens": case["batch"] * case["seq"] * case["steps"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": int(sum(p.numel() for p in params)),
    }


def run_unsloth(case: dict, device: str) -> dict:
    import torch
    import unsloth  # noqa: F401  (first: it patches transformers)
    from unsloth import FastLanguageModel

    ckpt = "unsloth" if case["ckpt"] else False
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=case["model_dir"],
        max_seq_length=case["seq"],
        dtype=torch.bfloat16,
        load_in_4bit=case["four_bit"],
        load_in_16bit=not case["four_bit"],
        local_files_only=True,
        use_gradient_checkpointing=ckpt,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=case["lora_r"],
        lora_alpha=case["lora_alpha"],
        lora_dropout=0.0,
        target_modules=case["target_modules"],
        bias="none",
        use_gradient_checkpointing=ckpt,
        random_state=0,
    )
    res = _run_loop(model, case, device)
    res["versions"] = {"unsloth": getattr(unsloth, "__version__", "?")}
    return res


def run_hf(case: dict, device: str) -> dict:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if case["four_bit"]:
        raise RuntimeError("hf: 4-bit loading is not part of the plain baseline")
    model = AutoModelForCausalLM.from_pretrained(
        case["model_dir"],
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        local_files_only=True,
        device_map=device if device.startswith("cuda") else None,
    ).to(device)
    model.config.use_cache = False
    if case["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(
        r=case["lora_r"],
        lora_alpha=case["lora_alpha"],
        lora_dropout=0.0,
        bias="none",
        target_modules=case["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    res = _run_loop(model, case, device)
    res["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
    return res


def run_node(case: dict, device: str) -> dict:
    import importlib

    mod_name, fn_name = MODELS[case["model"]]["node_hook"]
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:
        return {"status": "not available", "error": f"{mod_name}.{fn_name}: {type(e).__name__}: {e}"}
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = fn(
        case["model_dir"],
        batch_size=case["batch"],
        seq_len=case["seq"],
        gradient_checkpointing=case["ckpt"],
        load_in_4bit=case["four_bit"],
        lora_r=case["lora_r"],
        lora_alpha=case["lora_alpha"],
        lora_dropout=0.0,
        target_modules=case["target_modules"],
        warmup_steps=case["warmup"],
        timed_steps=case["steps"],
        backend=case.get("node_backend", "unsloth"),
    )
    out = {
        "step_times_s": list(r["step_times_s"]),
        "tokens": int(r["tokens"]),
        "hook": f"{mod_name}.{fn_name}",
    }
    if "peak_allocated_bytes" in r:
        out["peak_allocated_bytes"] = int(r["peak_allocated_bytes"])
        out["peak_reserved_bytes"] = int(r.get("peak_reserved_bytes", r["peak_allocated_bytes"]))
    else:
        out["peak_includes_load"] = True
    if r.get("notes"):
        out["notes"] = r["notes"]
    if "gc_s_per_step" in r:  # the garbage collector's seconds inside each timed step
        out["gc_s_per_step"] = list(r["gc_s_per_step"])
    return out


def child_main(case: dict) -> dict:
    import torch

    device = case["device"]
    t0 = time.perf_counter()
    impl = case["impl"]
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    try:
        fn = {
            "unsloth": run_unsloth,
            "unsloth_head": run_unsloth,
            "hf": run_hf,
            "hf_head": run_hf,
            "node": run_node,
        }[impl]
        res = fn(case, device)
    except torch.cuda.OutOfMemoryError as e:
        res = {"status": "oom", "error": str(e).splitlines()[0][:300]}
    except Exception as e:
        traceback.print_exc()
        res = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
    res.setdefault("status", "ok")
    if res["status"] == "ok":
        t = res["step_times_s"]
        res["tokens_per_s"] = round(res["tokens"] / sum(t), 1)
        res["step_s_median"] = round(statistics.median(t), 4)
        res["step_s_min"] = round(min(t), 4)
        res["step_s_max"] = round(max(t), 4)
        if device.startswith("cuda"):
            res.setdefault("peak_allocated_bytes", torch.cuda.max_memory_allocated())
            res.setdefault("peak_reserved_bytes", torch.cuda.max_memory_reserved())
            res["peak_allocated_gib"] = round(res["peak_allocated_bytes"] / GIB, 2)
            res["peak_reserved_gib"] = round(res["peak_reserved_bytes"] / GIB, 2)
            # Left over by an earlier case of a shared process (--share-process); 0 in a fresh one.
            res["baseline_allocated_gib"] = round(base / GIB, 2)
            res["peak_over_baseline_gib"] = round((res["peak_allocated_bytes"] - base) / GIB, 2)
    elif device.startswith("cuda"):
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    if device.startswith("cuda"):
        res["device"] = torch.cuda.get_device_name()
    res["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------
# the parent: plan, build, run children, write JSON
# ---------------------------------------------------------------------------------------------
def device_info(device: str) -> dict:
    """Names the device without creating a CUDA context in this (parent) process: the children get
    the whole card."""
    from importlib.metadata import version

    info = {"python": platform.python_version(), "host": platform.node()}
    if device.startswith("cuda"):
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            name, mem, driver = [x.strip() for x in q.stdout.strip().splitlines()[0].split(",")]
            info.update(device=name, device_memory=mem, driver=driver)
        except Exception as e:
            info["device"] = f"cuda (nvidia-smi failed: {e})"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for mod in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "unsloth",
        "unsloth_zoo",
        "bitsandbytes",
        "xformers",
        "trl",
        "datasets",
    ):
        try:
            info[mod] = version(mod)
        except Exception:
            info[mod] = None
    return info


def plan(args) -> list[dict]:
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    models = [m.strip() for m in args.models.split(",")] if args.models else list(MODELS)
    cases = []
    for model, ckpt, four_bit, batch, allowed in PRESETS[args.preset]:
        if model not in models:
            continue
        batch = args.batch or batch
        for impl in impls:
            maybe = impl + "?"
            if impl not in allowed and maybe not in allowed:
                continue
            c = {
                "model": model,
                "impl": impl,
                "ckpt": ckpt,
                "four_bit": four_bit,
                "batch": batch,
                "seq": args.seq,
                "warmup": args.warmup,
                "steps": args.steps,
                "lora_r": args.lora_r,
                "lora_alpha": args.lora_alpha,
                "target_modules": MODELS[model]["target_modules"],
                "device": args.device,
                "node_backend": args.node_backend,
            }
            c["key"] = case_key(model, ckpt, four_bit, batch)
            if args.keys and c["key"] not in args.keys.split(","):
                continue
            if maybe in allowed and not args.try_expected_oom:
                c["skip"] = "expected OOM (reference table); --try-expected-oom runs it"
            cases.append(c)
    return cases


def write(out_path: Path, doc: dict) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out_path)


def _record(doc: dict, rec: dict, out_path: Path, t_start: float, tail: str) -> None:
    """Add one case's result, rewrite the JSON (a cut-off run keeps its finished cases), print its line."""
    if rec.get("status") != "ok":
        rec.pop("step_times_s", None)
    doc["results"].append(rec)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(out_path, doc)
    print(
        f"{rec['key']:40s} {rec['impl']:8s} {rec['status']:14s} tok/s={rec.get('tokens_per_s', '-')} "
        f"step={rec.get('step_s_median', '-')}s peak={rec.get('peak_allocated_gib', '-')}/"
        f"{rec.get('peak_reserved_gib', '-')}GiB {tail} {(rec.get('error') or '')[:200]}",
        flush=True,
    )


def summary_table(results: list[dict]) -> str:
    lines = [
        f"{'case':40s} {'impl':8s} {'status':14s} {'tok/s':>9s} {'step s':>7s} {'peakGiB':>8s} "
        f"{'resGiB':>7s} {'ref tok/s':>9s} {'refGiB':>6s}"
    ]
    for r in results:
        ref = REFERENCE.get(r["key"], {}).get(r["impl"])
        rt, rg = ref if isinstance(ref, tuple) else (ref or "-", "-")
        lines.append(
            f"{r['key']:40s} {r['impl']:8s} {r['status'][:14]:14s} {r.get('tokens_per_s', '-')!s:>9s} "
            f"{r.get('step_s_median', '-')!s:>7s} {r.get('peak_allocated_gib', '-')!s:>8s} "
            f"{r.get('peak_reserved_gib', '-')!s:>7s} {rt!s:>9s} {rg!s:>6s}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--impl",
        default="node,unsloth,hf",
        help="comma list of node, unsloth, hf, unsloth_head, hf_head (the last two: Phi-4-mini only)",
    )
    ap.add_argument("--preset", default="priority", choices=sorted(PRESETS))
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default all)")
    ap.add_argument(
        "--keys",
        default=None,
        help="comma list of case keys to run (e.g. functiongemma-270m|ckpt|16bit|b16); default all",
    )
    ap.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lora-alpha", type=int, default=64)
    ap.add_argument("--node-backend", default="unsloth", help="backend passed to the node hook")
    ap.add_argument("--try-expected-oom", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="scaled-down shapes: checks the harness, not speed")
    ap.add_argument("--model-root", default=None, help="where model dirs are built (default: a temp dir)")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="kill a running case at this many seconds (default: budget + case timeout)",
    )
    ap.add_argument(
        "--tokenizer-cache",
        default=None,
        help="folder of prebuilt tokenizers (<folder>/<model>/), from --prebuild-tokenizers",
    )
    ap.add_argument(
        "--prebuild-tokenizers",
        default=None,
        metavar="DIR",
        help="only build the three tokenizers into DIR (CPU) and exit",
    )
    ap.add_argument("--case-timeout-s", type=float, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    ap.add_argument("--log", default=None, help="children's output (default: next to --out)")
    ap.add_argument(
        "--share-process",
        action="store_true",
        help="run every unsloth/node case in ONE child process, in plan order (saves Unsloth's "
        "import and compile per case, ~75 s each on an H100); hf cases keep their own",
    )
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_children", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_build", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        case = json.loads(args._child)
        res = child_main(case)
        print("RESULT_JSON: " + json.dumps(res), flush=True)
        return
    if args._children:
        import gc

        for i, case in enumerate(json.loads(Path(args._children).read_text())):
            res = child_main(case)
            print(f"RESULT_JSON[{i}]: " + json.dumps(res), flush=True)
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass
        return
    if args._build:
        meta = build_model_dir(
            args._build[0], Path(args._build[1]), args.tiny, args.device, args.tokenizer_cache
        )
        print("RESULT_JSON: " + json.dumps(meta), flush=True)
        return
    if args.prebuild_tokenizers:
        # Tokenizer training takes seconds of CPU: do it here, carry the folder to the GPU machine.
        for model, spec in MODELS.items():
            d = Path(args.prebuild_tokenizers) / model
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            tok, kind = build_tokenizer(d, spec)
            (d / "tokenizer_kind.txt").write_text(kind + "\n")
            print(f"{model}: {kind}, {len(tok)} tokens -> {d}")
        return

    t_start = time.perf_counter()
    out_path = Path(args.out)
    log_path = Path(args.log) if args.log else out_path.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")
    root = Path(args.model_root or os.environ.get("TMPDIR", "/tmp")) / (
        "dagtune_bench_models" + ("_tiny" if args.tiny else "")
    )
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), str(ROOT)] if p)

    cases = plan(args)
    doc = {
        "benchmark": "train_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": device_info(args.device),
        "setup": {
            "seq_len": args.seq,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0},
            "optimizer": "torch AdamW (fused on CUDA), lr 1e-4",
            "dtype": "bfloat16",
            "tiny_shapes": args.tiny,
            "preset": args.preset,
            "tokens_per_s": "non-pad tokens of the timed steps / their summed wall time",
            "peak": "torch.cuda.max_memory_allocated / _reserved, reset after model load",
            "classifier_note": "phi-4-mini unsloth/hf rows use the causal-LM loss (200k-vocab logits); "
            "unsloth_head/hf_head rows and the node (the project's classifier) a linear head on the last "
            "token's hidden state with cross-entropy",
        },
        "models": {},
        "reference_h100": {
            k: {i: (list(v) if isinstance(v, tuple) else v) for i, v in d.items()}
            for k, d in REFERENCE.items()
        },
        "results": [],
    }
    print(f"device: {doc['env'].get('device')}; {len(cases)} cases; log {log_path}", flush=True)

    def remaining() -> float:
        if args.budget_s is None:
            return float("inf")
        return args.budget_s - (time.perf_counter() - t_start)

    def until_deadline() -> float:
        if args.deadline_s is None:
            return float("inf")
        return max(args.deadline_s - (time.perf_counter() - t_start), 1.0)

    def children(cases_: list[dict], timeout: float) -> list[dict]:
        """One process for several cases; what it printed before a kill still counts."""
        spec_path = Path(tempfile.mkdtemp(prefix="dagtune-tt-")) / "cases.json"
        spec_path.write_text(json.dumps(cases_))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_children", str(spec_path)]
        log.write(f"\n===== shared process: {len(cases_)} cases\n")
        log.flush()
        # Straight into the log as it runs: a run cut off from outside still leaves each finished
        # case's RESULT_JSON line there.
        start = log.tell()
        timed_out = False
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out = True
            log.write("\n===== timed out\n")
        log.flush()
        with open(log_path) as f:
            f.seek(start)
            output = f.read()
        got: dict[int, dict] = {}
        for line in output.splitlines():
            if line.startswith("RESULT_JSON[") and "]: " in line:
                head, body = line.split("]: ", 1)
                got[int(head[len("RESULT_JSON[") :])] = json.loads(body)
        tail = " | ".join(output.strip().splitlines()[-3:])[-400:]
        miss = {
            "status": "timeout" if timed_out else "error",
            "error": "shared process " + ("timed out" if timed_out else f"ended early: {tail}"),
        }
        return [got.get(i, dict(miss)) for i in range(len(cases_))]

    def child(argv: list[str], timeout: float) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        log.write(f"\n===== {' '.join(argv)[:300]}\n")
        log.flush()
        try:
            p = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                env=env,
                cwd=str(ROOT),
            )
            output, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            log.write(output + f"\n===== timed out after {timeout:.0f}s\n")
            log.flush()
            return {"status": "timeout", "error": f"killed after {timeout:.0f}s"}
        log.write(output)
        log.flush()
        for line in reversed(output.splitlines()):
            if line.startswith("RESULT_JSON: "):
                return json.loads(line[len("RESULT_JSON: ") :])
        tail = " | ".join(output.strip().splitlines()[-3:])[-400:]
        return {"status": "error", "error": f"child exited {rc} without a result: {tail}"}

    built: dict[str, dict] = {}
    shared: dict[int, dict] = {}
    if args.share_process:
        # Build every model first (own processes), then run the unsloth/node cases in one process.
        todo = [
            (i, c)
            for i, c in enumerate(cases)
            if "skip" not in c and c["impl"] in ("unsloth", "unsloth_head", "node")
        ]
        for _, c in todo:
            mdir = root / c["model"]
            if c["model"] in built:
                continue
            if (mdir / "bench_model.json").is_file() and (mdir / "config.json").is_file():
                built[c["model"]] = json.loads((mdir / "bench_model.json").read_text())
            else:
                t0 = time.perf_counter()
                built[c["model"]] = child(
                    ["--_build", c["model"], str(mdir), "--device", args.device]
                    + (["--tiny"] if args.tiny else [])
                    + (["--tokenizer-cache", args.tokenizer_cache] if args.tokenizer_cache else []),
                    timeout=min(300, until_deadline()),
                )
                print(
                    f"built {c['model']}: {json.dumps(built[c['model']])[:300]} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
        todo = [
            (i, dict(c, model_dir=str(root / c["model"])))
            for i, c in todo
            if built[c["model"]].get("status") not in ("error", "timeout")
        ]
        if todo:
            t0 = time.perf_counter()
            res = children(
                [c for _, c in todo], timeout=min(args.case_timeout_s * len(todo), until_deadline())
            )
            shared = {i: r for (i, _), r in zip(todo, res, strict=True)}
            print(f"shared process: {len(todo)} cases in {time.perf_counter() - t0:.0f}s", flush=True)
    for idx, c in enumerate(cases):
        if idx in shared:
            rec = {k: c[k] for k in ("key", "model", "impl", "ckpt", "four_bit", "batch", "seq")}
            rec.update(shared[idx])
            doc["models"][c["model"]] = built[c["model"]]
            _record(doc, rec, out_path, t_start, f"base={rec.get('baseline_allocated_gib', '-')}")
            continue
        rec = {k: c[k] for k in ("key", "model", "impl", "ckpt", "four_bit", "batch", "seq")}
        if "skip" in c:
            rec.update(status="skipped", error=c["skip"])
        elif remaining() < 30:
            rec.update(status="skipped", error="time budget spent")
        else:
            mdir = root / c["model"]
            if c["model"] not in built:
                if (mdir / "bench_model.json").is_file() and (mdir / "config.json").is_file():
                    built[c["model"]] = json.loads((mdir / "bench_model.json").read_text())
                else:
                    t0 = time.perf_counter()
                    meta = child(
                        ["--_build", c["model"], str(mdir), "--device", args.device]
                        + (["--tiny"] if args.tiny else [])
                        + (["--tokenizer-cache", args.tokenizer_cache] if args.tokenizer_cache else []),
                        timeout=min(300, until_deadline()),
                    )
                    print(
                        f"built {c['model']}: {json.dumps(meta)[:300]} ({time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
                    built[c["model"]] = meta
                doc["models"][c["model"]] = built[c["model"]]
            if built[c["model"]].get("status") in ("error", "timeout"):
                rec.update(status="error", error=f"model build failed: {built[c['model']].get('error')}")
            else:
                c = dict(c, model_dir=str(mdir))
                res = child(["--_child", json.dumps(c)], timeout=min(args.case_timeout_s, until_deadline()))
                rec.update(res)
        _record(doc, rec, out_path, t_start, f"wall={rec.get('case_wall_s', '-')}s")

    if not args.keep_models and args.model_root is None:
        shutil.rmtree(root, ignore_errors=True)
    print("\n" + summary_table(doc["results"]))
    print(f"\nwrote {out_path} (wall {doc['wall_s'] if doc['results'] else 0}s)")


if __name__ == "__main__":
    main()
