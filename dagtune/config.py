"""The one pipeline config: a pydantic v2 schema, validated before anything runs.

Every section is ``extra="forbid"`` and every field documents itself. ``pipeline_config.yaml`` holds
the real (GPU) settings at its top level and ``profiles:`` overlays; the ``tiny`` profile (the default)
swaps in project-built tiny models and synthetic data so the whole pipeline runs on a laptop CPU.
Each node reads only its own section: changing ``evaluate`` never re-trains anything.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipeline_config.yaml"


# Hostile-input bounds. A config is a few hundred values; anything past these is a mistake or an attack
# (a YAML alias bomb of 9 levels of 9 anchors expands to 387M values).
MAX_CONFIG_VALUES = 100_000
# No numeric field means anything near this; tighter per-field bounds (le=) stop what would exhaust memory.
MAX_NUMBER = 2**32
EXCERPT_CHARS = 120


# Unsloth's own page on multi-GPU (https://unsloth.ai/docs/basics/multi-gpu-training-with-unsloth):
# DDP/FSDP "through libraries like Accelerate and DeepSpeed", with official multi-GPU support announced
# as coming; this project trains Unsloth on one GPU and spreads a node over several with the hf backend.
UNSLOTH_MULTI_GPU = (
    "the unsloth backend trains on one GPU here: Unsloth's documentation describes multi-GPU (DDP, FSDP) "
    "only as a manual Accelerate/DeepSpeed setup with official support still to come "
    "(https://unsloth.ai/docs/basics/multi-gpu-training-with-unsloth), and this project neither wires nor "
    "tests it; use runtime.backend 'hf' (or 'auto', which picks hf for a node with gpus > 1), or gpus: 1"
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_number(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_NUMBER:
            raise ValueError(f"must be at most {MAX_NUMBER} in magnitude")
        return v


def F(default: Any = ..., description: str = "", **kw: Any) -> Any:  # noqa: N802 - short on purpose
    return Field(default, description=description, **kw)


# ----------------------------------------------------------------------------------------------
# project / runtime
# ----------------------------------------------------------------------------------------------
class ProjectConfig(Section):
    state_dir: str = F(
        ".state",
        "Directory for local state: artifact store, Prefect home, MLflow SQLite file. Relative paths are "
        "resolved against the config file's directory. Env override: DAGTUNE_STATE_DIR.",
    )
    artifact_root: str | None = F(
        None,
        "Root of the content-addressed artifact store; default <state_dir>/artifacts. Env override: "
        "DAGTUNE_ARTIFACT_ROOT.",
    )
    seed: int = F(3407, "Global seed: the training nodes use it where their section sets no seed.", ge=0)

    @field_validator("artifact_root")
    @classmethod
    def _a_mounted_path(cls, v: str | None) -> str | None:
        if v is not None and is_url(v):
            raise ValueError(URL_ROOT_REFUSED.format(v))
        return v


# The store needs rename and flock on a path every worker mounts; a URL would silently become a local
# directory named "s3:" (docs/scaling.md says what an object-store root would need).
URL_ROOT_REFUSED = "{!r} is a URL: the artifact store needs a path every worker mounts (docs/scaling.md)"


def is_url(value: str) -> bool:
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.isascii() and scheme[:1].isalpha() and scheme.replace("+", "").isalnum()


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = F(
        "auto", "Where training and evaluation run; auto picks CUDA if present."
    )
    unsloth_compile: bool = F(
        True,
        "Unsloth's torch.compile of the patched decoder blocks (UNSLOTH_COMPILE_DISABLE when false). Set "
        "for the whole process before Unsloth is imported; compiled kernels are cached under "
        "<state_dir>/compile_cache, so only a cold cache pays the compile time.",
    )
    backend: Literal["auto", "unsloth", "hf"] = F(
        "auto",
        "Training backend: unsloth (+bitsandbytes) where CUDA and the package exist, hf = transformers + "
        "peft + trl. auto picks unsloth when possible, hf otherwise; the choice is recorded in the manifest.",
    )
    gpus: int | None = F(
        None,
        "How many of the visible GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi) this worker schedules nodes on; "
        "None = all of them. Without a GPU the CPU is the one device.",
        ge=1,
    )
    nodes_per_device: int = F(
        1,
        "How many model-loading nodes (training, evaluate, convert_gguf_*, register) may share one device at "
        "once, each in its own process; the others wait for a slot. 1 gives each node a whole GPU; more "
        "overlaps one node's loading, merging and saving with another's training when memory allows.",
        ge=1,
        le=8,
    )
    isolation: Literal["process", "thread"] = F(
        "process",
        "process: every model-loading node runs in its own child process pinned to its devices with "
        "CUDA_VISIBLE_DEVICES (a crash or out-of-memory fails the node, not the run; memory is returned "
        "when it ends). thread: in the run's own process, one node at a time, for a debugger or a "
        "profiler; several devices or nodes_per_device > 1 need process.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_parallel_training" in data:
            warnings.warn(
                "runtime.max_parallel_training is renamed runtime.nodes_per_device (slots per device, "
                "each node in its own process); the old name will be removed",
                DeprecationWarning,
                stacklevel=2,
            )
            data = dict(data)
            data.setdefault("nodes_per_device", data.pop("max_parallel_training"))
        return data

    @model_validator(mode="after")
    def _thread_is_one_at_a_time(self) -> RuntimeConfig:
        if self.isolation == "thread" and self.nodes_per_device > 1:
            raise ValueError(
                "isolation=thread runs one model-loading node at a time: set nodes_per_device to 1"
            )
        return self


# ----------------------------------------------------------------------------------------------
# prepare_data
# ----------------------------------------------------------------------------------------------
class SourceConfig(Section):
    kind: Literal["synthetic", "file", "hf"] = F(
        "synthetic",
        "synthetic: built-in offline generator; file: a local JSONL/JSON/CSV/Parquet file; hf: datasets.load_dataset.",
    )
    path: str | None = F(None, "kind=file: path of the file (relative to the config file's directory).")
    format: Literal["auto", "mobile_actions", "flat", "eqn_csv", "pairs_csv", "labeled_csv"] = F(
        "auto",
        "Record format: mobile_actions (Google Mobile Actions JSONL), flat (HeshamHaroon/Arabic_Function_Calling "
        "columns + catalog), eqn_csv (line,eqn,type), pairs_csv (question,correct_answer,wrong_answer,error_type), "
        "labeled_csv (question,solution,label). auto detects it from the columns.",
    )
    catalog: str | None = F(
        None, "format=flat: JSON file with the tool schemas (list of OpenAI-style tools)."
    )
    hf_id: str | None = F(
        None, "kind=hf: dataset id on the Hugging Face hub, or a directory saved with save_to_disk."
    )
    hf_config: str | None = F(None, "kind=hf: dataset config name.")
    hf_split: str = F("train", "kind=hf: split to load.")
    revision: str | None = F(
        None,
        "kind=hf with a hub id: branch, tag or commit sha to load (None = main). Resolved to its commit "
        "sha at plan time; the sha enters the key and is the revision loaded (offline: the last sha the "
        "local HF cache recorded, with a warning). Ignored for a local save_to_disk directory.",
    )
    num_examples: int = F(600, "kind=synthetic: how many examples to generate.", ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _needs(self) -> SourceConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("kind=file needs 'path'")
        if self.kind == "hf" and not self.hf_id:
            raise ValueError("kind=hf needs 'hf_id'")
        return self


class TaskDataConfig(Section):
    source: SourceConfig = F(default_factory=SourceConfig, description="Where the task's rows come from.")
    max_length: int = F(
        512,
        "Token length above which a rendered example is flagged truncated=True and counted in stats.json. "
        "The row is kept whole (cutting it here would break prompt/completion); training truncates it to "
        "its own max_seq_length.",
        ge=16,
    )


class FunctionCallingDataConfig(TaskDataConfig):
    distractor_tools: int = F(
        2,
        "How many other tools from the catalog each example also gets, so the model learns to choose a tool "
        "rather than copy the only one.",
        ge=0,
    )
    schema_mismatch: Literal["keep", "drop"] = F(
        "keep",
        "A call whose arguments do not match its tool's JSON schema (unknown key, missing required key, wrong "
        "JSON type): keep = reported in bad_rows.jsonl (action 'kept') and counted, the recorded call stays "
        "the target; drop = a bad row like any other. Default keep because the real Arabic data has such "
        "rows by construction (45 of the 94 calls in the shared sample, e.g. origin/destination for "
        "search_flights), and its recorded arguments are the ground truth evaluation compares against.",
    )
    negative_fraction: float = F(
        0.1, "kind=synthetic: fraction of chit-chat requests that need no tool.", ge=0, lt=1
    )
    developer_prompt: str = F(
        "You are a model that can do function calling with the following functions",
        "Developer-turn text placed before the tool declarations (FunctionGemma's documented activation line).",
    )
    negative_reply: str = F(
        "لا يحتاج هذا الطلب إلى استدعاء أي أداة.",
        "Fixed assistant reply for requests that need no tool ('This request does not need any tool to be "
        "called.'); one fixed sentence so evaluation can recognise a correct no-call answer.",
    )


class TokenizersConfig(Section):
    function_calling: str = F(
        "unsloth/functiongemma-270m-it", "Model whose tokenizer/chat template renders function calling."
    )
    extractor: str = F(
        "unsloth/gemma-3-1b-it-unsloth-bnb-4bit",
        "Model whose tokenizer/chat template renders equation extraction.",
    )
    classifier: str = F(
        "microsoft/Phi-4-mini-instruct", "Model whose tokenizer/chat template renders classification."
    )


class PrepareDataConfig(Section):
    seed: int = F(1234, "Seed for generation, shuffling and splitting.", ge=0)
    val_fraction: float = F(0.1, "Fraction of rows in the validation split.", gt=0, lt=0.5)
    test_fraction: float = F(0.1, "Fraction of rows in the test split.", gt=0, lt=0.5)
    max_bad_fraction: float = F(
        0.2,
        "Bad rows are dropped and counted; above this fraction of a source the node stops with an error.",
        ge=0,
        le=1,
    )
    near_duplicate_threshold: float = F(
        0.9,
        "Character-trigram Jaccard similarity at or above which two rows in different splits count as leakage.",
        gt=0,
        le=1,
    )
    max_row_chars: int = F(
        100_000,
        "Rows of a file or HF source with more characters than this (text of all fields) are bad rows: a "
        "single huge row would otherwise go into training whole.",
        ge=1,
        le=100_000_000,
    )
    drop_duplicates: bool = F(
        True,
        "Drop exact duplicates (same rendered text) within each split, keeping the first; either way "
        "stats.json counts them per split, with the rows holding NUL bytes.",
    )
    function_calling: FunctionCallingDataConfig = F(
        default_factory=FunctionCallingDataConfig, description="Arabic function-calling data (FunctionGemma)."
    )
    extractor: TaskDataConfig = F(
        default_factory=TaskDataConfig, description="Equation-extraction lines (Gemma-3)."
    )
    classifier: TaskDataConfig = F(
        default_factory=TaskDataConfig, description="Solution classification (Phi-4-mini)."
    )
    tokenizers: TokenizersConfig = F(
        default_factory=TokenizersConfig,
        description="Model name (hub id, local path or tiny-*) whose tokenizer and chat template render each "
        "task; set them to the training sections' model names (the tiny profile: tiny-functiongemma, "
        "tiny-gemma3, tiny-phi3).",
    )


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
class ModelConfig(Section):
    name: str = F(
        ...,
        "Hub id, local directory, or a project-built tiny model (tiny-functiongemma, tiny-gemma3, tiny-phi3).",
    )
    revision: str | None = F(
        None,
        "Hub models only: branch, tag or commit sha (None = main), resolved to its commit sha at plan time; "
        "the sha enters the key and is the snapshot loaded. Tiny models and local directories ignore it.",
    )
    load_in_4bit: bool = F(
        False, "Load the base in 4-bit NF4 (bitsandbytes; CUDA only, ignored on CPU with a warning)."
    )
    max_seq_length: int = F(1024, "Longest sequence trained on.", ge=16)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = F(
        "auto", "Compute dtype: auto = bf16 on CUDA, fp32 on CPU."
    )


class LoraConfig(Section):
    r: int = F(16, "LoRA rank.", ge=1)
    alpha: int = F(32, "LoRA alpha (scale = alpha / r).", ge=1)
    dropout: float = F(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = F(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names LoRA wraps; 'all-linear' as the single entry wraps every linear layer but the head.",
    )


class OptimConfig(Section):
    learning_rate: float = F(1e-4, "Peak learning rate.", gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = F("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int | None = F(None, "Warmup steps; None uses warmup_ratio.", ge=0)
    warmup_ratio: float = F(
        0.0, "Warmup as a fraction of total steps (used when warmup_steps is None).", ge=0, lt=1
    )
    max_warmup_fraction: float = F(
        0.1, "Warmup is capped to this fraction of the total steps so small datasets still train.", ge=0, le=1
    )
    epochs: float = F(1.0, "Passes over the training split.", gt=0, le=10_000)
    max_steps: int | None = F(None, "Stop after this many optimizer steps (overrides epochs).", ge=1)
    batch_size: int = F(8, "Examples per micro-batch.", ge=1)
    grad_accum: int = F(4, "Micro-batches per optimizer step.", ge=1)
    weight_decay: float = F(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = F(1.0, "Gradient clipping norm.", gt=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = F(
        "adamw_torch", "Optimizer; 8-bit variants need bitsandbytes on CUDA."
    )


class TrainCommon(Section):
    model: ModelConfig = F(..., description="Base model.")
    lora: LoraConfig = F(default_factory=LoraConfig, description="LoRA adapter.")
    optim: OptimConfig = F(default_factory=OptimConfig, description="Optimizer and schedule.")
    gradient_checkpointing: bool = F(
        True, "Gradient checkpointing ('unsloth' flavour on the unsloth backend)."
    )
    log_every: int = F(10, "Log loss, learning rate, grad norm and tokens/s every N optimizer steps.", ge=1)
    checkpoint_every: int = F(50, "Save a resumable checkpoint every N optimizer steps.", ge=1)
    seed: int | None = F(None, "Training seed; None = project.seed.", ge=0)
    save_merged: bool = F(True, "Also write the merged 16-bit model (needed for GGUF).")
    cpu_threads: int | None = F(
        None,
        "CPU only: torch intra-op threads while this node trains (None = torch's default, one per core). "
        "Tiny models gain nothing from more than one, and several trainings overlapping on a few cores make "
        "OpenMP threads spin against each other (element-wise ops measured 10x slower on 2 busy cores).",
        ge=1,
    )
    merged_dtype: Literal["auto", "bfloat16", "float16", "float32"] = F(
        "auto",
        "dtype of the merged model's safetensors: auto = the training compute dtype (bf16/fp16 on CUDA, so "
        "16-bit there; fp32 on CPU, where the tiny models train in fp32 and the GGUF parity check compares "
        "against them). The unsloth backend always writes its merged_16bit.",
    )
    gpus: int = F(
        1,
        "GPUs this node trains on. Above 1 the node runs data parallel under torchrun (hf backend; "
        "runtime.backend auto picks hf for it): each optimizer step still takes optim.batch_size * "
        "optim.grad_accum examples, split over the GPUs, so that product must be a multiple of gpus.",
        ge=1,
        le=64,
    )

    @model_validator(mode="after")
    def _global_batch_splits(self) -> TrainCommon:
        per_step = self.optim.batch_size * self.optim.grad_accum
        if per_step % self.gpus:
            raise ValueError(
                f"gpus={self.gpus}: optim.batch_size * optim.grad_accum = {per_step} examples per optimizer "
                f"step cannot be split evenly over {self.gpus} GPUs; make it a multiple of {self.gpus}"
            )
        return self


class SFTCommon(TrainCommon):
    packing: bool = F(
        False,
        "SFT nodes: padding-free packing. Each optimizer step still takes batch_size * grad_accum examples "
        "(the same shuffled groups as unpacked), laid end to end in one row per micro-batch with position ids "
        "restarting per example (varlen attention on the unsloth backend, a block-diagonal mask on hf); the "
        "loss stays the token mean over the step's completion tokens, so per-example weighting is unchanged. "
        "The micro-batch count per step follows from packed_tokens_per_batch.",
    )
    packed_tokens_per_batch: int = F(
        16384,
        "packing: most tokens in one packed micro-batch (raised to max_seq_length if smaller). A step whose "
        "examples hold more is split into several micro-batches, balanced by tokens (gradient accumulation).",
        ge=16,
    )


class TrainFunctionCallingConfig(SFTCommon):
    pass


class TrainExtractorConfig(SFTCommon):
    pass


class EarlyStoppingConfig(Section):
    metric: Literal["macro_f1", "accuracy", "loss"] = F("macro_f1", "Validation metric watched.")
    patience: int = F(3, "Evaluations without improvement before stopping.", ge=1)
    eval_every: int = F(50, "Evaluate on validation every N optimizer steps.", ge=1)


class TrainClassifierConfig(TrainCommon):
    num_labels: int = F(2, "Classes: 0 = correct, 1 = flawed.", ge=2)
    class_weights: list[float] | Literal["balanced"] | None = F(
        None, "Cross-entropy class weights: a list, 'balanced' (inverse frequency), or None."
    )
    early_stopping: EarlyStoppingConfig = F(
        default_factory=EarlyStoppingConfig, description="Early stopping."
    )


# ----------------------------------------------------------------------------------------------
# evaluate / convert_gguf / register
# ----------------------------------------------------------------------------------------------
class EvaluateConfig(Section):
    batch_size: int = F(16, "Generation batch size on CPU (left padding, greedy).", ge=1)
    cuda_batch_size: int | None = F(
        None,
        "Generation batch size on CUDA; None = chosen per batch from free GPU memory and the model's "
        "KV-cache bytes per token (at most cuda_max_batch_size). Batching never changes a row's tokens.",
        ge=1,
    )
    cuda_max_batch_size: int = F(256, "Largest generation batch the CUDA memory rule may choose.", ge=1)
    cuda_memory_fraction: float = F(
        0.5, "Share of the free GPU memory the CUDA memory rule may fill with one batch.", gt=0, le=1
    )
    max_new_tokens: int = F(128, "Longest generation.", ge=1)
    max_examples: int | None = F(
        None, "Evaluate on at most this many test examples per task (None = all).", ge=1
    )
    arabic_normalization: bool = F(
        True, "Normalize alef/ya/ta-marbuta variants before comparing argument strings."
    )
    rel_tol: float = F(1e-5, "Relative tolerance when comparing equation values.", gt=0)
    compare_base: bool = F(True, "Also evaluate each base model with the same decoding.")
    seed: int = F(0, "Seed of the random subsample drawn when a split has more than max_examples rows.", ge=0)
    threshold_metric: Literal["macro_f1", "accuracy", "f1_flawed", "balanced_accuracy"] = F(
        "macro_f1",
        "Validation metric the classifier's decision threshold maximizes; the threshold is then applied to test.",
    )
    computational_error_types: list[str] = F(
        default_factory=lambda: [
            "comp",  # the origin project's abbreviation (its conceptual one is "concep")
            "calc",
            "arithmetic",
            "computational",
            "calculation",
            "arithmetic_error",
            "computational_error",
            "calculation_error",
        ],
        description="error_type values (case/separator-insensitive) of flawed classifier rows whose gold "
        "two-stage verdict is computational_error (a written calculation is wrong); every other flawed row "
        "is conceptual_error (synthetic: wrong_operation, final_answer; a type outside the vocabulary of "
        "dagtune.data.math_tasks is counted in the verdict's unmapped_error_types).",
    )


class ConvertGgufConfig(Section):
    outtype: Literal["f16", "bf16", "f32"] = F(
        "f16", "Type written by convert_hf_to_gguf.py before quantization."
    )
    quantizations: list[Literal["q8_0", "q4_k_m", "f16", "bf16"]] = F(
        default_factory=lambda: ["q8_0"],
        description="Files to produce. Q4_K_M warns for models under 1B parameters (they lose bracket syntax).",
    )
    parity_prompts: int = F(
        64,
        "How many test prompts of the model's task (the first ones of test.parquet) the HF vs llama.cpp "
        "parity check uses; top-1 agreement is counted over every position of every prompt.",
        ge=1,
    )
    min_top1_agreement: float = F(
        0.98,
        "Node fails below this next-token top-1 agreement with HF over all positions of the parity prompts.",
        ge=0,
        le=1,
    )
    template_check: list[Literal["function_calling", "extractor"]] = F(
        default_factory=lambda: ["function_calling"],
        description="Models whose parity check also renders each test conversation (messages and tools) "
        "with the GGUF's own embedded chat template, as llama.cpp's chat completion does, and compares "
        "llama.cpp's greedy output on it with the HF model's on the dataset prompt.",
    )
    min_template_greedy_match: float = F(
        0.95,
        "Node fails when fewer of the template_check prompts than this give the HF model's greedy output "
        "(a chat template lost or changed in conversion), or when the GGUF embeds no chat template.",
        ge=0,
        le=1,
    )
    top1_tie_tolerance: float = F(
        0.05,
        "A top-1 disagreement where the HF model's logits for the two tokens differ by at most this is a "
        "near-tie (rounding between almost equal candidates): it counts as agreement and is reported. 0 = strict.",
        ge=0,
    )
    max_new_tokens: int = F(32, "Greedy generation length for the generation-agreement check.", ge=1)
    greedy_prompts: int = F(
        8,
        "How many of the parity prompts (the first ones) also compare greedy generation from the same token "
        "ids; a template_check model compares every prompt (its template check needs that generation). "
        "Decoding runs on llama.cpp's CPU path, which at real size costs about a second per prompt.",
        ge=0,
    )
    models: list[Literal["function_calling", "extractor"]] = F(
        default_factory=lambda: ["function_calling", "extractor"],
        description="Which generative models get a GGUF file; the export node of a model left out "
        "writes none (and its registered version serves no GGUF).",
    )
    parity_llama_gpu: bool = F(
        False,
        "Run llama.cpp's side of the parity check on the GPU (needs llama-cpp-python built with "
        "CMAKE_ARGS=-DGGML_CUDA=on, scripts/build_llama_cuda.sh). Off: on the H200 machine this project "
        "measures on, a CUDA build crashed (SIGSEGV) loading the model in a process holding torch's CUDA "
        "context. On the CPU, parity costs about 1-2 minutes per real-size model.",
    )


class PromotionGate(Section):
    metric: str = F(
        "exact_match",
        "Headline metric the gate compares: a per-example column of evaluate's predictions (exact_match, "
        "score, ...) or, for the classifier, macro_f1 | accuracy | balanced_accuracy | f1_flawed.",
    )
    min_delta: float = F(
        0.0,
        "Promote only when the lower bound of the 95% paired-bootstrap interval (2,000 resamples, fixed "
        "seed) of the improvement over the champion, on the same test rows, is above this. The challenger "
        "must also beat its own base (the classifier: the majority-class baseline).",
    )
    max_group_drop: float = F(
        0.05, "No per-dialect/per-group value of the metric may drop by more than this."
    )
    group_keys: list[str] | None = F(
        None,
        "Which groupings of metrics.json the group-drop rule checks (e.g. [by_dialect]); None = every "
        "by_* mapping present in the champion's metrics.",
    )
    min_group_size: int = F(
        0,
        "Groups evaluated on fewer examples than this (their 'n') are not checked: a two-example dialect "
        "would block every promotion on noise.",
        ge=0,
    )


class RegisteredModel(Section):
    name: str = F(..., "Registered model name in MLflow.")
    gate: PromotionGate = F(default_factory=PromotionGate, description="Promotion gate for this model.")


DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "function_calling": {"name": "dagtune-function-calling"},
    "extractor": {"name": "dagtune-equation-extractor"},
    "classifier": {"name": "dagtune-solution-classifier", "gate": {"metric": "macro_f1"}},
}


class RegisterConfig(Section):
    tracking_uri: str | None = F(
        None,
        "MLflow tracking URI; default sqlite:///<state_dir>/mlflow.db with artifacts under the state dir. "
        "Env override: MLFLOW_TRACKING_URI.",
    )
    experiment: str = F("dagtune", "MLflow experiment name.")
    gguf_max_tokens: int = F(
        256, "Default max new tokens of the registered GGUF pyfunc models' predict.", ge=1
    )
    auto_promote: bool = F(True, "Move the champion alias when the gate passes.")
    retries: int = F(4, "Retries with exponential backoff when the tracking server is unreachable.", ge=0)
    backoff_seconds: float = F(1.0, "First wait between retries; doubles each retry (capped at 30 s).", ge=0)
    gguf_quantization: str = F(
        "q8_0", "Which convert_gguf output file the generative models' registered version serves."
    )
    log_merged_model: bool = F(
        True,
        "Also log the merged 16-bit model (transformers flavor) in the version's run; its URI is the "
        "version tag dagtune.merged_model_uri. Off saves the copy of the full weights.",
    )
    classifier_loader: str = F(
        "dagtune.training.classifier:load_classifier",
        "Import path of the function the classifier pyfunc calls with its artifact dir to get an object "
        "with predict_proba(texts) -> list[float]. The gate's re-scoring of the champion passes the run's "
        "device too (device=...) when the function has that parameter.",
    )
    models: dict[Literal["function_calling", "extractor", "classifier"], RegisteredModel] = F(
        default_factory=lambda: {k: RegisteredModel.model_validate(v) for k, v in DEFAULT_MODELS.items()},
        description="Registered model per trained model. A partial mapping is merged into the defaults "
        "entry by entry (overriding one model's gate keeps the other models registered); set an entry "
        "to null to stop registering that model.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _merge_models(cls, v: Any) -> Any:
        """Partial overrides merge into the defaults (a YAML mapping replaces a default_factory)."""
        if not isinstance(v, dict):
            return v
        merged: dict[str, Any] = {}
        for key in dict.fromkeys([*DEFAULT_MODELS, *v]):
            given = v.get(key, {})
            if given is None:
                continue  # explicitly not registered
            default = DEFAULT_MODELS.get(key, {})
            merged[key] = deep_merge(default, given) if isinstance(given, dict) else given
        return merged


# ----------------------------------------------------------------------------------------------
# deploy (operations: not a node, not part of any key)
# ----------------------------------------------------------------------------------------------
class DeployConfig(Section):
    name: str = F("nightly", "Name of the Prefect deployment `dagtune deploy` creates or updates.")
    work_pool: str = F("dagtune-gpu", "Prefect work pool the deployment runs on; `dagtune worker` polls it.")
    work_pool_type: Literal["process", "docker", "kubernetes"] = F(
        "process",
        "Type of the work pool when `dagtune deploy` creates it (an existing pool is left as it is). "
        "docker and kubernetes need the prefect-docker / prefect-kubernetes worker packages; their job "
        "variables (image, GPU requests) are documented in README, Deployments.",
    )
    cron: str = F("0 2 * * *", "Schedule of the nightly run (cron syntax).")
    timezone: str = F("UTC", "IANA time zone the cron schedule is read in, e.g. Europe/Berlin.")
    gpu_slots: int = F(
        1,
        "GPUs of the worker: a Prefect concurrency limit with this many slots is taken by every "
        "model-loading node (training, evaluate, the convert_gguf nodes), so one node at a time uses one GPU.",
        ge=1,
    )


# ----------------------------------------------------------------------------------------------
# root
# ----------------------------------------------------------------------------------------------
# `register` is a node name; pydantic warns that it shadows ABCMeta.register, which nothing here uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PipelineConfig(Section):
    project: ProjectConfig = F(default_factory=ProjectConfig, description="Project-wide settings.")
    runtime: RuntimeConfig = F(default_factory=RuntimeConfig, description="Device and backend selection.")
    prepare_data: PrepareDataConfig = F(
        default_factory=PrepareDataConfig, description="The prepare_data node."
    )
    train_function_calling: TrainFunctionCallingConfig = F(
        ..., description="The train_function_calling node."
    )
    train_extractor: TrainExtractorConfig = F(..., description="The train_extractor node.")
    train_classifier: TrainClassifierConfig = F(..., description="The train_classifier node.")
    evaluate: EvaluateConfig = F(default_factory=EvaluateConfig, description="The evaluate node.")
    convert_gguf: ConvertGgufConfig = F(
        default_factory=ConvertGgufConfig,
        description="The convert_gguf_function_calling and convert_gguf_extractor nodes (one export per model).",
    )
    register: RegisterConfig = F(default_factory=RegisterConfig, description="The register node.")
    deploy: DeployConfig = F(
        default_factory=DeployConfig, description="The Prefect deployment, work pool and GPU slots."
    )

    # Filled by load_config, not by the YAML.
    profile: str = F("", "Name of the profile applied (set by the loader).")
    config_dir: str = F(
        "", "Directory of the config file; relative paths resolve against it (set by the loader)."
    )

    @model_validator(mode="after")
    def _unsloth_single_gpu(self) -> PipelineConfig:
        """Unsloth trains on one GPU here (UNSLOTH_MULTI_GPU cites its documentation)."""
        for name in ("train_function_calling", "train_extractor", "train_classifier"):
            gpus = getattr(self, name).gpus
            if self.runtime.backend == "unsloth" and gpus > 1:
                raise ValueError(f"{name}.gpus={gpus} with runtime.backend=unsloth: {UNSLOTH_MULTI_GPU}")
        return self

    @model_validator(mode="after")
    def _training_seeds(self) -> PipelineConfig:
        """A training section without its own seed trains with project.seed."""
        for sec in (self.train_function_calling, self.train_extractor, self.train_classifier):
            if sec.seed is None:
                sec.seed = self.project.seed
        return self

    @field_validator("config_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        return str(Path(v).resolve()) if v else v

    # -- resolved paths --------------------------------------------------------------------------
    def resolve_path(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else Path(self.config_dir or ".").resolve() / path

    @property
    def state_dir(self) -> Path:
        return self.resolve_path(os.environ.get("DAGTUNE_STATE_DIR") or self.project.state_dir)

    @property
    def artifact_root(self) -> Path:
        env = os.environ.get("DAGTUNE_ARTIFACT_ROOT")
        if env and is_url(env):
            raise ConfigError(f"DAGTUNE_ARTIFACT_ROOT: {URL_ROOT_REFUSED.format(env)}")
        if env:
            return self.resolve_path(env)
        if self.project.artifact_root:
            return self.resolve_path(self.project.artifact_root)
        return self.state_dir / "artifacts"

    @property
    def tracking_uri(self) -> str:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.register.tracking_uri:
            return self.register.tracking_uri
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"


class ConfigError(Exception):
    """Invalid configuration: the message names the YAML path, the bad value and what is allowed."""


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A bounded picture of a config value for error messages (never the repr of a huge value)."""
    if isinstance(value, dict):
        return f"{{...{len(value)} keys}}"
    if isinstance(value, (list, tuple)):
        return f"[...{len(value)} items]"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"...({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def clip(text: str, limit: int = 500) -> str:
    """A message part cut to ``limit`` characters (parser messages quote the offending line)."""
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _format_errors(err: ValidationError, source: str, profile: str) -> str:
    lines = [f"invalid config {source} (profile {profile!r}):"]
    errors = err.errors()
    for e in errors[:50]:
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        shown = excerpt(e.get("input"))
        if e["type"] == "missing":
            lines.append(f"  {path}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown field (value {shown}); check spelling against the schema")
        else:
            lines.append(f"  {path}: {clip(e['msg'], 300)} (got {shown})")
    if len(errors) > 50:
        lines.append(f"  ... and {len(errors) - 50} more errors")
    return "\n".join(lines)


