"""The ``convert_gguf_<model>`` nodes: a generative model's merged checkpoint → GGUF, parity-checked.

One node per model (``convert_gguf_function_calling``, ``convert_gguf_extractor``), both configured by
the ``convert_gguf`` section, so each export starts when its own training ends. For a model in
``convert_gguf.models``: llama.cpp's own converter writes ``outtype`` (F16 by
default) from the training node's ``merged/`` directory, then each requested quantization is made and
checked against the HF model in llama-cpp-python on the first ``parity_prompts`` test prompts of that
model's task (``dagtune.gguf.parity``: token ids identical, next-token top-1 agreement over every prompt
position, greedy generation agreement, and for ``template_check`` models greedy output on prompts
rendered by the GGUF's own embedded chat template). The node fails when a file's top-1 agreement is
below ``min_top1_agreement``, or its embedded template is missing or serves other prompts
(``min_template_greedy_match``): a broken export never reaches the registry.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dagtune.gguf.parity import Chat
from dagtune.pipeline import NodeContext

log = logging.getLogger("dagtune.gguf")

# convert_gguf.models entry -> (training node, prepare_data task whose test prompts the check uses)
SOURCES = {
    "function_calling": ("train_function_calling", "function_calling"),
    "extractor": ("train_extractor", "extractor"),
}


class ParityError(RuntimeError):
    """A GGUF file disagrees with the HF model beyond the configured threshold."""


def _prompts(data_dir: Path, task: str, n: int) -> list[str]:
    import pandas as pd

    df = pd.read_parquet(data_dir / task / "test.parquet", columns=["prompt"])
    return df["prompt"].head(n).tolist()


def _chats(ctx: NodeContext, task: str, n: int) -> list[Chat]:
    """The conversations the first ``n`` test prompts were rendered from (``dagtune.data.render``):
    FunctionGemma's developer turn + user request with the row's tools; the extractor's instruction +
    line."""
    import pandas as pd

    from dagtune.data.render import EXTRACTOR_INSTRUCTION

    data = ctx.upstream["prepare_data"]
    df = pd.read_parquet(data.dir / task / "test.parquet").head(n)
    if task == "extractor":
        return [Chat([{"role": "user", "content": EXTRACTOR_INSTRUCTION + line}]) for line in df["line"]]
    developer = data.manifest()["inputs"]["config"]["function_calling"]["developer_prompt"]
    return [
        Chat(
            [{"role": "developer", "content": developer}, {"role": "user", "content": user}],
            tools=json.loads(tools),
        )
        for user, tools in zip(df["user"], df["tools"], strict=True)
    ]


def _base_dir(ctx: NodeContext, train_node: str) -> Path:
    """The base model's directory: its SentencePiece ``tokenizer.model`` (which a merge through
    transformers 5 does not write) is what llama.cpp's Gemma converter builds the vocab from."""
    from dagtune.models import base_revision, resolve_model

    manifest = ctx.upstream[train_node].manifest()
    name = manifest["inputs"]["config"]["model"]["name"]
    path = Path(resolve_model(name, ctx.store, base_revision(manifest)))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True))  # downloaded when the node trained


def _export(ctx: NodeContext, model: str, device: str, n_threads: int) -> tuple[dict[str, Any], list[str]]:
    """One model: convert, quantize, parity-check each file. -> (files, failures)"""
    from dagtune.gguf import convert_hf_to_gguf, parity_check, quantize

    cfg = ctx.section
    train_node, task = SOURCES[model]
    merged = ctx.upstream[train_node].dir / "merged"
    if not (merged / "config.json").is_file():
        raise FileNotFoundError(f"{train_node} artifact has no merged model at {merged}")
    out_dir = ctx.out / model
    out_dir.mkdir(parents=True)
    base_file = ctx.scratch / f"{model}.{cfg.outtype}.gguf"
    tok_source = None if (merged / "tokenizer.model").is_file() else _base_dir(ctx, train_node)
    conv = convert_hf_to_gguf(merged, base_file, outtype=cfg.outtype, tokenizer_source=tok_source)
    prompts = _prompts(ctx.upstream["prepare_data"].dir, task, cfg.parity_prompts)
    chats = _chats(ctx, task, cfg.parity_prompts) if model in cfg.template_check else None
    files: dict[str, Any] = {}
    failures: list[str] = []
    for qtype in cfg.quantizations:
        target = out_dir / f"{model}.{qtype}.gguf"
        if qtype == cfg.outtype:
            shutil.copyfile(base_file, target)
            q = {"qtype": qtype, "seconds": 0.0}
        elif qtype in ("f16", "bf16"):
            q = convert_hf_to_gguf(merged, target, outtype=qtype, tokenizer_source=tok_source)
        else:
            q = quantize(base_file, target, qtype, n_params=conv["n_params"])
        parity = parity_check(
            merged,
            target,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            min_top1_agreement=cfg.min_top1_agreement,
            top1_tie_tolerance=cfg.top1_tie_tolerance,
            chats=chats,
            min_template_greedy_match=cfg.min_template_greedy_match,
            device=device,
            n_threads=n_threads,
            greedy_prompts=cfg.greedy_prompts,
            llama_gpu=cfg.parity_llama_gpu,
        )
        files[qtype] = {
            "file": target.relative_to(ctx.out).as_posix(),
            "size_bytes": target.stat().st_size,
            "convert_seconds": conv.get("seconds"),
            "quantize_seconds": q.get("seconds"),
            "warnings": q.get("warnings", []),
            "parity": {k: v for k, v in parity.items() if k != "token_id_mismatches"},
        }
        if not parity["passed"]:
            failures.append(f"{model} {qtype}: " + "; ".join(parity["failures"]))
    return files, failures


