"""Project-built tiny models of the real architectures, for the ``tiny`` profile (no hub access needed).

Each spec mirrors one real model: same ``transformers`` classes, same special tokens (names, relative
order, which ones are special), the real chat template (``templates/*.jinja``) and the real
``generation_config`` stop ids; only the sizes are tiny and the weights random (the Gemma ones with a
trained model's embedding and final-norm scales, see ``EMBED_STD``).

* ``tiny-functiongemma`` stands in for ``unsloth/functiongemma-270m-it`` (Gemma-3 text architecture),
* ``tiny-gemma3`` for ``unsloth/gemma-3-1b-it-unsloth-bnb-4bit``,
* ``tiny-phi3`` for ``microsoft/Phi-4-mini-instruct`` (Phi-3 architecture, partial rotary 0.75, tied
  embeddings).

Tokenizers are trained here on a small built-in corpus plus the synthetic data's vocabulary: the Gemma
ones as a SentencePiece BPE model with byte fallback (``tokenizer.model`` is kept in the directory:
llama.cpp's GGUF converter reads it), loaded through transformers' ``GemmaTokenizer``; the Phi one as a
byte-level BPE with ``tokenizers``. Every layer width is a multiple of 32 (bitsandbytes' CPU kernels
need it). A build is deterministic: the same version of this file and of ``dagtune/data/synthetic.py``
gives the same bytes.

Heavy imports (torch, transformers, sentencepiece, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# Bump when the output of a build changes for reasons the digest below does not see (library upgrades
# that change the files are caught by the store's library record, not by the key).
TINY_BUILD = "1"

GEMMA_VOCAB = 4096
PHI_VOCAB = 4096
SEED = 1234

# Phi-4-mini's added tokens, in the order of their ids (199999, then 200018..200028).
PHI4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|endofprompt|>",
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
    "<|tag|>",
)
# Phi-4-mini's pre-tokenizer split (the o200k regex), applied before the byte-level mapping.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

FUNCTION_TOKENS = (
    "<start_function_declaration>",
    "<end_function_declaration>",
    "<start_function_call>",
    "<end_function_call>",
    "<start_function_response>",
    "<end_function_response>",
    "<escape>",
)


@dataclass(frozen=True)
class TinySpec:
    name: str
    family: str  # "gemma3" | "phi3"
    reference: str  # the real model this one stands in for
    template: str  # file name in templates/
    # Gemma: SentencePiece user-defined symbols after <pad> <eos> <bos> <unk>, in id order (4, 5, ...),
    # with the "special" flag the real tokenizer gives them (special tokens are skipped by
    # decode(skip_special_tokens=True); the FunctionGemma call tokens are not, as in the real model).
    added: tuple[tuple[str, bool], ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    model_max_length: int = 32768


_GEMMA_COMMON = (
    ("<mask>", False),
    ("[multimodal]", False),
    ("<start_of_turn>", True),
    ("<end_of_turn>", True),
)

# Phi-4-mini's rotary/activation/norm settings (the tiny model and benchmarks/train_throughput.py share them).
PHI4_MINI_ARCH: dict[str, Any] = {
    "original_max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75},
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}

_GEMMA_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    # Six layers: five sliding-window layers then one global one, the real Gemma-3 pattern (llama.cpp
    # hard-codes it, so fewer layers would disagree with the GGUF export about which layer is global).
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,  # = head_dim, as in the real models (llama.cpp assumes it)
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_bidirectional_attention": False,
}

SPECS: dict[str, TinySpec] = {
    s.name: s
    for s in [
        TinySpec(
            name="tiny-functiongemma",
            family="gemma3",
            reference="unsloth/functiongemma-270m-it",
            template="functiongemma.jinja",
            added=_GEMMA_COMMON + tuple((t, False) for t in FUNCTION_TOKENS),
            # Real: config eos [<eos>, <start_function_response>], generation eos adds <end_of_turn>.
            config={"eos": ["<eos>", "<start_function_response>"]},
            generation={
                "eos": ["<eos>", "<start_function_response>", "<end_of_turn>"],
                "do_sample": True,
                "top_k": 64,
                "top_p": 0.95,
            },
        ),
        TinySpec(
            name="tiny-gemma3",
            family="gemma3",
            reference="unsloth/gemma-3-1b-it-unsloth-bnb-4bit",
            template="gemma3.jinja",
            # Gemma-3 has <unusedN> placeholders where FunctionGemma put its call tokens.
            added=_GEMMA_COMMON + tuple((f"<unused{i}>", False) for i in range(len(FUNCTION_TOKENS))),
            config={"eos": ["<eos>", "<end_of_turn>"]},
            generation={"eos": ["<eos>", "<end_of_turn>"], "do_sample": True, "top_k": 64, "top_p": 0.95},
        ),
        TinySpec(
            name="tiny-phi3",
            family="phi3",
            reference="microsoft/Phi-4-mini-instruct",
            template="phi4_mini.jinja",
            config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 4096,
                **PHI4_MINI_ARCH,
                "eos": "<|endoftext|>",
            },
            generation={"eos": ["<|end|>", "<|endoftext|>"]},
            model_max_length=131072,
        ),
    ]
}


# The synthetic data module supplies part of the tokenizer corpus (``corpus``): its text is hashed too.
SYNTHETIC_SOURCE = Path(__file__).resolve().parent.parent / "data" / "synthetic.py"


def _source_digest() -> str:
    """Hash of this file, the synthetic data module and the templates: a change to any of them changes
    the tiny models' cache key."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(SYNTHETIC_SOURCE.read_bytes())
    for p in sorted(TEMPLATES_DIR.glob("*.jinja")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


TINY_VERSION = f"{TINY_BUILD}-{_source_digest()}"


def spec(name: str) -> TinySpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(SPECS)}") from None


