"""Batched greedy generation, identical for base and fine-tuned models.

Decoding contract (``decoding_config``): left padding, the rendered prompt tokenized with
``add_special_tokens=False`` (it already starts with ``<bos>``), greedy (``do_sample=False``, no
top-k/top-p whatever the model's ``generation_config`` says), at most ``max_new_tokens`` new tokens,
stop at the tokenizer's EOS, ``<end_of_turn>`` and the model's own generation-config EOS ids. The new
tokens are cut at the first stop token and decoded with ``skip_special_tokens=False`` so the
FunctionGemma control tokens (``<start_function_call>``, ``<escape>`` ...) stay in the text for the
parser; the stop token itself is not part of the returned text. fp32 on CPU, bf16 on CUDA.

Heavy imports (torch, transformers) happen inside functions only.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagtune.formats import END_OF_TURN
from dagtune.runtime import resolve_device

log = logging.getLogger("dagtune.evaluation")

# Stop tokens every generative model of the project shares (when its vocabulary has them).
STOP_TOKENS = (END_OF_TURN,)


def resolve_model_path(model: str, store: Any = None) -> str:
    """A directory passes through; a name (tiny-*, hub id) goes through ``dagtune.models.resolve_model``."""
    if Path(model).is_dir() or store is None:
        return str(model)
    from dagtune.models import resolve_model

    return resolve_model(model, store)


@dataclass
class Generation:
    text: str  # new tokens up to (not including) the first stop token
    finished: bool  # a stop token was generated (False: cut by max_new_tokens)
    new_tokens: int  # tokens generated before the stop token
    stop_id: int | None = None  # the stop token generated (None: cut by max_new_tokens)


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
    ) -> None:
        """``model_path``: a full causal LM (a merged fine-tune or a base). ``adapter_path``: a PEFT
        adapter merged into ``model_path`` on load (for fine-tunes saved without ``merged/``).
        ``extra_stop_tokens``: more stop tokens (in the vocabulary) for callers other than evaluate."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.adapter_path = str(adapter_path) if adapter_path else None
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.dtype = dtype
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

    def decoding_config(self, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
        """What decides the generated text besides the weights; equal for a base and its fine-tune."""
        return {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": int(max_new_tokens),
            "batch_size": int(batch_size),
            "padding_side": self.tokenizer.padding_side,
            "add_special_tokens": False,
            "skip_special_tokens": False,
            "stop_tokens": sorted(self.tokenizer.convert_ids_to_tokens(self.stop_ids)),
            "pad_token": self.tokenizer.pad_token,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
        }

    def generate(self, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[Generation]:
        import torch

        if not prompts:
            return []
        tok = self.tokenizer
        lengths = [len(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        # Longest first in a batch of similar lengths: little padding, and OOM (if any) shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        out: list[Generation | None] = [None] * len(prompts)
        stop = set(self.stop_ids)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    do_sample=False,
                    num_beams=1,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.stop_ids,
                    pad_token_id=tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for row, ids in zip(idx, new, strict=True):
                cut = next((j for j, t in enumerate(ids) if t in stop), None)
                kept = ids if cut is None else ids[:cut]
                out[row] = Generation(
                    text=tok.decode(kept, skip_special_tokens=False),
                    finished=cut is not None,
                    new_tokens=len(kept),
                    stop_id=None if cut is None else ids[cut],
                )
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
    batch_size: int,
    max_new_tokens: int,
    *,
    device: str = "auto",
    store: Any = None,
) -> list[str]:
    """Greedy texts for ``prompts`` (see the module doc for the decoding); one model load per call."""
    t0 = time.time()
    g = Generator(resolve_model_path(model_dir_or_name, store), device=device)
    try:
        texts = [x.text for x in g.generate(prompts, batch_size, max_new_tokens)]
    finally:
        g.close()
    log.info("generated %d texts with %s in %.1fs", len(texts), model_dir_or_name, time.time() - t0)
    return texts
