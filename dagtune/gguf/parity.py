"""HF (transformers, float32) vs llama.cpp (llama-cpp-python) parity for an exported GGUF file.

Checks per prompt:

(a) token ids: the HF tokenizer vs llama.cpp's tokenizer on the same text (must be identical);
(b) next-token logits at every prompt position: top-1 agreement over all positions of all prompts is
    the gate (``min_top1_agreement``); a disagreement where HF's own logits for the two tokens differ by
    at most ``top1_tie_tolerance`` is a near-tie (rounding between almost equal candidates) and counts
    as agreement. The last position's agreement and max |diff| are reported too;
(c) greedy generation: token-level exact match of the first ``max_new_tokens`` tokens (stopping at EOS);
(d) the embedded chat template (when ``chats`` are given, e.g. the function caller's messages and
    tools): each chat is rendered by the GGUF's own ``tokenizer.chat_template`` exactly as
    llama-cpp-python's chat completion renders it for serving (``Jinja2ChatFormatter`` with the GGUF's
    BOS/EOS strings, tokenized with ``add_bos=False``, ``special=True``), generated greedily by llama.cpp,
    and compared with the HF model's greedy output on the dataset's prompt (the text the model was
    trained and evaluated on). Below ``min_template_greedy_match`` the check fails: a template lost or
    changed in conversion serves different prompts than the model learned.

llama.cpp takes the prompts in token order and evaluates each from where it leaves the previous one (its
KV cache and logit rows are kept for the shared prefix, as its own prompt cache does when serving): the
prompts of a task share their template and instruction, and in token order the function caller's prompts
with the same tools are neighbours, so most positions are computed once instead of once per prompt.

BOS convention for (a)-(c): llama.cpp adds its own BOS (``tokenizer.ggml.add_bos_token``), so a prompt
rendered by a chat template that starts with ``<bos>`` is tokenized by HF as written
(``add_special_tokens=False``) and by llama.cpp with the leading ``<bos>`` stripped and ``add_bos=True``.
A prompt without a leading BOS is tokenized by HF with ``add_special_tokens=True``. Either way both sides
should produce one BOS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# llama-cpp-python's quiet mode swaps the process's stdout/stderr file descriptors while a Llama is built
# (``suppress_stdout_stderr``): two threads doing it at once leave them pointing at /dev/null and can close
# a descriptor another thread (the CUDA driver's) just opened. Two parity checks can share a process (the
# two convert_gguf nodes under runtime.isolation: thread).
_LLAMA_LOCK = threading.Lock()


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


def _tensors(hf: Any, ll: Any) -> tuple[Any, Any]:
    """Both as torch tensors on HF's device (numpy arrays are wrapped, not copied): at real size a
    prompt's logits are positions x 262k, and the reductions below run where the HF logits are."""
    import torch

    hf = torch.as_tensor(hf)
    return hf, torch.as_tensor(ll).to(hf.device, hf.dtype)


def compare_top1(hf_last: Any, ll_last: Any, tie_tolerance: float) -> tuple[bool, dict[str, Any] | None]:
    """(same top-1?, the disagreement: HF's logit gap between its top-1 and llama.cpp's, and whether that
    gap is within ``tie_tolerance``, i.e. a near-tie that rounding can flip)."""
    hf_last, ll_last = _tensors(hf_last, ll_last)
    hf_top, ll_top = int(hf_last.argmax()), int(ll_last.argmax())
    if hf_top == ll_top:
        return True, None
    gap = float(hf_last[hf_top] - hf_last[ll_top])
    return False, {"hf_top": hf_top, "llama_top": ll_top, "hf_gap": gap, "tie": gap <= tie_tolerance}


