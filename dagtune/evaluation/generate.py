"""Batched greedy generation, identical for base and fine-tuned models.

Decoding contract (``decoding_config``): left padding, the rendered prompt tokenized with
``add_special_tokens=False`` (it already starts with ``<bos>``), greedy (``do_sample=False``, no
top-k/top-p whatever the model's ``generation_config`` says), at most ``max_new_tokens`` new tokens.
A row stops at

* a stop token: the tokenizer's EOS, ``<end_of_turn>`` and the model's own generation-config EOS ids;
  the new tokens are cut before it (it is not part of the returned text);
* a task's stop string (``TASK_STOP_STRINGS``: ``<end_function_call>`` for function calling, ``</eq>``
  for the extractor): the answer is complete once it is written, so the row stops there and the text
  is cut right after it (kept: the parsers read it).

Text is decoded with ``skip_special_tokens=False`` so the FunctionGemma control tokens
(``<start_function_call>``, ``<escape>`` ...) stay in the text for the parser. fp32 on CPU, bf16 on
CUDA.

Speed: prompts are sorted longest first and generated in batches through ``model.generate`` (one KV
cache per batch, reused across its decode steps). Each row stops on its own (a stopping criterion per
row); a finished row rides along as padding until the batch's last row stops, which costs next to
nothing in a memory-bound decode step, and the batch ends as soon as every row has stopped. Batches
never change a row's tokens: greedy per row is the same batched or alone (tested on CPU). On CUDA the
batch size is chosen from free memory and the model's KV-cache bytes per token (``batch_size=None``);
on CPU it is the configured one.

Heavy imports (torch, transformers) happen inside functions only.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagtune.formats import END_CALL, END_OF_TURN, EQ_CLOSE
from dagtune.runtime import resolve_device

log = logging.getLogger("dagtune.evaluation")

# Stop tokens every generative model of the project shares (when its vocabulary has them).
STOP_TOKENS = (END_OF_TURN,)
# Strings that end a task's answer; kept in the text (the parsers expect them).
TASK_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "function_calling": (END_CALL,),
    "extractor": (EQ_CLOSE,),
}
# Auto batch size on CUDA: at most this many rows, using at most this share of the free memory.
DEFAULT_MAX_AUTO_BATCH = 256
DEFAULT_MEMORY_FRACTION = 0.5


def resolve_model_path(model: str, store: Any = None) -> str:
    """A directory passes through; a name (tiny-*, hub id) goes through ``dagtune.models.resolve_model``."""
    if Path(model).is_dir() or store is None:
        return str(model)
    from dagtune.models import resolve_model

    return resolve_model(model, store)


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """K and V bytes one token takes in the cache of every layer (sliding-window layers counted in
    full: an upper bound)."""
    cfg = getattr(config, "text_config", None) or config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def row_bytes(config: Any, dtype_bytes: int, seq_len: int) -> int:
    """Memory one row of a batch needs: its KV cache over ``seq_len`` tokens, the prefill's largest
    activations (the MLP's two intermediate tensors, a few hidden-size ones) and one fp32 row of logits."""
    cfg = getattr(config, "text_config", None) or config
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    prefill = seq_len * (2 * inter + 4 * cfg.hidden_size) * dtype_bytes
    return kv_bytes_per_token(config, dtype_bytes) * seq_len + prefill + 4 * cfg.vocab_size


def memory_batch_size(
    config: Any, dtype_bytes: int, seq_len: int, free_bytes: int, fraction: float, cap: int
) -> int:
    """Rows of ``seq_len`` tokens that fit in ``fraction`` of ``free_bytes`` (at least 1, at most ``cap``)."""
    fit = int(free_bytes * fraction) // max(1, row_bytes(config, dtype_bytes, seq_len))
    return max(1, min(cap, fit))


# Plain greedy decoding whatever a model's generation_config samples with.
GREEDY: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "top_k": None,
    "top_p": None,
    "temperature": None,
}