def expanded_size(obj: Any, memo: dict[int, int] | None = None) -> int:
    """How many values ``obj`` holds once YAML aliases are expanded (each shared node counted every time
    it is referenced), computed in time linear in the *unexpanded* document."""
    memo = {} if memo is None else memo
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) not in memo:
        memo[id(obj)] = 0  # a recursive alias (&a [*a]) counts once instead of looping
        items = obj.values() if isinstance(obj, dict) else obj
        memo[id(obj)] = 1 + sum(min(expanded_size(v, memo), MAX_CONFIG_VALUES + 1) for v in items)
    return memo[id(obj)]


# One parse per file version per process: `run` loads the config in the CLI and again in the flow,
# `config validate` once per profile.
_PARSED: dict[tuple[str, int, int], dict[str, Any]] = {}


def _parse_yaml(p: Path) -> Any:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: not UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}); save the config as UTF-8"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader (C or Python)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {clip(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not usable YAML (nested too deeply)") from None


def read_raw(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], Path]:
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    st = p.stat()
    cache_key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if cache_key not in _PARSED:
        raw = _parse_yaml(p)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
        try:
            n = expanded_size(raw)
        except RecursionError:
            raise ConfigError(f"{p}: not usable YAML (nested too deeply)") from None
        if n > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{p}: refused: the YAML holds more than {MAX_CONFIG_VALUES} values once aliases are "
                "expanded (an alias bomb, or not a config); a pipeline config holds a few hundred"
            )
        _PARSED.clear()
        _PARSED[cache_key] = raw
    return copy.deepcopy(_PARSED[cache_key]), p.resolve()