def read_template(file_name: str) -> str:
    """The template text as transformers stores it (without the file's trailing newline)."""
    text = (TEMPLATES_DIR / file_name).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


# ----------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------
_AR_WORDS = (
    "مرحبا كيف حالك اليوم أريد أن أرسل رسالة إلى أحمد اتصل بسارة افتح الكاميرا شغل المصباح ما هو الطقس في "
    "الرياض القاهرة دبي عمان بيروت الدار البيضاء تونس احجز موعدا غدا الساعة من فضلك هل يمكنك تذكير اجتماع "
    "بريد إلكتروني صديقي أمي أبي أختي أخي العمل البيت المدرسة الجامعة السيارة الطريق المطعم الفندق الطائرة "
    "القطار المستشفى الصيدلية اكتب ابحث عن خريطة موقع قريب بعيد صباحا مساء ليلا الأسبوع القادم الشهر السنة "
    "رقم هاتف عنوان اسم ملاحظة قائمة مهمة تقويم حدث صورة فيديو أغنية الجواب صحيح خطأ المعادلة حل مسألة جمع "
    "طرح ضرب قسمة يساوي عدد كسر نسبة مئوية مجموع ناتج باقي لدى كان عنده اشترى باع أعطى أخذ تفاحة برتقالة "
    "قلم كتاب دفتر عايز ابغى بدي شو ليش وين هلق ازاي فين دلوقتي ياريت لو سمحت شكرا"
).split()
_EN_WORDS = (
    "the quick brown fox jumps over lazy dog send email to call open camera turn on off flashlight weather "
    "in what is solve equation answer correct wrong please remind me about meeting message friend mother "
    "father work home school university car road restaurant hotel plane train hospital pharmacy write "
    "search for map location near far morning evening night next week month year number phone address name "
    "note list task calendar event photo video song add subtract multiply divide equals total result "
    "remainder had has bought sold gave took apples oranges pencils books notebooks each every how many "
    "much more less than classify solution label step first then finally therefore because so we get price "
    "cost dollars cents percent half third quarter twice times minutes hours days user model developer "
    "system assistant tool declaration call response description parameters properties required type "
    "value enum items string object integer number boolean array true false null"
).split()
_VERBS = (
    "send get set create delete update open close play pause find search call book show turn check add "
    "remove list schedule cancel read write share"
).split()
_NOUNS = (
    "email message contact event alarm timer weather location map camera flashlight wifi bluetooth volume "
    "brightness song playlist note reminder calendar photo file app route flight hotel order"
).split()
_KEYS = (
    "to subject body name query city date time datetime title description phone_number email_address "
    "location duration level enabled count amount unit recipient message_text first_name last_name"
).split()
_TYPES = ("STRING", "INTEGER", "NUMBER", "BOOLEAN", "OBJECT", "ARRAY")
_AR_PREFIX = ("", "ال", "و", "ب", "ل", "ف")
_AR_SUFFIX = ("", "ة", "ات", "ون", "ين", "ها", "هم", "كم", "نا")
_EN_SUFFIX = ("", "s", "ing", "ed", "er", "ly")