@dataclass
class Chat:
    """A conversation the way the chat completion API receives it: rendered by a chat template."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class _Top1:
    """Running top-1 agreement of HF vs llama.cpp logits."""

    tolerance: float
    hits: int = 0
    ties: int = 0
    n: int = 0
    max_diff: float = 0.0

    def add(self, hf: Any, ll: Any) -> None:
        """``hf``/``ll``: (positions, vocab) logits of one prompt."""
        import torch

        hf, ll = _tensors(hf, ll)
        hf_top, ll_top = hf.argmax(-1), ll.argmax(-1)
        same = hf_top == ll_top
        rows = torch.arange(len(hf), device=hf.device)
        gap = hf[rows, hf_top] - hf[rows, ll_top]
        self.hits += int(same.sum())
        self.ties += int(((~same) & (gap <= self.tolerance)).sum())
        self.n += len(hf)
        self.max_diff = max(self.max_diff, float((hf - ll).abs().max()))

    def strict(self) -> float | None:
        return self.hits / self.n if self.n else None

    def ties_ok(self) -> float | None:
        return (self.hits + self.ties) / self.n if self.n else None

    def summary(self) -> dict[str, Any]:
        return {
            "top1_agreement_all_positions": self.strict(),
            "top1_agreement_all_positions_ties_ok": self.ties_ok(),
            "n_positions": self.n,
            "max_abs_logit_diff_all_positions": self.max_diff if self.n else None,
        }


@dataclass
class _Last:
    """Per-prompt numbers at the last prompt position."""

    tolerance: float
    top1: list[bool] = field(default_factory=list)
    max_diff: list[float] = field(default_factory=list)
    mean_diff: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    flips: list[dict[str, Any]] = field(default_factory=list)

    def add(self, hf_last: Any, ll_last: Any, prompt: int) -> None:
        hf_last, ll_last = _tensors(hf_last, ll_last)
        diff = (hf_last - ll_last).abs()
        agree, flip = compare_top1(hf_last, ll_last, self.tolerance)
        if flip:
            self.flips.append({"prompt": prompt, **flip})
        self.top1.append(agree)
        self.max_diff.append(float(diff.max()))
        self.mean_diff.append(float(diff.mean()))
        top2 = hf_last.topk(2).values
        self.margin.append(float(top2[0] - top2[1]))

    def summary(self, n: int) -> dict[str, Any]:
        return {
            "top1_agreement": sum(self.top1) / n,
            "top1_agreement_ties_ok": (sum(self.top1) + sum(t["tie"] for t in self.flips)) / n,
            "top1_disagreements": sorted(self.flips, key=lambda f: f["prompt"]),
            "max_abs_logit_diff": max(self.max_diff),
            "mean_abs_logit_diff": sum(self.mean_diff) / len(self.mean_diff),
            "hf_top1_margin_min": min(self.margin),
        }


def _token_ids(tok: Any, gguf_file: Path, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(HF ids, llama.cpp ids) of each prompt, with the BOS convention of the module doc."""
    import llama_cpp

    hf_ids, llama_texts = [], []
    for p in prompts:
        # HF reference, independent of the llama.cpp-side handling: a rendered template carries its own
        # <bos> (apply_chat_template tokenizes with add_special_tokens=False); plain text gets HF's own.
        has_bos = bool(tok.bos_token) and p.startswith(tok.bos_token)
        hf_ids.append(list(tok(p, add_special_tokens=not has_bos)["input_ids"]))
        llama_texts.append(strip_leading_bos(p, tok.bos_token)[0])
    with _LLAMA_LOCK:
        vocab = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        ll_ids = [list(vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True)) for t in llama_texts]
    finally:
        vocab.close()
    return hf_ids, ll_ids


def _id_mismatches(hf_ids: list[list[int]], ll_ids: list[list[int]]) -> list[dict[str, Any]]:
    out = []
    for i, (h, g) in enumerate(zip(hf_ids, ll_ids, strict=True)):
        if h != g:
            d = _first_diff(h, g)
            out.append(
                {
                    "prompt_index": i,
                    "hf_len": len(h),
                    "llama_len": len(g),
                    "first_diff": d,
                    "hf_ids": h[d : d + 8] if d is not None else [],
                    "llama_ids": g[d : d + 8] if d is not None else [],
                }
            )
    return out


def _stop_ids(model: Any, tok: Any) -> set[int]:
    stop: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            stop.add(src)
        elif isinstance(src, list | tuple):
            stop.update(int(x) for x in src)
    return stop


def _hf_greedy_batch(
    model: Any, ids_all: Sequence[list[int]], max_new_tokens: int, stop: set[int], pad_id: int, batch: int
) -> list[list[int]]:
    """Greedy continuations of ``ids_all`` by ``model.generate``, ``batch`` prompts at a time, left-padded
    (one prompt per call on the CPU: no padding, the reference bit for bit). Each is cut at its first stop
    token."""
    import torch

    from dagtune.evaluation.generate import GREEDY

    dev = next(model.parameters()).device
    out: list[list[int]] = []
    for at in range(0, len(ids_all), batch):
        rows = ids_all[at : at + batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                **GREEDY,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop),
                pad_token_id=pad_id,
            )
        out += [_truncate_at_stop(g, stop) for g in gen[:, width:].tolist()]
    return out