def profile_names(raw: dict[str, Any]) -> list[str]:
    profiles = raw.get("profiles") or {}
    return sorted(str(k) for k in profiles) if isinstance(profiles, dict) else []


def _profiles(raw: dict[str, Any], p: Path) -> tuple[dict[str, Any], str | None]:
    """(profiles, default_profile) popped from the raw YAML, with their shapes checked."""
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(
            f"{p}: profiles: must be a mapping of profile name -> overlay (got {excerpt(profiles)})"
        )
    for name, overlay in profiles.items():
        if overlay is not None and not isinstance(overlay, dict):
            raise ConfigError(
                f"{p}: profiles.{name}: must be a mapping of overrides (got {excerpt(overlay)})"
            )
    default = raw.pop("default_profile", None)
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"{p}: default_profile: must be a profile name (got {excerpt(default)})")
    return profiles, default


def load_config(
    path: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Read the YAML, apply the profile overlay and overrides, validate. Raises ConfigError."""
    raw, p = read_raw(path)
    profiles, default_profile = _profiles(raw, p)
    name = profile or os.environ.get("DAGTUNE_PROFILE") or default_profile or ""
    if name and name not in profiles:
        where = "profile" if profile or os.environ.get("DAGTUNE_PROFILE") else "default_profile: profile"
        allowed = sorted(map(str, profiles))
        raise ConfigError(f"{p}: {where} {excerpt(name)} not defined under profiles; allowed: {allowed}")
    data = deep_merge(raw, profiles.get(name) or {}) if name else raw
    if overrides:
        data = deep_merge(data, overrides)
    data["profile"] = name
    data["config_dir"] = str(p.parent)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        where = f"{p}" + (f" + profiles.{name}" if name else "")
        raise ConfigError(_format_errors(e, where, name)) from None
