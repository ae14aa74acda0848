"""Project-built tiny models: build, load, tokenizers, the real chat templates, determinism, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dagtune.models as models
from dagtune.models import (
    TINY_MODELS,
    ensure_tiny,
    is_tiny,
    model_fingerprint,
    reference_model,
    resolve_model,
    tiny_inputs,
)
from dagtune.models.tiny import FUNCTION_TOKENS, PHI4_SPECIAL_TOKENS, build_tiny
from dagtune.store import ArtifactStore, content_key

GEMMAS = ("tiny-functiongemma", "tiny-gemma3")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def dirs(store) -> dict[str, Path]:
    return {name: Path(resolve_model(name, store)) for name in TINY_MODELS}


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------
# build + load
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_MODELS)
def test_builds_loads_and_runs(name, dirs):
    import torch
    from transformers import AutoModelForCausalLM

    d = dirs[name]
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (d / f).is_file(), f
    assert (d / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = _tok(d)
    meta = json.loads((d / "tiny_model.json").read_text())
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    assert meta["vocab_size"] == model.config.vocab_size == len(tok) == 4096
    assert model.config.hidden_size == 64
    assert model.config.tie_word_embeddings is True
    if name in GEMMAS:
        assert type(model).__name__ == "Gemma3ForCausalLM"
        assert type(tok).__name__ == "GemmaTokenizer"
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 1)
        assert model.config.head_dim == 32
        # the real 5 sliding : 1 global pattern (llama.cpp hard-codes it for Gemma-3)
        assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        assert (d / "tokenizer.model").is_file()
    else:
        assert type(model).__name__ == "Phi3ForCausalLM"
        assert model.config.rope_parameters["partial_rotary_factor"] == 0.75
        assert model.config.num_hidden_layers == 2
    # bitsandbytes' CPU kernels need every linear width to be a multiple of 32
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 32 == 0 and mod.out_features % 32 == 0, mod_name
    ids = tok("مرحبا 3*4=12 send_email", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape == (1, ids["input_ids"].shape[1], 4096)
    assert torch.isfinite(out.logits).all()


def test_generation_config_stop_ids(dirs):
    from transformers import GenerationConfig

    fg = GenerationConfig.from_pretrained(str(dirs["tiny-functiongemma"]))
    tok = _tok(dirs["tiny-functiongemma"])
    sfr, eot = tok.convert_tokens_to_ids(["<start_function_response>", "<end_of_turn>"])
    assert fg.eos_token_id == [1, sfr, eot] and fg.bos_token_id == 2 and fg.pad_token_id == 0
    g3 = GenerationConfig.from_pretrained(str(dirs["tiny-gemma3"]))
    assert g3.eos_token_id == [1, eot]
    ph = GenerationConfig.from_pretrained(str(dirs["tiny-phi3"]))
    ptok = _tok(dirs["tiny-phi3"])
    assert ph.eos_token_id == ptok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
TEXTS = [
    "أريد أن أرسل رسالة إلى أحمد غدا الساعة 10:30",
    "Send an email to sara@example.com, then call mom!",
    "3*4=12 and (17 + 5) / 2 = 11.0; 9999-1=9998",
    '{"name": "send_email", "arguments": {"to": "x@y.com", "count": 3}}',
    "call:set_alarm{time:<escape>07:00<escape>,enabled:true}",
    "tabs\tand  double spaces\nnew lines ✓ 😀",
]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tokenizer_round_trip(name, dirs):
    tok = _tok(dirs[name])
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids or name == "tiny-phi3"  # phi: unk == <|endoftext|>
        assert tok.decode(ids) == text


def _special_tokens(name: str) -> list[str]:
    if name == "tiny-phi3":
        return list(PHI4_SPECIAL_TOKENS)
    base = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    return base + (list(FUNCTION_TOKENS) if name == "tiny-functiongemma" else [])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_special_tokens_single_ids_after_save_and_reload(name, dirs, tmp_path):
    tok = _tok(dirs[name])
    tok.save_pretrained(str(tmp_path))  # what a training node does with the tokenizer
    for t in (tok, _tok(tmp_path)):
        for s in _special_tokens(name):
            ids = t(s, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] == tok.convert_tokens_to_ids(s), s
            assert t.convert_ids_to_tokens(ids) == [s]
        flags = {a.content: a.special for a in t.added_tokens_decoder.values()}
        if name == "tiny-phi3":
            assert all(flags[s] for s in PHI4_SPECIAL_TOKENS)
            assert t("<|user|>hi")["input_ids"][0] == t.convert_tokens_to_ids("<|user|>")
        else:
            # As in the real tokenizers: turn markers are special, FunctionGemma's call tokens are not
            # (so decode(skip_special_tokens=True) keeps the calls).
            assert flags["<start_of_turn>"] and flags["<end_of_turn>"] and flags["<bos>"]
            ids = t("<start_of_turn>user\n")["input_ids"]
            assert ids[:3] == [2, 6, t.convert_tokens_to_ids("user")]
            assert t.convert_ids_to_tokens(ids) == ["<bos>", "<start_of_turn>", "user", "<0x0A>"]
    if name == "tiny-functiongemma":
        text = "<start_function_call>call:f{a:<escape>x<escape>}<end_function_call><end_of_turn>"
        assert all(not flags[s] for s in FUNCTION_TOKENS)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text.replace(
            "<end_of_turn>", ""
        )


@pytest.mark.parametrize("name", GEMMAS)
def test_sentencepiece_model_matches_transformers(name, dirs):
    """llama.cpp tokenizes with tokenizer.model: it must give the same ids as the HF tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(dirs[name] / "tokenizer.model"))
    tok = _tok(dirs[name])
    assert sp.get_piece_size() == len(tok)
    assert [sp.id_to_piece(i) for i in range(8)] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "[multimodal]",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    for text in TEXTS + ["<start_of_turn>model\n<escape>قيمة<escape><end_of_turn>"]:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text