def _eval_reusing_prefix(llm: Any, ids: list[int]) -> int:
    """Evaluate ``ids`` from the first position where they leave what ``llm`` holds (its KV cache and
    logit rows for ``input_ids[:n_tokens]``), as llama-cpp-python's own generation and serving do with a
    shared prompt prefix: the test prompts of a task start with the same instruction (and for the
    function caller, the same developer turn and tools), so most of a prompt's positions were already
    computed for the one before. At least the last token is evaluated again. Returns the reused length."""
    held = llm.input_ids[: llm.n_tokens].tolist()
    reused = _first_diff(held, ids)
    reused = min(len(held) if reused is None else reused, len(ids) - 1)
    llm.n_tokens = reused  # eval drops the KV cache from here on
    llm.eval(ids[reused:])
    return reused


def _llama_greedy(llm: Any, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of what ``llm`` has evaluated so far."""
    import numpy as np

    gen: list[int] = []
    for step in range(max_new_tokens):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gen.append(t)
        if t in stop or step == max_new_tokens - 1:
            break
        llm.eval([t])
    return _truncate_at_stop(gen, stop)


def gguf_chat_template(llm: Any) -> str | None:
    """The GGUF's embedded ``tokenizer.chat_template`` as llama.cpp reads it (None when absent)."""
    return (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template") or None


def render_with_gguf_template(llm: Any, template: str, chat: Chat) -> list[int]:
    """Token ids of ``chat`` rendered by ``template`` the way llama-cpp-python's chat completion does
    for a GGUF that embeds it (its Jinja2 formatter, the GGUF's BOS/EOS strings, the rendered text
    tokenized with ``special=True`` and a BOS only when the formatter did not write one)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token_id: int) -> str:
        if token_id < 0:
            return ""
        return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    fmt = Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))
    res = fmt(messages=chat.messages, tools=chat.tools)
    return list(llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True))


@dataclass
class _TemplateCheck:
    """(d): greedy output through llama.cpp on the GGUF-template rendering vs HF's on the dataset prompt."""

    template: str | None
    same_ids: int = 0
    matches: list[bool] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        prompt: int,
        llm: Any,
        chat: Chat,
        dataset: tuple[list[int], list[int]],
        hf_gen: list[int],
        max_new_tokens: int,
        stop: set[int],
    ) -> None:
        """``dataset``: llama.cpp's ids of the dataset prompt and its greedy continuation (reused when
        the template renders the very same ids: llama.cpp is deterministic)."""
        import jinja2

        dataset_ids, ll_gen = dataset
        try:
            ids = render_with_gguf_template(llm, self.template or "", chat)
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # a template that cannot render it
            self.matches.append(False)
            if len(self.examples) < 5:
                self.examples.append({"prompt": prompt, "render_error": f"{type(e).__name__}: {e}"})
            return
        if ids == dataset_ids:
            self.same_ids += 1
        else:
            _eval_reusing_prefix(llm, ids)
            ll_gen = _llama_greedy(llm, max_new_tokens, stop)
        self.matches.append(ll_gen == hf_gen)
        if ll_gen != hf_gen and len(self.examples) < 5:
            self.examples.append(
                {"prompt": prompt, "rendered_len": len(ids), "dataset_len": len(dataset_ids)}
            )

    def summary(self, n: int) -> dict[str, Any]:
        return {
            "template_embedded": self.template is not None,
            "template_greedy_match_rate": (sum(self.matches) / len(self.matches)) if self.matches else 0.0,
            "template_prompt_ids_equal_rate": self.same_ids / n,
            "template_mismatch_examples": self.examples,
        }


def llama_offloads_to(device: str) -> bool:
    """Whether llama.cpp runs the check on the GPU: the HF side is on CUDA and this llama-cpp-python was
    built with a GPU backend (``CMAKE_ARGS=-DGGML_CUDA=on``; ``scripts/build_llama_cuda.sh``)."""
    import llama_cpp

    return device.startswith("cuda") and bool(llama_cpp.llama_supports_gpu_offload())


def _llama_on_gpu(device: str, asked: bool) -> bool:
    """Whether llama.cpp's side runs on the GPU: when asked and possible; asked and impossible says why."""
    gpu = asked and llama_offloads_to(device)
    if asked and not gpu:
        logger.warning(
            "llama.cpp on the GPU was asked for, but the HF side is on %s or llama-cpp-python has no GPU "
            "backend: the parity check runs llama.cpp on the CPU (build it with CMAKE_ARGS=-DGGML_CUDA=on, "
            "scripts/build_llama_cuda.sh)",
            device,
        )
    return gpu


def _open_llama(gguf_file: Path, n_ctx: int, n_threads: int | None, gpu: bool) -> Any:
    import llama_cpp

    from dagtune.slots import host_cpus

    # Prompt evaluation runs on n_threads_batch, which llama-cpp-python otherwise sets to every CPU of
    # the host (not the process's affinity): two models side by side then spun 2x the cores.
    threads = n_threads or host_cpus()
    with _LLAMA_LOCK:
        return llama_cpp.Llama(
            model_path=str(gguf_file),
            logits_all=True,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 2048),
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=-1 if gpu else 0,
            seed=0,
            verbose=False,
        )


