"""The hardware decision, made once per node (training and generation resolve their device here): device, compute dtype, backend (``hf`` = transformers +
peft + TRL, ``unsloth``), attention implementation and 4-bit loading, each with the reason it was
taken; ``Runtime.manifest()`` goes into the training node's metrics. Model loading, LoRA wrapping,
merging and the merged save go through the ``Runtime``, and this is the one module that imports
Unsloth (``unsloth_module``): it patches transformers/peft/TRL on import, so it must come first.

Nothing here imports torch at module level: ``key_inputs_for`` runs while planning the DAG.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagtune.config import UNSLOTH_MULTI_GPU
from dagtune.models.classifier import ensure_pad_token

log = logging.getLogger("dagtune.training")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    """Whether the unsloth package is importable (checked without importing it: that patches torch)."""
    return importlib.util.find_spec("unsloth") is not None


def unsloth_module(submodule: str = "") -> Any:
    """``unsloth`` (or one of its submodules), imported here only: the one place the project does."""
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)

    return importlib.import_module(f"unsloth.{submodule}" if submodule else "unsloth")


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``cuda``; ``auto`` asks torch (imported only then, so a CPU profile plans without it).
    Training and generation both resolve through here."""
    if device in ("cpu", "cuda"):
        return device
    return "cuda" if cuda_available() else "cpu"


def resolve_backend(runtime: Any, device: str | None = None, gpus: int = 1) -> str:
    """``unsloth`` or ``hf``. auto: unsloth iff the device is CUDA, the package is installed and the node
    runs on one GPU (``gpus``: the node section's; data parallel runs on the hf backend)."""
    device = device or resolve_device(runtime.device)
    if runtime.backend == "hf":
        return "hf"
    if runtime.backend == "unsloth" and gpus > 1:
        raise RuntimeError(f"runtime.backend=unsloth with gpus={gpus}: {UNSLOTH_MULTI_GPU}")
    if runtime.backend == "unsloth":
        if device != "cuda":
            raise RuntimeError(
                "runtime.backend=unsloth needs a CUDA device (runtime.device resolved to 'cpu'); "
                "use backend 'hf' or 'auto' on CPU"
            )
        if not unsloth_installed():
            raise RuntimeError(
                "runtime.backend=unsloth but the unsloth package is not installed; install the 'gpu' extra "
                "(pip install -e '.[gpu]') or set runtime.backend to 'auto' or 'hf'"
            )
        return "unsloth"
    return "unsloth" if device == "cuda" and gpus == 1 and unsloth_installed() else "hf"


def key_inputs_for(section: Any, runtime: Any, store_root: Path) -> dict[str, Any]:
    """Extra key inputs of a training node: a CPU artifact is never reused on a GPU worker (or with the
    other backend), and a changed local/tiny base model retrains."""
    from dagtune.models import model_fingerprint
    from dagtune.store import ArtifactStore

    device = resolve_device(runtime.device)
    return {
        "device": device,
        "backend": resolve_backend(runtime, device, section.gpus),
        "model": model_fingerprint(
            section.model.name, ArtifactStore(store_root), section.model.revision, "model.revision"
        ),
    }


COMPILE_CACHES = (
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("TRITON_CACHE_DIR", "triton"),
    ("UNSLOTH_COMPILE_LOCATION", "unsloth"),  # Unsloth's generated modules (else ./unsloth_compiled_cache)
)


def set_compile_cache(state_dir: Path | None) -> dict[str, str]:
    """Inductor, Triton and Unsloth compile caches under ``<state_dir>/compile_cache`` unless the
    environment already names them, so a nightly run reuses the kernels the previous one compiled.
    Must run before Unsloth is imported (it reads its location at import)."""
    chosen = {}
    for var, sub in COMPILE_CACHES:
        if state_dir is not None and not os.environ.get(var):
            os.environ[var] = str(Path(state_dir) / "compile_cache" / sub)
        if os.environ.get(var):
            chosen[var] = os.environ[var]
    return chosen