def corpus(seed: int = SEED, n: int = 3000) -> list[str]:
    """The built-in training corpus: Arabic, English, digits, arithmetic, JSON and FunctionGemma syntax,
    plus the synthetic data's vocabulary (``dagtune.data.synthetic.tokenizer_corpus``): a real tokenizer
    knows the words of its language, so tool names, argument keys and the Arabic request words are a few
    tokens each rather than spelled out letter by letter (shorter, more learnable sequences)."""
    from dagtune.data.synthetic import tokenizer_corpus

    rng = random.Random(seed)

    def ar() -> str:
        w = rng.choice(_AR_WORDS)
        return rng.choice(_AR_PREFIX) + w + rng.choice(_AR_SUFFIX) if rng.random() < 0.4 else w

    def en() -> str:
        w = rng.choice(_EN_WORDS)
        return w + rng.choice(_EN_SUFFIX) if rng.random() < 0.3 else w

    lines: list[str] = []
    for _ in range(n):
        lines.append(" ".join(ar() for _ in range(rng.randint(5, 14))) + rng.choice(("", "؟", ".", "،")))
        s = " ".join(en() for _ in range(rng.randint(5, 14)))
        lines.append(s[0].upper() + s[1:] + rng.choice((".", "?", "!", ",")))
        a, b = rng.randint(0, 9999), rng.randint(1, 999)
        op = rng.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a}{op}{b}={val}")
        lines.append(f"x = {a} * {b} = {a * b}; y = ({a} + {b}) / 2 = {(a + b) / 2}")
        fn = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
        k1, k2 = rng.sample(_KEYS, 2)
        lines.append(f'{{"name": "{fn}", "arguments": {{"{k1}": "{ar()}", "{k2}": {a}}}}}')
        lines.append(
            f"<start_function_call>call:{fn}{{{k1}:<escape>{en()}<escape>,{k2}:{b}}}<end_function_call>"
        )
        desc = " ".join(en() for _ in range(5))
        t = rng.choice(_TYPES)
        lines.append(
            f"<start_function_declaration>declaration:{fn}{{description:<escape>{desc}<escape>,"
            f"parameters:{{properties:{{{k1}:{{description:<escape>{en()}<escape>,type:<escape>{t}<escape>}}}},"
            f"required:[<escape>{k1}<escape>],type:<escape>OBJECT<escape>}}}}<end_function_declaration>"
        )
        role = rng.choice(("user", "model", "developer"))
        lines.append(f"<start_of_turn>{role} {ar()} {en()}<end_of_turn>")
        lines.append(f"<|user|>{en()} {ar()}<|end|><|assistant|>{en()}<|end|>")
    return lines + tokenizer_corpus()


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
def _added_tokens_decoder(tokenizer_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    added = sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"])
    return {str(t["id"]): {k: t[k] for k in keys} for t in added}


def _write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON; key order is the caller's (dicts are built in a fixed order)."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _finish_tokenizer_config(out_dir: Path, extra: dict[str, Any]) -> None:
    """Rewrite tokenizer_config.json: transformers 5 drops added_tokens_decoder and add_bos_token from it
    and writes machine-local keys (vocab_file, is_local, local_files_only)."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k in ("vocab_file", "is_local", "local_files_only", "extra_special_tokens", "name_or_path"):
        cfg.pop(k, None)
    tj = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = _added_tokens_decoder(tj)  # in id order
    cfg["clean_up_tokenization_spaces"] = False
    cfg.update(extra)
    _write_json(path, {k: cfg[k] for k in sorted(cfg)})


def _train_sentencepiece(sp: TinySpec, lines: list[str]) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=GEMMA_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=[t for t, _ in sp.added],
        num_threads=1,
        max_sentence_length=16384,
        minloglevel=2,
    )
    return buf.getvalue()


def build_gemma_tokenizer(sp: TinySpec, out_dir: Path) -> Any:
    """Train the SentencePiece model, save it as tokenizer.model and the transformers files next to it."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    model_bytes = _train_sentencepiece(sp, corpus())
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tokenizer.model"
        src.write_bytes(model_bytes)
        kwargs = GemmaTokenizer.convert_to_native_format(vocab_file=str(src))
        kwargs.pop("vocab_file", None)
        tok = GemmaTokenizer(**kwargs, add_bos_token=True, add_eos_token=False)
    # The SentencePiece user-defined symbols arrive as non-special added tokens: flag the ones the real
    # tokenizer marks special (turn markers). Single ids either way: added tokens are never split.
    specials = [AddedToken(t, special=True, normalized=False) for t, is_special in sp.added if is_special]
    tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = read_template(sp.template)
    tok.padding_side = "left"
    tok.save_pretrained(str(out_dir))
    _finish_tokenizer_config(
        out_dir,
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": sp.model_max_length,
            "padding_side": "left",
            "spaces_between_special_tokens": False,
            "use_default_system_prompt": False,
        },
    )
    return tok


