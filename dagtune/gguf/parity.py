"""HF (transformers, float32) vs llama.cpp (llama-cpp-python) parity for an exported GGUF file.

Three checks per prompt:

(a) token ids: the HF tokenizer vs llama.cpp's tokenizer on the same text (must be identical);
(b) next-token logits at the last prompt position: top-1 agreement and max |diff| (also over all prompt
    positions where the ids match);
(c) greedy generation: token-level exact match of the first ``max_new_tokens`` tokens (stopping at EOS).

BOS convention: llama.cpp adds its own BOS (``tokenizer.ggml.add_bos_token``), so a prompt rendered by a
chat template that starts with ``<bos>`` is tokenized by HF as written (``add_special_tokens=False``)
and by llama.cpp with the leading ``<bos>`` stripped and ``add_bos=True``. A prompt without a leading
BOS is tokenized by HF with ``add_special_tokens=True``. Either way both sides should produce one BOS.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def strip_leading_bos(text: str, bos_token: str | None) -> tuple[str, bool]:
    """Remove one leading BOS string (llama.cpp adds its own BOS; passing it again doubles it).

    Returns:
        ``(text_without_bos, had_bos)``.
    """
    if bos_token and text.startswith(bos_token):
        return text[len(bos_token) :], True
    return text, False


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _truncate_at_stop(seq: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(seq):
        if t in stop:
            return seq[: i + 1]
    return seq


def compare_top1(hf_last: Any, ll_last: Any, tie_tolerance: float) -> tuple[bool, dict[str, Any] | None]:
    """(same top-1?, the disagreement: HF's logit gap between its top-1 and llama.cpp's, and whether that
    gap is within ``tie_tolerance``, i.e. a near-tie that rounding can flip)."""
    hf_top, ll_top = int(hf_last.argmax()), int(ll_last.argmax())
    if hf_top == ll_top:
        return True, None
    gap = float(hf_last[hf_top] - hf_last[ll_top])
    return False, {"hf_top": hf_top, "llama_top": ll_top, "hf_gap": gap, "tie": gap <= tie_tolerance}


def parity_check(
    hf_model_dir: Path,
    gguf_file: Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    *,
    min_top1_agreement: float = 0.98,
    top1_tie_tolerance: float = 0.0,
    min_greedy_exact_match: float | None = None,
    n_threads: int | None = None,
    max_mismatch_records: int = 20,
) -> dict[str, Any]:
    """Compare an HF model directory with its GGUF export on ``prompts``.

    Args:
        hf_model_dir: the HF model the GGUF was converted from (loaded in float32, eager attention).
        gguf_file: GGUF file (any type llama.cpp loads: F16, BF16, Q8_0, ...).
        prompts: prompt texts, typically chat-template renderings (a leading ``<bos>`` is handled).
        max_new_tokens: greedy generation length compared in check (c).
        min_top1_agreement: ``passed`` needs last-position top-1 agreement >= this.
        top1_tie_tolerance: a last-position disagreement where HF's own logits for its top-1 and for
            llama.cpp's top-1 differ by at most this is a near-tie (quantization rounding between two
            almost equal candidates, not a broken export): it counts as agreement for the gate, and is
            reported in ``top1_near_ties`` with the gap. 0 = strict.
        min_greedy_exact_match: if set, ``passed`` also needs the greedy exact-match rate >= this.
        n_threads: llama.cpp threads (default: llama-cpp-python's, half the cores).
        max_mismatch_records: at most this many token-id mismatches are described in the result.

    Returns:
        A flat dict of numbers for a manifest: ``n_prompts``, ``token_ids_match_rate``,
        ``n_token_id_mismatches``, ``top1_agreement``, ``top1_agreement_all_positions``,
        ``max_abs_logit_diff``, ``mean_abs_logit_diff``, ``max_abs_logit_diff_all_positions``,
        ``hf_logit_absmax``, ``hf_top1_margin_min`` (smallest HF top-1/top-2 logit gap at the last position:
        when it is below ``max_abs_logit_diff`` a top-1 flip is rounding, e.g. on a random-init model),
        ``greedy_exact_match_rate``, ``greedy_token_agreement``, ``passed``,
        ``seconds``; plus ``token_id_mismatches`` (a short list of dicts) and ``failures`` (reasons).
    """
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    if not prompts:
        raise ValueError("parity_check needs at least one prompt")
    hf_model_dir, gguf_file = Path(hf_model_dir), Path(gguf_file)

    # ---- (a) tokenization ------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(hf_model_dir)
    hf_ids_all: list[list[int]] = []
    llama_texts: list[str] = []
    for p in prompts:
        # HF reference, independent of the llama.cpp-side handling: a rendered template carries its own
        # <bos> (apply_chat_template tokenizes with add_special_tokens=False); plain text gets HF's own.
        has_bos = bool(tok.bos_token) and p.startswith(tok.bos_token)
        hf_ids_all.append(list(tok(p, add_special_tokens=not has_bos)["input_ids"]))
        llama_texts.append(strip_leading_bos(p, tok.bos_token)[0])

    vocab = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        ll_ids_all = [
            list(vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True)) for t in llama_texts
        ]
    finally:
        vocab.close()

    mismatches: list[dict[str, Any]] = []
    for i, (h, g) in enumerate(zip(hf_ids_all, ll_ids_all, strict=True)):
        if h != g:
            d = _first_diff(h, g)
            mismatches.append(
                {
                    "prompt_index": i,
                    "hf_len": len(h),
                    "llama_len": len(g),
                    "first_diff": d,
                    "hf_ids": h[d : d + 8] if d is not None else [],
                    "llama_ids": g[d : d + 8] if d is not None else [],
                }
            )

    # ---- models -----------------------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(
        hf_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    stop: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            stop.add(src)
        elif isinstance(src, list | tuple):
            stop.update(int(x) for x in src)

    n_ctx = max(256, max(len(x) for x in ll_ids_all) + max_new_tokens + 16)
    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        logits_all=True,
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 2048),
        n_threads=n_threads,
        seed=0,
        verbose=False,
    )
    try:
        stop.add(int(llm.token_eos()))
        last_top1: list[bool] = []
        last_maxdiff: list[float] = []
        last_meandiff: list[float] = []
        last_margin: list[float] = []
        near_ties: list[dict[str, Any]] = []
        all_top1_hits = 0
        all_top1_n = 0
        all_maxdiff = 0.0
        hf_absmax = 0.0
        greedy_exact: list[bool] = []
        greedy_frac: list[float] = []

        for h_ids, l_ids in zip(hf_ids_all, ll_ids_all, strict=True):
            # ---- (b) logits -----------------------------------------------------------------
            with torch.no_grad():
                out = model(input_ids=torch.tensor([h_ids]), use_cache=True)
            hf_logits = out.logits[0].float().numpy()
            llm.reset()
            llm.eval(l_ids)
            ll_logits = np.array(llm.scores[: len(l_ids)], dtype=np.float32)
            v = min(hf_logits.shape[-1], ll_logits.shape[-1])
            hf_last, ll_last = hf_logits[-1, :v], ll_logits[-1, :v]
            diff = np.abs(hf_last - ll_last)
            agree, flip = compare_top1(hf_last, ll_last, top1_tie_tolerance)
            if flip:
                near_ties.append({"prompt": len(last_top1), **flip})
            last_top1.append(agree)
            last_maxdiff.append(float(diff.max()))
            last_meandiff.append(float(diff.mean()))
            top2 = np.partition(hf_last, -2)[-2:]
            last_margin.append(float(top2[1] - top2[0]))
            hf_absmax = max(hf_absmax, float(np.abs(hf_logits[:, :v]).max()))
            if h_ids == l_ids:
                hf_all, ll_all = hf_logits[:, :v], ll_logits[:, :v]
                all_top1_hits += int((hf_all.argmax(-1) == ll_all.argmax(-1)).sum())
                all_top1_n += len(h_ids)
                all_maxdiff = max(all_maxdiff, float(np.abs(hf_all - ll_all).max()))

            # ---- (c) greedy generation ------------------------------------------------------
            hf_gen: list[int] = []
            past, logits = out.past_key_values, out.logits[0, -1]
            with torch.no_grad():
                for step in range(max_new_tokens):
                    t = int(logits.argmax())
                    hf_gen.append(t)
                    if t in stop or step == max_new_tokens - 1:
                        break
                    o = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
                    past, logits = o.past_key_values, o.logits[0, -1]
            ll_gen: list[int] = []
            for step in range(max_new_tokens):
                t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                ll_gen.append(t)
                if t in stop or step == max_new_tokens - 1:
                    break
                llm.eval([t])
            hf_gen, ll_gen = _truncate_at_stop(hf_gen, stop), _truncate_at_stop(ll_gen, stop)
            greedy_exact.append(hf_gen == ll_gen)
            prefix = _first_diff(hf_gen, ll_gen)
            prefix = len(hf_gen) if prefix is None else prefix
            greedy_frac.append(prefix / max(len(hf_gen), len(ll_gen), 1))
    finally:
        llm.close()
        del model

    n = len(prompts)
    result: dict[str, Any] = {
        "n_prompts": n,
        "token_ids_match_rate": (n - len(mismatches)) / n,
        "n_token_id_mismatches": len(mismatches),
        "top1_agreement": sum(last_top1) / n,
        "top1_agreement_ties_ok": (sum(last_top1) + sum(t["tie"] for t in near_ties)) / n,
        "top1_tie_tolerance": top1_tie_tolerance,
        "top1_disagreements": near_ties,
        "top1_agreement_all_positions": (all_top1_hits / all_top1_n) if all_top1_n else None,
        "max_abs_logit_diff": max(last_maxdiff),
        "mean_abs_logit_diff": float(np.mean(last_meandiff)),
        "max_abs_logit_diff_all_positions": all_maxdiff if all_top1_n else None,
        "hf_logit_absmax": hf_absmax,
        "hf_top1_margin_min": min(last_margin),
        "greedy_exact_match_rate": sum(greedy_exact) / n,
        "greedy_token_agreement": float(np.mean(greedy_frac)),
        "max_new_tokens": max_new_tokens,
        "min_top1_agreement": min_top1_agreement,
        "gguf_file": str(gguf_file),
        "token_id_mismatches": mismatches[:max_mismatch_records],
    }
    failures: list[str] = []
    if mismatches:
        failures.append(f"token ids differ on {len(mismatches)}/{n} prompts")
    if result["top1_agreement_ties_ok"] < min_top1_agreement:
        gaps = ", ".join(f"{t['hf_gap']:.4g}" for t in near_ties)
        failures.append(
            f"top-1 agreement {result['top1_agreement_ties_ok']:.3f} < {min_top1_agreement} (HF logit gaps of "
            f"the disagreements: {gaps}; near-tie tolerance {top1_tie_tolerance}; max |diff| "
            f"{result['max_abs_logit_diff']:.4g})"
        )
    if min_greedy_exact_match is not None and result["greedy_exact_match_rate"] < min_greedy_exact_match:
        failures.append(
            f"greedy exact match {result['greedy_exact_match_rate']:.3f} < {min_greedy_exact_match}"
        )
    result["failures"] = failures
    result["passed"] = not failures
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    logger.info(
        "parity %s: ids %.3f top1 %.3f maxdiff %.3g greedy %.3f -> %s",
        gguf_file.name,
        result["token_ids_match_rate"],
        result["top1_agreement"],
        result["max_abs_logit_diff"],
        result["greedy_exact_match_rate"],
        "PASS" if result["passed"] else "FAIL",
    )
    return result