def test_tokenizer_config_keeps_added_tokens_decoder(dirs):
    cfg = json.loads((dirs["tiny-functiongemma"] / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True
    assert cfg["added_tokens_decoder"]["6"] == {
        "content": "<start_of_turn>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert cfg["added_tokens_decoder"]["14"]["content"] == "<escape>"
    assert "vocab_file" not in cfg and "is_local" not in cfg


# ----------------------------------------------------------------------------------------------
# chat templates
# ----------------------------------------------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email.",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string", "description": "Recipient address"},
                    "count": {"type": "integer", "description": "How many copies"},
                },
                "required": ["to"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_flashlight",
            "description": "Turn the flashlight on or off.",
            "parameters": {
                "type": "object",
                "properties": {
                    "on": {"type": "boolean", "description": "State"},
                    "mode": {"type": "string", "enum": ["soft", "bright"], "description": "Mode"},
                },
                "required": ["on"],
            },
        },
    },
]
DEV = {
    "role": "developer",
    "content": "You are a model that can do function calling with the following functions",
}
USER = {"role": "user", "content": "أرسل بريدا إلى ahmed@example.com ثلاث مرات"}
CALL = {
    "role": "assistant",
    "tool_calls": [
        {
            "type": "function",
            "function": {"name": "send_email", "arguments": {"to": "ahmed@example.com", "count": 3}},
        }
    ],
}
FG_PROMPT = (
    "<bos><start_of_turn>developer\n"
    "You are a model that can do function calling with the following functions"
    "<start_function_declaration>declaration:send_email{description:<escape>Send an email.<escape>,"
    "parameters:{properties:{count:{description:<escape>How many copies<escape>,type:<escape>INTEGER<escape>},"
    "to:{description:<escape>Recipient address<escape>,type:<escape>STRING<escape>}},"
    "required:[<escape>to<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>"
    "<start_function_declaration>declaration:set_flashlight{description:<escape>Turn the flashlight on or off.<escape>,"
    "parameters:{properties:{mode:{description:<escape>Mode<escape>,enum:[<escape>soft<escape>,<escape>bright<escape>],"
    "type:<escape>STRING<escape>},on:{description:<escape>State<escape>,type:<escape>BOOLEAN<escape>}},"
    "required:[<escape>on<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>\n"
    "<start_of_turn>user\nأرسل بريدا إلى ahmed@example.com ثلاث مرات<end_of_turn>\n"
    "<start_of_turn>model\n"
)
FG_CALL = (
    "<start_function_call>call:send_email{count:3,to:<escape>ahmed@example.com<escape>}"
    "<end_function_call><start_function_response>"
)