class _StopOnStrings:
    """Per-row stopping criterion for ``model.generate``: True for a row whose new tokens contain one of
    ``stops``. Only a short window of the newest tokens is decoded each step: an occurrence that ends
    earlier was already seen at an earlier step."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len
        self.window = max(len(s) for s in self.stops) + 2  # a token holds at least one character

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.prompt_len :]
        tail = new[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        hit = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(tokenizer: Any, stops: Sequence[str], prompt_len: int) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(_StopOnStrings, StoppingCriteria):
        pass

    return StoppingCriteriaList([StopOnStrings(tokenizer, stops, prompt_len)])


def _cut_at_string(tokenizer: Any, ids: list[int], stops: Sequence[str]) -> int | None:
    """Fewest leading tokens of ``ids`` whose text contains a stop string (None: none does). Containment
    only grows with the prefix, so a binary search finds it."""
    if not stops or not any(s in tokenizer.decode(ids, skip_special_tokens=False) for s in stops):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(ids[:mid], skip_special_tokens=False) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Generation:
    text: str  # new tokens up to the first stop token (excluded) or stop string (included)
    finished: bool  # a stop token or stop string was generated (False: cut by max_new_tokens)
    new_tokens: int  # tokens generated before the stop token / up to the end of the stop string
    stop_id: int | None = None  # the stop token generated (None: a stop string or max_new_tokens)


class Generator:
    """A loaded causal LM + tokenizer that generates with the project's fixed decoding."""

    def __init__(
        self,
        model_path: str,
        *,
        adapter_path: str | None = None,
        device: str = "auto",
        dtype: Any = None,
        extra_stop_tokens: tuple[str, ...] = (),
        max_auto_batch: int = DEFAULT_MAX_AUTO_BATCH,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    ) -> None:
        """``model_path``: a full causal LM (a merged fine-tune or a base). ``adapter_path``: a PEFT
        adapter merged into ``model_path`` on load (for fine-tunes saved without ``merged/``).
        ``extra_stop_tokens``: more stop tokens (in the vocabulary) for callers other than evaluate.
        ``max_auto_batch`` / ``memory_fraction``: bounds of the CUDA batch size chosen by memory."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.adapter_path = str(adapter_path) if adapter_path else None
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.dtype = dtype
        self.max_auto_batch, self.memory_fraction = int(max_auto_batch), float(memory_fraction)
        tok_dir = self.model_path
        if self.adapter_path and (Path(self.adapter_path) / "tokenizer_config.json").is_file():
            tok_dir = self.adapter_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # device_map on CUDA: a pre-quantized checkpoint (a bnb-4bit base) is placed at load and
        # cannot be moved with .to() afterwards.
        kw: dict[str, Any] = {"device_map": {"": self.device}} if self.device == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype, **kw)
        if self.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter_path).merge_and_unload()
        self.model = model if self.device == "cuda" else model.to(self.device)
        self.model.eval()
        self.stop_ids = self._stop_ids(extra_stop_tokens)

    def _stop_ids(self, extra: tuple[str, ...] = ()) -> list[int]:
        ids: list[int] = []
        cfg_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if cfg_eos is not None:
            ids.extend([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos))
        vocab = self.tokenizer.get_vocab()
        for tok in (*STOP_TOKENS, *extra, self.tokenizer.eos_token):
            if tok and tok in vocab:
                ids.append(vocab[tok])
        return sorted(set(ids))

    def decoding_config(
        self, batch_size: int | None, max_new_tokens: int, stop_strings: Sequence[str] = ()
    ) -> dict[str, Any]:
        """What decides the generated text besides the weights; equal for a base and its fine-tune.
        (The batch size is recorded, but it does not change a row's tokens.)"""
        return {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": int(max_new_tokens),
            "batch_size": int(batch_size) if batch_size else f"auto (<= {self.max_auto_batch}, by memory)",
            "padding_side": self.tokenizer.padding_side,
            "add_special_tokens": False,
            "skip_special_tokens": False,
            "stop_tokens": sorted(self.tokenizer.convert_ids_to_tokens(self.stop_ids)),
            "stop_strings": list(stop_strings),
            "pad_token": self.tokenizer.pad_token,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
        }

    def _batch_size(self, batch_size: int | None, longest: int, max_new_tokens: int) -> int:
        """The configured size, or (``None``, CUDA only) what fits in free memory for rows of
        ``longest + max_new_tokens`` tokens."""
        if batch_size:
            return int(batch_size)
        if self.device != "cuda":
            raise ValueError("batch_size=None (chosen by memory) needs CUDA; give a batch size on CPU")
        import torch

        free, _total = torch.cuda.mem_get_info()
        dtype_bytes = torch.finfo(self.dtype).bits // 8
        return memory_batch_size(
            self.model.config,
            dtype_bytes,
            longest + max_new_tokens,
            free,
            self.memory_fraction,
            self.max_auto_batch,
        )

    def _generate_batch(
        self, prompts: list[str], max_new_tokens: int, stop_strings: Sequence[str]
    ) -> list[list[int]]:
        """New token ids of each prompt (a finished row padded to the batch's longest)."""
        import torch

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        kw: dict[str, Any] = {}
        if stop_strings:
            kw["stopping_criteria"] = _stopping_criteria(tok, stop_strings, prompt_len)
        with torch.inference_mode():
            gen = self.model.generate(
                **enc,
                **GREEDY,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=tok.pad_token_id,
                **kw,
            )
        return gen[:, prompt_len:].tolist()

    def _to_generation(self, ids: list[int], stop_strings: Sequence[str]) -> Generation:
        stop = set(self.stop_ids)
        cut = next((j for j, t in enumerate(ids) if t in stop), None)
        kept = ids if cut is None else ids[:cut]
        at_string = _cut_at_string(self.tokenizer, kept, stop_strings)
        if at_string is not None:
            kept = kept[:at_string]
            text = self.tokenizer.decode(kept, skip_special_tokens=False)
            ends = [text.find(s) + len(s) for s in stop_strings if s in text]
            return Generation(text=text[: min(ends)], finished=True, new_tokens=len(kept))
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return Generation(
            text=text,
            finished=cut is not None,
            new_tokens=len(kept),
            stop_id=None if cut is None else ids[cut],
        )

    def generate(
        self,
        prompts: list[str],
        batch_size: int | None,
        max_new_tokens: int,
        stop_strings: Sequence[str] = (),
    ) -> list[Generation]:
        """Greedy generations of ``prompts`` in input order. ``batch_size=None``: chosen by memory
        (CUDA). ``stop_strings``: end a row once written (kept in its text), e.g. ``TASK_STOP_STRINGS``."""
        if not prompts:
            return []
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        # Longest first in a batch of similar lengths: little padding, and OOM (if any) shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        out: list[Generation | None] = [None] * len(prompts)
        start = 0
        while start < len(order):
            size = self._batch_size(batch_size, lengths[order[start]], max_new_tokens)
            idx = order[start : start + size]
            new = self._generate_batch([prompts[i] for i in idx], max_new_tokens, stop_strings)
            for row, ids in zip(idx, new, strict=True):
                out[row] = self._to_generation(ids, stop_strings)
            start += size
        return [g for g in out if g is not None]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generate(
    model_dir_or_name: str,
    prompts: list[str],
    batch_size: int | None,
    max_new_tokens: int,
    *,
    device: str = "auto",
    store: Any = None,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy texts for ``prompts`` (see the module doc for the decoding); one model load per call."""
    t0 = time.time()
    g = Generator(resolve_model_path(model_dir_or_name, store), device=device)
    try:
        texts = [x.text for x in g.generate(prompts, batch_size, max_new_tokens, stop_strings)]
    finally:
        g.close()
    log.info("generated %d texts with %s in %.1fs", len(texts), model_dir_or_name, time.time() - t0)
    return texts