def set_unsloth_compile(enabled: bool) -> None:
    """UNSLOTH_COMPILE_DISABLE for this process. Unsloth reads it once, at import: a later node asking
    for the other setting cannot get it in the same process, which is an error, not a silent no-op."""
    import sys

    want = "0" if enabled else "1"
    if "unsloth" in sys.modules and os.environ.get("UNSLOTH_COMPILE_DISABLE", "0") != want:
        raise RuntimeError(
            f"runtime.unsloth_compile={enabled} but Unsloth was already imported in this process with "
            f"UNSLOTH_COMPILE_DISABLE={os.environ.get('UNSLOTH_COMPILE_DISABLE', '0')}"
        )
    os.environ["UNSLOTH_COMPILE_DISABLE"] = want


@dataclass
class Loaded:
    model: Any  # a peft model (LoRA injected)
    tokenizer: Any
    model_path: str
    target_modules: list[str]


@dataclass(frozen=True)
class Runtime:
    device: str  # cpu | cuda
    backend: str  # hf | unsloth
    dtype: Any  # torch dtype of the computation
    load_in_4bit: bool
    attn_implementation: str
    reasons: dict[str, str] = field(default_factory=dict)
    compile_cache: dict[str, str] = field(default_factory=dict)

    @classmethod
    def decide(
        cls, runtime_cfg: Any, model_cfg: Any, state_dir: Path | None = None, gpus: int = 1
    ) -> Runtime:
        """Everything hardware-dependent, decided once from the runtime section and the model section
        (``gpus``: the node's, which rules out Unsloth above one)."""
        device = resolve_device(runtime_cfg.device)
        if device == "cuda" and not cuda_available():
            raise RuntimeError("runtime.device=cuda but torch sees no CUDA device")
        backend = resolve_backend(runtime_cfg, device, max(gpus, world_size()))
        caches = set_compile_cache(state_dir)
        if backend == "unsloth":
            set_unsloth_compile(runtime_cfg.unsloth_compile)
            unsloth_module()
        why = {
            "device": f"runtime.device={runtime_cfg.device}"
            + (" (CUDA present)" if device == "cuda" else ""),
            "backend": f"runtime.backend={runtime_cfg.backend} on {device}"
            + (" (auto: unsloth on CUDA where installed, else hf)" if runtime_cfg.backend == "auto" else ""),
        }
        dtype, why["dtype"] = _compute_dtype(model_cfg.dtype, device)
        four_bit = bool(model_cfg.load_in_4bit) and device == "cuda"
        why["load_in_4bit"] = f"model.load_in_4bit={model_cfg.load_in_4bit}"
        if model_cfg.load_in_4bit and not four_bit:
            why["load_in_4bit"] += ", ignored: bitsandbytes NF4 needs CUDA"
            log.warning("model.load_in_4bit ignored on CPU (bitsandbytes NF4 needs CUDA)")
        attn, why["attn_implementation"] = (
            ("sdpa", "SDPA: builds the block-diagonal mask packing needs from position ids")
            if backend == "hf"
            else ("unsloth", "Unsloth's patched attention")
        )
        if backend == "unsloth":
            why["unsloth_compile"] = f"runtime.unsloth_compile={runtime_cfg.unsloth_compile}"
        return cls(device, backend, dtype, four_bit, attn, why, caches)

    # -- what the manifest records -----------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.backend,
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "load_in_4bit": self.load_in_4bit,
            "attn_implementation": self.attn_implementation,
            "runtime_reasons": dict(self.reasons),
        }
        if self.backend == "unsloth":
            from importlib import metadata

            try:
                info["unsloth_version"] = metadata.version("unsloth")
            except metadata.PackageNotFoundError:  # a stand-in module (tests)
                info["unsloth_version"] = None
        return info

    def precision_args(self) -> dict[str, Any]:
        """TrainingArguments' precision and device flags."""
        import torch

        cuda = self.device == "cuda"
        return {"bf16": cuda and self.dtype == torch.bfloat16, "fp16": cuda and self.dtype == torch.float16,
                "use_cpu": not cuda}  # fmt: skip

    def optimizer(self, name: str) -> str:
        if name != "adamw_torch" and self.device != "cuda":
            log.warning("optim.optimizer=%s needs bitsandbytes on CUDA: using adamw_torch on CPU", name)
            return "adamw_torch"
        return name

    @contextmanager
    def threads(self, n: int | None) -> Iterator[None]:
        """Run with ``n`` torch intra-op threads on CPU (restored afterwards: tests train in-process)."""
        if self.device != "cpu" or not n:
            yield
            return
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    # -- models ------------------------------------------------------------------------------------
    def load_lora(
        self, section: Any, store: Any, *, loader: str = "FastModel", task_type: str | None = "CAUSAL_LM"
    ) -> Loaded:
        """Base causal LM + LoRA. The seed is set right before the adapter is created (LoRA A is random):
        same seed, same initial adapter."""
        from dagtune.models import resolve_model

        model_path = resolve_model(section.model.name, store, section.model.revision)
        if self.backend == "unsloth":
            return self._load_unsloth(section, model_path, loader)
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, set_seed

        from dagtune.models import load_tokenizer

        tokenizer = load_tokenizer(section.model.name, store, section.model.revision)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation}
        if self.load_in_4bit:  # placed by bitsandbytes on this rank's GPU (the Trainer cannot move it)
            kwargs["quantization_config"] = bnb_config(self.dtype)
            kwargs["device_map"] = {"": local_rank()}
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if self.load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=section.gradient_checkpointing
            )
        targets = resolve_target_modules(model, section.lora.target_modules)
        set_seed(section.seed)
        model = get_peft_model(model, lora_config(section, targets, task_type))
        ensure_pad_token(tokenizer)
        return Loaded(model, tokenizer, model_path, targets)

    def _load_unsloth(self, section: Any, model_path: str, loader_name: str) -> Loaded:
        loader = getattr(unsloth_module(), loader_name)
        model, tokenizer = loader.from_pretrained(
            model_name=model_path,
            max_seq_length=section.model.max_seq_length,
            dtype=None if section.model.dtype == "auto" else self.dtype,
            load_in_4bit=self.load_in_4bit,
            full_finetuning=False,
        )
        targets = resolve_target_modules(model, section.lora.target_modules)
        model = loader.get_peft_model(
            model,
            r=section.lora.r,
            target_modules=targets,
            lora_alpha=section.lora.alpha,
            lora_dropout=section.lora.dropout,
            bias="none",
            use_gradient_checkpointing="unsloth" if section.gradient_checkpointing else False,
            random_state=section.seed,
        )
        ensure_pad_token(getattr(tokenizer, "tokenizer", tokenizer))
        return Loaded(model, tokenizer, model_path, targets)

    def save_merged(self, loaded: Loaded, adapter_dir: Path, out_dir: Path, merged_dtype: Any,
                    stop_ids: list[int] | None = None) -> None:  # fmt: skip
        """16-bit merged model + tokenizer. Unsloth: its own merge (it dequantizes a 4-bit base and may have
        added a pad token, which only its merge matches). hf: the base is reloaded unquantized in
        ``merged_dtype`` (merging into a 4-bit base would be lossy) and the saved adapter merged into it;
        the caller drops the training copy first (``loaded.model = None``) so two copies never coexist."""
        if self.backend == "unsloth":
            loaded.model.save_pretrained_merged(str(out_dir), loaded.tokenizer, save_method="merged_16bit")
            if stop_ids:
                from transformers import GenerationConfig

                try:
                    gen = GenerationConfig.from_pretrained(str(out_dir))
                except OSError:
                    gen = GenerationConfig()
                add_eos_ids(gen, stop_ids)
                gen.save_pretrained(str(out_dir))
            return
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        loaded.model = None
        free_memory()
        kwargs: dict[str, Any] = {"dtype": merged_dtype}
        if self.device == "cuda":
            kwargs["device_map"] = {"": local_rank()}
        base = AutoModelForCausalLM.from_pretrained(loaded.model_path, **kwargs)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        if stop_ids:
            add_eos_ids(merged.generation_config, stop_ids)
        merged.save_pretrained(str(out_dir))
        loaded.tokenizer.save_pretrained(str(out_dir))
        del base, merged
        free_memory()

    def merged_dtype(self, section: Any) -> Any:
        import torch

        return self.dtype if section.merged_dtype == "auto" else getattr(torch, section.merged_dtype)

    def reset_peak_memory(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> dict[str, Any]:
        """CUDA max allocated bytes on GPU; the process's max resident set size on CPU."""
        if self.device == "cuda":
            import torch

            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                    "peak_memory_kind": "cuda_max_allocated"}  # fmt: skip
        import resource

        return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                "peak_memory_kind": "cpu_max_rss"}  # fmt: skip


