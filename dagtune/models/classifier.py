"""The solution classifier as a model: ``LastTokenClassifier`` (a decoder body -> the hidden state of
the last non-pad token -> an fp32 ``nn.Linear`` head), its tokenization and padding, and the loader that
rebuilds it from a ``train_classifier`` artifact alone (evaluation and the registry's pyfunc use it;
``dagtune.training.classifier`` trains it).

Pooling: the index of the last token whose attention mask is 1, and position ids counted from the
mask, so left and right padding give the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "classifier_config.json"
HEAD_FILE = "head.safetensors"
REFERENCE_FILE = "reference_logits.json"
LABELS = {0: "correct", 1: "flawed"}


def ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def last_token_index(attention_mask: Any) -> Any:
    """Index of the last position with mask 1 in each row: right padding -> length-1, left -> L-1."""
    import torch

    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask.long()).argmax(dim=-1)


def decoder_of(lm: Any) -> Any:
    """The transformer body (no LM head) of a causal LM, a peft model around one, or Unsloth's."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None:
            return dec
    return base.model


def _make_module_class() -> type:
    import torch
    from torch import nn

    class LastTokenClassifier(nn.Module):
        """backbone (decoder body, LoRA inside) -> hidden state at the last non-pad token -> Linear."""

        def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(hidden_size, num_labels, dtype=torch.float32)
            self.tokenizer: Any = None
            self.max_length: int | None = None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            idx = last_token_index(attention_mask)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            return self.head(pooled.to(self.head.weight.dtype))

        @property
        def device(self) -> torch.device:
            return self.head.weight.device

        @torch.no_grad()
        def logits(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
            """Logits for rendered prompts (the prepare_data ``prompt`` column), in the given order."""
            if self.tokenizer is None:
                raise RuntimeError("no tokenizer attached: build the classifier with load_classifier()")
            was_training = self.training
            self.eval()
            enc = encode(self.tokenizer, list(texts), self.max_length)
            out = []
            for i in range(0, len(enc), batch_size):
                batch = collate(enc[i : i + batch_size], self.tokenizer, self.device)
                out.append(self(batch["input_ids"], batch["attention_mask"]).float().cpu())
            self.train(was_training)
            return torch.cat(out) if out else torch.empty(0, self.head.out_features)

        def predict_proba(self, texts: list[str], batch_size: int = 16) -> Any:
            """Class probabilities, shape (len(texts), num_labels); column 1 = P(flawed)."""
            return self.logits(texts, batch_size).softmax(-1).numpy()

    return LastTokenClassifier


_CLS: type | None = None


def LastTokenClassifier(backbone: Any, hidden_size: int, num_labels: int) -> Any:  # noqa: N802
    """Build the classifier module (the class is created on first use: torch is imported lazily)."""
    global _CLS
    if _CLS is None:
        _CLS = _make_module_class()
    return _CLS(backbone, hidden_size, num_labels)


def encode(tokenizer: Any, texts: list[str], max_length: int | None) -> list[list[int]]:
    """Token ids of rendered prompts, no special tokens added (the template already has them). Longer
    than ``max_length``: the end is kept, so the pooled token is still the prompt's last one."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [x[-max_length:] if max_length and len(x) > max_length else x for x in ids]


def collate(rows: list[list[int]], tokenizer: Any, device: Any = "cpu") -> dict[str, Any]:
    """Pad to the longest row, on the tokenizer's padding side."""
    import torch

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if tok.padding_side == "left":
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ----------------------------------------------------------------------------------------------
# loading from the artifact
# ----------------------------------------------------------------------------------------------
def load_classifier(
    artifact_dir: str | os.PathLike[str], device: str = "cpu", dtype: Any = None
) -> tuple[Any, Any]:
    """Rebuild the trained classifier from its artifact directory alone: (model, tokenizer), in eval
    mode, with ``model.predict_proba(texts)``. Uses merged/ when present; otherwise the recorded base
    model path (or hub id) plus adapter/."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(artifact_dir)
    conf = json.loads((d / CONFIG_FILE).read_text())
    dtype = dtype or getattr(torch, conf.get("merged_dtype") or "float32")
    tok = AutoTokenizer.from_pretrained(str(d / conf.get("tokenizer", "tokenizer")))
    ensure_pad_token(tok)
    # straight onto the device: a real-size base is loaded, merged and moved once, not via host memory
    place = {"device_map": {"": device}} if str(device).startswith("cuda") else {}
    if (d / "merged").is_dir():
        lm = AutoModelForCausalLM.from_pretrained(str(d / "merged"), dtype=dtype, **place)
    else:
        from peft import PeftModel

        base_ref = conf["base_model_path"]
        if not Path(base_ref).is_dir():
            from dagtune.models import is_tiny

            if is_tiny(conf["base_model"]):
                raise FileNotFoundError(
                    f"{d}: no merged/ and the tiny base model directory {base_ref} is gone; train with "
                    "save_merged: true or rebuild the tiny model"
                )
            base_ref = conf["base_model"]  # a hub id (or a path that moved back)
        base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype, **place)
        if len(tok) > base.get_input_embeddings().weight.shape[0]:  # Unsloth added a pad token
            base.resize_token_embeddings(len(tok))
        lm = PeftModel.from_pretrained(base, str(d / conf.get("adapter", "adapter"))).merge_and_unload()
    model = LastTokenClassifier(decoder_of(lm), conf["hidden_size"], conf["num_labels"])
    model.head.load_state_dict(load_file(str(d / conf.get("head", HEAD_FILE))))
    model.tokenizer, model.max_length = tok, conf["max_length"]
    model.to(device)
    model.eval()
    return model, tok


def predict_proba(artifact_or_model: Any, texts: list[str], batch_size: int = 16) -> Any:
    """P(label) for rendered prompts, from a loaded classifier or an artifact directory."""
    model = artifact_or_model
    if isinstance(model, (str, os.PathLike)):
        model, _ = load_classifier(model)
    return model.predict_proba(texts, batch_size)