def build_model(ctx: NodeContext, model: str) -> dict[str, Any]:
    """One model's export (the node ``convert_gguf_<model>``); nothing when ``convert_gguf.models``
    leaves the model out."""
    from dagtune.gguf.parity import float32_reference
    from dagtune.runtime import resolve_device
    from dagtune.slots import host_cpus

    cfg = ctx.section
    if model not in cfg.models:
        log.info("convert_gguf: %s is not in convert_gguf.models: no GGUF file", model)
        return {model: {}}
    # llama.cpp's CPU work is most of the node (the GPU nodes beside it are launch-bound), and the two
    # models' exports can overlap: each takes half the host, not the slot's share.
    n_threads = max(1, host_cpus() // max(1, len(cfg.models)))
    with float32_reference():
        files, failures = _export(ctx, model, resolve_device(ctx.runtime.device), n_threads)
    metrics = {model: files}
    (ctx.out / "parity_report.md").write_text(_report(metrics), encoding="utf-8")
    if failures:
        # The report stays in the scratch dir for inspection; nothing is committed to the store.
        shutil.copyfile(ctx.out / "parity_report.md", ctx.scratch / "parity_report.md")
        raise ParityError(
            "GGUF parity check failed: "
            + " | ".join(failures)
            + f" (report: {ctx.scratch / 'parity_report.md'})"
        )
    return metrics


def build_function_calling(ctx: NodeContext) -> dict[str, Any]:
    return build_model(ctx, "function_calling")


def build_extractor(ctx: NodeContext) -> dict[str, Any]:
    return build_model(ctx, "extractor")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _report(metrics: dict[str, Any]) -> str:
    lines = [
        "# GGUF parity report",
        "",
        "HF model (float32) vs llama.cpp on the task's test prompts. Top-1 agreement over all prompt "
        "positions is the gate; template = greedy output on prompts rendered by the GGUF's embedded chat "
        "template equal to HF's (function caller).",
        "",
        "| model | type | size MB | prompts | token ids match | top-1 all positions (near-ties ok) "
        "| top-1 last position | max abs logit diff | greedy exact match | template | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, files in metrics.items():
        for qtype, f in files.items():
            p = f["parity"]
            allpos = p["top1_agreement_all_positions_ties_ok"]
            tpl = p.get("template_greedy_match_rate")
            lines.append(
                f"| {model} | {qtype} | {f['size_bytes'] / 1e6:.2f} | {p['n_prompts']} | "
                f"{p['token_ids_match_rate']:.3f} | {_num(p['top1_agreement_all_positions'])} ({_num(allpos)}) | "
                f"{p['top1_agreement']:.3f} | {p['max_abs_logit_diff']:.3g} | "
                f"{p['greedy_exact_match_rate']:.3f} | {_num(tpl)} | {p['passed']} |"
            )
    ties = [
        (m, q, t)
        for m, fs in metrics.items()
        for q, f in fs.items()
        for t in f["parity"]["top1_disagreements"]
    ]
    if ties:
        lines += [
            "",
            "Top-1 disagreements (HF logit gap between its top-1 and llama.cpp's; <= tolerance = near-tie):",
            "",
        ]
        lines += [
            f"- {m} {q} prompt {t['prompt']}: gap {t['hf_gap']:.4g}, near-tie {t['tie']}" for m, q, t in ties
        ]
    return "\n".join(lines) + "\n"


def key_inputs(cfg: Any) -> dict[str, Any]:
    """The converter and quantizer come from the pinned llama-cpp-python: a new pin re-exports."""
    from dagtune.gguf.convert import LLAMA_CPP_PYTHON_VERSION

    return {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION}