def test_functiongemma_template_tool_call(dirs):
    tok = _tok(dirs["tiny-functiongemma"])
    prompt = tok.apply_chat_template([DEV, USER], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([DEV, USER, CALL], tools=TOOLS, tokenize=False)
    assert prompt == FG_PROMPT
    assert full == FG_PROMPT + FG_CALL
    ids = tok.apply_chat_template([DEV, USER, CALL], tools=TOOLS)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1  # one <bos>: the template writes it, tokenizing adds none
    assert ids[-2:] == tok.convert_tokens_to_ids(["<end_function_call>", "<start_function_response>"])


def test_functiongemma_template_negative_and_tool_response(dirs):
    tok = _tok(dirs["tiny-functiongemma"])
    reply = {"role": "assistant", "content": "لا أستطيع المساعدة في ذلك."}
    full = tok.apply_chat_template([DEV, USER, reply], tools=TOOLS, tokenize=False)
    assert full == FG_PROMPT + "لا أستطيع المساعدة في ذلك.<end_of_turn>\n"
    conv = [DEV, USER, CALL, {"role": "tool", "name": "send_email", "content": "sent"}]
    assert tok.apply_chat_template(conv, tools=TOOLS, tokenize=False, add_generation_prompt=True) == (
        FG_PROMPT
        + "<start_function_call>call:send_email{count:3,to:<escape>ahmed@example.com<escape>}<end_function_call>"
        + "<start_function_response>response:send_email{value:<escape>sent<escape>}<end_function_response>"
    )


def test_functiongemma_declaration_matches_reference_rendering(dirs):
    """Expected string recorded from the chat template embedded in FunctionGemma's own GGUF (a third-party
    test suite), independent of this project's template file."""
    tok = _tok(dirs["tiny-functiongemma"])
    torch_tool = {
        "type": "function",
        "function": {
            "name": "set_torch",
            "description": "Turn the torch on or off.",
            "parameters": {
                "type": "object",
                "properties": {"on": {"type": "boolean", "description": "Torch state"}},
                "required": ["on"],
            },
        },
    }
    text = tok.apply_chat_template([USER], tools=[torch_tool], tokenize=False)
    assert text.startswith(
        "<bos><start_of_turn>developer\n<start_function_declaration>declaration:set_torch"
        "{description:<escape>Turn the torch on or off.<escape>,"
        "parameters:{properties:{on:{description:<escape>Torch state<escape>,type:<escape>BOOLEAN<escape>}},"
        "required:[<escape>on<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>\n"
    )


def _system_user_assistant(tok, system: str, user: str, assistant: str) -> tuple[list[dict], str, str]:
    """(conversation, the rendered prompt of system + user, the rendered whole conversation)."""
    conv = [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]  # fmt: skip
    prompt = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    return conv, prompt, tok.apply_chat_template(conv, tokenize=False)


def test_gemma3_template_with_system(dirs):
    tok = _tok(dirs["tiny-gemma3"])
    conv, prompt, full = _system_user_assistant(
        tok, "Extract the equation.", "He had 3 boxes of 4 apples, 12 in all.", "<eq>3*4=12</eq>"
    )
    assert prompt == (
        "<bos><start_of_turn>user\nExtract the equation.\n\nHe had 3 boxes of 4 apples, 12 in all.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert full == prompt + "<eq>3*4=12</eq><end_of_turn>\n"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([conv[1], conv[1]], tokenize=False)


def test_phi4_mini_template(dirs):
    tok = _tok(dirs["tiny-phi3"])
    conv, prompt, full = _system_user_assistant(tok, "Is the solution correct?", "2+2=5", "wrong")
    assert prompt == "<|system|>Is the solution correct?<|end|><|user|>2+2=5<|end|><|assistant|>"
    assert full == prompt + "wrong<|end|><|endoftext|>"
    ids = tok.apply_chat_template(conv[:2], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>") and ids[-1] == tok.convert_tokens_to_ids(
        "<|assistant|>"
    )


@pytest.mark.parametrize("name", GEMMAS)
def test_tokenizer_knows_the_synthetic_vocabulary(name, dirs):
    """The corpus holds the synthetic data's words (as a real tokenizer would know its language): each
    word of a tool name, each Arabic tool keyword and each argument key is one token."""
    from dagtune.data.synthetic import DEVELOPER_PROMPT, KEYWORDS, SYNTHETIC_TOOLS

    tok = _tok(dirs[name])

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for schema, _, _ in SYNTHETIC_TOOLS:
        fn = schema["function"]
        words = fn["name"].split("_")
        assert n(fn["name"]) == 2 * len(words) - 1, fn["name"]  # words and the underscores between
        for key in fn["parameters"]["properties"]:
            assert n(key) == 2 * key.count("_") + 1, key
    assert all(n(" " + w) == 1 for w in KEYWORDS.values())
    assert n(DEVELOPER_PROMPT) <= 14


@pytest.mark.parametrize("name", GEMMAS)
def test_gemma_init_has_pretrained_like_scales(name, dirs):
    """Not transformers' std-0.02 init (near-flat logits that LoRA cannot sharpen): a larger tied
    embedding and final-norm gain, so the base model already has a trained model's logit range."""
    import torch
    from transformers import AutoModelForCausalLM

    from dagtune.models.tiny import EMBED_STD, FINAL_NORM_GAIN

    model = AutoModelForCausalLM.from_pretrained(str(dirs[name])).eval()
    emb = model.get_input_embeddings().weight
    assert torch.all(emb[model.config.pad_token_id] == 0)
    assert abs(emb[1:].std().item() - EMBED_STD) < 0.02 * EMBED_STD
    assert torch.allclose(
        model.model.norm.weight, torch.full_like(model.model.norm.weight, FINAL_NORM_GAIN - 1)
    )
    # the layers keep transformers' init
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    tok = _tok(dirs[name])
    with torch.no_grad():
        logits = model(**tok("<start_of_turn>user\nمرحبا<end_of_turn>\n", return_tensors="pt")).logits[0, -1]
    assert logits.std().item() > 1.0 and logits.max().item() > 5.0


# ----------------------------------------------------------------------------------------------
# determinism, cache, fingerprints
# ----------------------------------------------------------------------------------------------
def _file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "manifest.json"}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_build_is_deterministic(name, dirs, tmp_path):
    meta = build_tiny(name, tmp_path / name)
    assert meta["name"] == name and meta["vocab_size"] == 4096
    assert _file_bytes(tmp_path / name) == _file_bytes(dirs[name])


def test_tiny_models_differ(dirs):
    a = (dirs["tiny-functiongemma"] / "model.safetensors").read_bytes()
    b = (dirs["tiny-gemma3"] / "model.safetensors").read_bytes()
    assert a != b


def test_resolve_model_builds_once(tmp_path, monkeypatch):
    calls = []
    real = models.build_tiny

    def counting(name, out):
        calls.append(name)
        return real(name, out)

    monkeypatch.setattr(models, "build_tiny", counting)
    store = ArtifactStore(tmp_path / "artifacts")
    p1 = resolve_model("tiny-phi3", store)
    p2 = resolve_model("tiny-phi3", store)
    assert p1 == p2 and calls == ["tiny-phi3"]
    art, ran = ensure_tiny("tiny-phi3", store)
    assert not ran and art.path == p1
    assert art.key == content_key(tiny_inputs("tiny-phi3"))
    assert art.manifest()["metrics"]["params"] > 0
    assert Path(p1) == store.path("base_models", art.key)


def test_resolve_local_and_hub(tmp_path, dirs, store, monkeypatch):
    from huggingface_hub import constants

    # a hub id loads as the snapshot of its resolved commit: offline with an empty cache that fails
    # clearly instead of loading whatever main is (the tests run offline: conftest)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(Exception, match="(?i)cache|offline"):
        resolve_model("microsoft/Phi-4-mini-instruct", store, revision="c" * 40)
    assert resolve_model(str(dirs["tiny-phi3"]), store) == str(dirs["tiny-phi3"].resolve())
    assert is_tiny("tiny-gemma3") and not is_tiny("google/gemma-3-1b-it")
    assert reference_model("tiny-phi3") == "microsoft/Phi-4-mini-instruct"
    with pytest.raises(ValueError):
        tiny_inputs("gpt2")


def test_model_fingerprint(tmp_path, dirs, store):
    fp = model_fingerprint("tiny-functiongemma", store)
    assert fp == {"tiny": "tiny-functiongemma", "artifact_key": dirs["tiny-functiongemma"].name}
    # a hub id is keyed by the commit its revision resolves to (see tests/test_hub_revisions.py)
    assert model_fingerprint("unsloth/functiongemma-270m-it", store, revision="c" * 40) == {
        "hub_id": "unsloth/functiongemma-270m-it",
        "revision": "c" * 40,
    }
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(dirs["tiny-gemma3"], a)
    shutil.copytree(dirs["tiny-gemma3"], b)
    fa = model_fingerprint(str(a), store)
    assert set(fa) == {"local_sha256"} and fa == model_fingerprint(str(b), store)  # path-independent
    tpl = b / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + " ")
    assert model_fingerprint(str(b), store) != fa
    (a / "model.safetensors").write_bytes(b"x")  # weights: size counts
    assert model_fingerprint(str(a), store) != fa