# transformers' loading patches torch globally: two loads at once in one process fail ("Cannot copy out
# of meta tensor"), and two parity checks can share a process (runtime.isolation: thread).
_LOAD_LOCK = threading.Lock()
_TF32 = {"holders": 0, "saved": False}
_TF32_LOCK = threading.Lock()


def _hf_model(hf_model_dir: Path, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            hf_model_dir, dtype=torch.float32, attn_implementation="eager"
        )
        return model.to(device).eval()


@contextmanager
def float32_reference() -> Iterator[None]:
    """TF32 off while any parity check runs (a process-wide switch: counted, so threads nest)."""
    import torch

    with _TF32_LOCK:
        if _TF32["holders"] == 0:
            _TF32["saved"] = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
        _TF32["holders"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32["holders"] -= 1
            if _TF32["holders"] == 0:
                torch.backends.cuda.matmul.allow_tf32 = _TF32["saved"]


class _Clock:
    """Seconds per phase of a parity check, for the manifest (where a real-size check spends its time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def _greedy_batch_size(model: Any) -> int:
    """Prompts per batched HF greedy call: one on the CPU (the unpadded reference), 16 on a GPU, where
    one-token steps of a float32 model are launch-bound and a batch costs what one prompt does."""
    return 1 if next(model.parameters()).device.type == "cpu" else 16


@dataclass
class _Greedy:
    """(c): greedy continuations of the same token ids, HF vs llama.cpp."""

    exact: list[bool] = field(default_factory=list)
    agreed_prefix: list[float] = field(default_factory=list)

    def add(self, hf_gen: list[int], ll_gen: list[int]) -> None:
        self.exact.append(hf_gen == ll_gen)
        prefix = _first_diff(hf_gen, ll_gen)
        prefix = len(hf_gen) if prefix is None else prefix
        self.agreed_prefix.append(prefix / max(len(hf_gen), len(ll_gen), 1))

    def summary(self) -> dict[str, Any]:
        n = len(self.exact)
        return {
            "greedy_prompts": n,
            "greedy_exact_match_rate": sum(self.exact) / max(n, 1),
            "greedy_token_agreement": sum(self.agreed_prefix) / n if n else None,
        }


def _prompt_logits(
    model: Any, llm: Any, h_ids: list[int], l_ids: list[int], clock: _Clock
) -> tuple[Any, Any, int]:
    """One prompt's (positions, vocab) logits from both sides, on the HF model's device, and how many
    of its positions llama.cpp reused from the prompt before."""
    import numpy as np
    import torch

    with clock.phase("hf_forward"), torch.no_grad():
        out = model(input_ids=torch.tensor([h_ids], device=next(model.parameters()).device), use_cache=False)
    with clock.phase("llama_eval"):
        reused = _eval_reusing_prefix(llm, l_ids)
        ll_logits = torch.from_numpy(np.ascontiguousarray(llm.scores[: len(l_ids)], dtype=np.float32))
    v = min(out.logits.shape[-1], ll_logits.shape[-1])
    hf_logits = out.logits[0, :, :v].float()  # stays on the model's device, as do the reductions
    return hf_logits, ll_logits[:, :v].to(hf_logits.device), reused


def _compare_prompts(
    model: Any,
    llm: Any,
    hf_ids_all: list[list[int]],
    ll_ids_all: list[list[int]],
    chats: Sequence[Chat] | None,
    gen: tuple[int, set[int], int],
    tolerance: float,
    greedy_n: int,
    clock: _Clock,
) -> dict[str, Any]:
    """(b) over every prompt; (c), greedy on the same token ids, over the first ``greedy_n`` -- every
    prompt when (d) runs, which reuses it. ``gen``: (max_new_tokens, stop ids, pad id)."""
    max_new_tokens, stop, pad_id = gen
    last, allpos, greedy = _Last(tolerance), _Top1(tolerance), _Greedy()
    tpl = _TemplateCheck(gguf_chat_template(llm)) if chats is not None else None
    check_template = tpl is not None and tpl.template is not None and chats is not None
    n = len(hf_ids_all)
    n_greedy = n if check_template else min(greedy_n, n)
    with clock.phase("hf_greedy"):
        batch = _greedy_batch_size(model)
        hf_gens = _hf_greedy_batch(model, hf_ids_all[:n_greedy], max_new_tokens, stop, pad_id, batch)
    hf_absmax, reused, t_start = 0.0, 0, time.perf_counter()
    # In token order, prompts with the same instruction and tools are neighbours: each is evaluated from
    # where it leaves the one before (_eval_reusing_prefix). The sums below do not depend on the order.
    order = sorted(range(n), key=lambda i: ll_ids_all[i])
    for done, i in enumerate(order, 1):
        h_ids, l_ids = hf_ids_all[i], ll_ids_all[i]
        hf_logits, ll_logits, prefix = _prompt_logits(model, llm, h_ids, l_ids, clock)
        reused += prefix
        with clock.phase("compare"):
            last.add(hf_logits[-1], ll_logits[-1], i)
            hf_absmax = max(hf_absmax, float(hf_logits.abs().max()))
            if h_ids == l_ids:
                allpos.add(hf_logits, ll_logits)
            del hf_logits, ll_logits
        if i < n_greedy:
            with clock.phase("llama_greedy"):
                ll_gen = _llama_greedy(llm, max_new_tokens, stop)  # the template check reuses it
            greedy.add(hf_gens[i], ll_gen)
            if check_template:
                with clock.phase("template"):
                    tpl.add(i, llm, chats[i], (l_ids, ll_gen), hf_gens[i], max_new_tokens, stop)
        if done % 16 == 0 and done < n:
            logger.info("parity: %d/%d prompts compared in %.1fs", done, n, time.perf_counter() - t_start)
    return {
        "llama_positions_evaluated": sum(map(len, ll_ids_all)) - reused,
        "llama_positions_reused": reused,
        **last.summary(n),
        **allpos.summary(),
        "hf_logit_absmax": hf_absmax,
        **greedy.summary(),
        **(tpl.summary(n) if tpl is not None else {}),
    }


def _failures(
    r: dict[str, Any],
    n: int,
    n_mismatch: int,
    min_top1: float,
    min_greedy: float | None,
    min_template: float | None,
) -> list[str]:
    failures: list[str] = []
    if n_mismatch:
        failures.append(f"token ids differ on {n_mismatch}/{n} prompts")
    top1 = r["top1_agreement_all_positions_ties_ok"]
    if top1 is not None and top1 < min_top1:
        failures.append(
            f"top-1 agreement over all {r['n_positions']} prompt positions {top1:.4f} < {min_top1} (strict "
            f"{r['top1_agreement_all_positions']:.4f}; near-tie tolerance {r['top1_tie_tolerance']}; last "
            f"position {r['top1_agreement']:.3f}; max |diff| {r['max_abs_logit_diff_all_positions']:.4g})"
        )
    if min_greedy is not None and r["greedy_exact_match_rate"] < min_greedy:
        failures.append(f"greedy exact match {r['greedy_exact_match_rate']:.3f} < {min_greedy}")
    if min_template is not None and "template_embedded" in r:
        if not r["template_embedded"]:
            failures.append(
                "the GGUF has no embedded chat template (tokenizer.chat_template): llama.cpp's chat "
                "completion cannot render the prompts the model was trained on"
            )
        elif r["template_greedy_match_rate"] < min_template:
            failures.append(
                f"greedy output on prompts rendered by the GGUF's embedded chat template equals the HF "
                f"model's on {r['template_greedy_match_rate']:.3f} of prompts < {min_template} (rendered "
                f"prompt ids equal the dataset's on {r['template_prompt_ids_equal_rate']:.3f}): the "
                "template was lost or changed in conversion"
            )
    return failures


def parity_check(
    hf_model_dir: Path,
    gguf_file: Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    *,
    min_top1_agreement: float = 0.98,
    top1_tie_tolerance: float = 0.0,
    min_greedy_exact_match: float | None = None,
    chats: Sequence[Chat] | None = None,
    min_template_greedy_match: float = 0.95,
    device: str = "cpu",
    n_threads: int | None = None,
    max_mismatch_records: int = 20,
    greedy_prompts: int | None = None,
    llama_gpu: bool = False,
) -> dict[str, Any]:
    """Compare an HF model directory (float32, eager attention, on ``device``; TF32 off) with its GGUF
    export on ``prompts``: checks (a)-(d) of the module doc; ``chats`` (the conversations ``prompts`` were
    rendered from, same order) turn on (d), and (c) runs on the first ``greedy_prompts`` (None: all).
    ``passed`` needs identical token ids, all-position top-1 agreement (near-ties within
    ``top1_tie_tolerance`` agree) >= ``min_top1_agreement``, and where set the greedy and (d) rates at
    their minimums. ``llama_gpu``: llama.cpp's side on the GPU where possible. Returns a flat dict for a
    manifest: the rates, logit differences, ``phase_seconds``, ``passed``, ``failures`` (reasons),
    ``seconds`` and up to ``max_mismatch_records`` ``token_id_mismatches``."""
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    if not prompts:
        raise ValueError("parity_check needs at least one prompt")
    if chats is not None and len(chats) != len(prompts):
        raise ValueError(f"parity_check got {len(chats)} chats for {len(prompts)} prompts")
    hf_model_dir, gguf_file = Path(hf_model_dir), Path(gguf_file)
    clock = _Clock()
    with clock.phase("tokenize"):
        with _LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(hf_model_dir)
        hf_ids_all, ll_ids_all = _token_ids(tok, gguf_file, prompts)
    mismatches = _id_mismatches(hf_ids_all, ll_ids_all)
    with clock.phase("load_hf"):
        model = _hf_model(hf_model_dir, device)
    stop = _stop_ids(model, tok)
    # room for the longest prompt, its continuation and (d)'s rendering by another template
    n_ctx = max(256, max(map(len, ll_ids_all)) + max_new_tokens + 16) + (256 if chats is not None else 0)
    gpu = _llama_on_gpu(device, llama_gpu)
    with clock.phase("load_llama"):
        llm = _open_llama(gguf_file, n_ctx, n_threads, gpu)
    try:
        with float32_reference():  # the reference stays float32 on a GPU
            stop.add(int(llm.token_eos()))
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
            compared = _compare_prompts(
                model, llm, hf_ids_all, ll_ids_all, chats, (max_new_tokens, stop, pad_id),
                top1_tie_tolerance, len(prompts) if greedy_prompts is None else greedy_prompts, clock,
            )  # fmt: skip
    finally:
        llm.close()
        del model
    n = len(prompts)
    result: dict[str, Any] = {
        "n_prompts": n,
        "token_ids_match_rate": (n - len(mismatches)) / n,
        "n_token_id_mismatches": len(mismatches),
        "top1_tie_tolerance": top1_tie_tolerance,
        **compared,
        "max_new_tokens": max_new_tokens,
        "min_top1_agreement": min_top1_agreement,
        "gguf_file": str(gguf_file),
        "llama_device": "gpu" if gpu else "cpu",
        "phase_seconds": clock.rounded(),
        "token_id_mismatches": mismatches[:max_mismatch_records],
    }
    min_template = min_template_greedy_match if chats is not None else None
    result["failures"] = _failures(
        result, n, len(mismatches), min_top1_agreement, min_greedy_exact_match, min_template
    )
    result["passed"] = not result["failures"]
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    _log_result(gguf_file, result)
    return result


def _log_result(gguf_file: Path, result: dict[str, Any]) -> None:
    logger.info(
        "parity %s: ids %.3f top1(all) %s maxdiff %.3g greedy %.3f template %s -> %s in %.1fs (llama.cpp on "
        "%s; %s)",
        gguf_file.name,
        result["token_ids_match_rate"],
        result["top1_agreement_all_positions_ties_ok"],
        result["max_abs_logit_diff"],
        result["greedy_exact_match_rate"],
        result.get("template_greedy_match_rate"),
        "PASS" if result["passed"] else "FAIL",
        result["seconds"],
        result["llama_device"],
        ", ".join(f"{k} {v:.1f}s" for k, v in result["phase_seconds"].items()),
    )