def _compute_dtype(name: str, device: str) -> tuple[Any, str]:
    """(torch dtype, why): fp32 on CPU (no bf16 autocast there); on CUDA the configured one, auto = bf16
    where the GPU supports it."""
    import torch

    if device == "cpu":
        if name not in ("auto", "float32"):
            log.warning("model.dtype=%s ignored on CPU: training in float32", name)
        return torch.float32, "CPU trains in float32 (no bf16 autocast on CPU)"
    if name == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dtype, "model.dtype=auto: bf16 where the GPU supports it"
    return getattr(torch, name), f"model.dtype={name}"


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def bnb_config(compute_dtype: Any) -> Any:
    """NF4 with double quantization, computing in the training dtype (bf16 on recent GPUs). The packed
    4-bit weights are stored in that dtype too (``bnb_4bit_quant_storage``): FSDP needs every parameter of
    one dtype to shard them; the values, and DDP or one GPU, are unaffected."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)  # fmt: skip


def world_size() -> int:
    """How many torchrun processes share this node (1 outside torchrun)."""
    from dagtune.training.ddp import world

    return world().world_size


def local_rank() -> int:
    """This process's GPU among those the node was given (CUDA_VISIBLE_DEVICES): torchrun's LOCAL_RANK."""
    from dagtune.training.ddp import world

    return world().local_rank


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head: what 'all-linear' means (Phi-3 fuses
    qkv_proj and gate_up_proj, so this gives qkv_proj, o_proj, gate_up_proj, down_proj there)."""
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(mod, torch.nn.Linear)
            and mod is not out_emb
            and leaf not in {"lm_head", "score", "classifier"}
        ):
            names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: Any, targets: list[str]) -> list[str]:
    present = linear_module_names(model)
    if targets == ["all-linear"]:
        return present
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora.target_modules {missing} not found among the model's linear layers {present}")
    return list(targets)


def lora_config(section: Any, targets: list[str], task_type: str | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
                      target_modules=targets, bias="none", task_type=task_type)  # fmt: skip


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit bnb weights count their unpacked size (like peft)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = n * 2 * (p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def stop_token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> list[int]:
    vocab = getattr(tokenizer, "tokenizer", tokenizer).get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


def add_eos_ids(gen_config: Any, ids: list[int]) -> None:
    """Make generation stop at the end-of-turn token(s) as well as the tokenizer's EOS."""
    cur = gen_config.eos_token_id
    cur = [] if cur is None else ([cur] if isinstance(cur, int) else list(cur))
    cur += [i for i in ids if i not in cur]
    gen_config.eos_token_id = cur if len(cur) != 1 else cur[0]


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