def build_phi_tokenizer(sp: TinySpec, out_dir: Path) -> Any:
    """Byte-level BPE with Phi-4-mini's o200k split and its added tokens appended after the merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=PHI_VOCAB - len(PHI4_SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tk.train_from_iterator(corpus(), trainer=trainer)
    base = tk.get_vocab_size()
    if base != PHI_VOCAB - len(PHI4_SPECIAL_TOKENS):
        raise RuntimeError(f"phi BPE reached {base} tokens, wanted {PHI_VOCAB - len(PHI4_SPECIAL_TOKENS)}")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI4_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = read_template(sp.template)
    tok.save_pretrained(str(out_dir))
    _finish_tokenizer_config(
        out_dir,
        {
            # Real Phi-4-mini names GPT2Tokenizer; for model_type phi3 transformers 5 ignores the class
            # and loads tokenizer.json as is (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": sp.model_max_length,
        },
    )
    return tok


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def _ids(tok: Any, tokens: str | list[str]) -> int | list[int]:
    if isinstance(tokens, str):
        return tok.convert_tokens_to_ids(tokens)
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# "Pretrained-like" scales for the Gemma models, set after transformers' random init (std 0.02
# everywhere, norm gains 1). With that init the tied embedding is so small that the logits are nearly
# flat: at hidden 64 a logit can reach only about 64 * 0.02 = 1.3, and LoRA trains neither the embedding
# nor the final norm, so a fine-tune stalls at a loss near 7 and never gets a tool name right (and GGUF
# parity checks compare near-ties). Trained models have a larger embedding and a large final-norm gain;
# these two values give logits spread like a trained model's (std ~3, up to ~12 on the base) while the
# token embedding (x sqrt(hidden) in Gemma) stays comparable to one layer's normalized output, so the
# layers, not the current token, steer the prediction (an embedding std of 0.5 starts the fine-tune at a
# loss of ~25, every position predicting its own token). Measured on the tiny profile: tool-name
# accuracy of the fine-tuned tiny FunctionGemma 0 -> ~0.8. tiny-phi3 keeps the plain init: the
# classifier reads its hidden states through a trained head, never its LM head.
EMBED_STD = 0.1
FINAL_NORM_GAIN = 4.0


def _pretrained_like_gemma_init(model: Any) -> None:
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight.normal_(0.0, EMBED_STD)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()
        model.model.norm.weight.fill_(FINAL_NORM_GAIN - 1.0)  # Gemma's RMSNorm scales by (1 + weight)


def _build_model(sp: TinySpec, tok: Any) -> Any:
    import torch

    cfg = dict(sp.config)
    eos = _ids(tok, cfg.pop("eos"))
    if sp.family == "gemma3":
        from transformers import Gemma3ForCausalLM as model_cls
        from transformers import Gemma3TextConfig as config_cls

        cfg = {**_GEMMA_CONFIG, **cfg}
    else:
        from transformers import Phi3Config as config_cls
        from transformers import Phi3ForCausalLM as model_cls
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": eos}
    config = config_cls(**cfg, vocab_size=len(tok), **ids)
    # Each tiny model gets its own weights (the two Gemma ones share shapes).
    torch.manual_seed(SEED + int(hashlib.sha256(sp.name.encode()).hexdigest()[:6], 16))
    model = model_cls(config).to(torch.float32)
    if sp.family == "gemma3":
        _pretrained_like_gemma_init(model)
    return model.eval()


def _generation_config(sp: TinySpec, tok: Any) -> Any:
    from transformers import GenerationConfig

    g = dict(sp.generation)
    eos = _ids(tok, g.pop("eos"))
    return GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=eos, **g
    )


def build_tiny(name: str, out_dir: Path) -> dict[str, Any]:
    """Write a complete model directory for tiny model ``name`` into ``out_dir`` and return metadata.

    The directory loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``; the same code gives the same
    bytes (fixed seeds, single-threaded tokenizer training, no paths or times in the files)."""
    sp = spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sp.family == "gemma3":
        tok = build_gemma_tokenizer(sp, out_dir)
    else:
        tok = build_phi_tokenizer(sp, out_dir)
    model = _build_model(sp, tok)
    model.generation_config = _generation_config(sp, tok)
    model.save_pretrained(str(out_dir))
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "name": name,
        "reference": sp.reference,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "params": int(n_params),
        "vocab_size": int(model.config.vocab_size),
        "tokenizer_size": len(tok),
        "chat_template": sp.template,
        "version": TINY_VERSION,
    }
    _write_json(out_dir / "tiny_model.json", dict(sorted(meta.items())))
    return meta
