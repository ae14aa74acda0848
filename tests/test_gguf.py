"""GGUF export + HF-vs-llama.cpp parity on a project-built tiny Gemma-3 model.

Needs llama-cpp-python (``scripts/build_llama_cpp.sh`` builds and installs it and extracts llama.cpp's
converter); skipped only when ``llama_cpp`` is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest

from dagtune.gguf import (
    convert_hf_to_gguf,
    find_llama_cpp_tools,
    inspect_gguf,
    parity_check,
    prepare_export_dir,
    quantize,
    strip_leading_bos,
)

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp not importable: run scripts/build_llama_cpp.sh (builds llama-cpp-python 0.3.36)",
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "user", "content": 'Call get_weather with {"city": "Paris"}'}],
    [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Rabat"}}]'},
        {"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
    ],
    [{"role": "user", "content": "answer: 12 + 30 = ?"}],
    [{"role": "user", "content": "json name arguments { } [ ] : ,"}],
    [{"role": "user", "content": "tool call function weather city model user"}],
]


PLAIN_PROMPT = "plain text without a chat template"  # HF adds BOS itself (add_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# fast unit tests (no llama.cpp needed)
# ----------------------------------------------------------------------------------------------
def test_strip_leading_bos():
    assert strip_leading_bos("<bos><start_of_turn>user", "<bos>") == ("<start_of_turn>user", True)
    assert strip_leading_bos("<bos><bos>x", "<bos>") == ("<bos>x", True)  # strips exactly one
    assert strip_leading_bos("hello", "<bos>") == ("hello", False)
    assert strip_leading_bos("hello", None) == ("hello", False)


def test_prepare_export_dir_restores_special_tokens(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(b"spm")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "extra_special_tokens": ["<start_of_turn>"]})
    )
    added = [
        {"id": 1, "content": "<eos>", "special": True},
        {"id": 2, "content": "<bos>", "special": True},
        {"id": 4, "content": "<start_of_turn>", "special": False},  # named special in the config
        {"id": 7, "content": "<tool>", "special": False},
    ]
    (src / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))

    out = prepare_export_dir(src, tmp_path / "stage")
    dec = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {k: v["special"] for k, v in dec.items()} == {"1": True, "2": True, "4": True, "7": False}
    assert (out / "model.safetensors").is_symlink()  # weights are not copied
    assert "added_tokens_decoder" not in json.loads((src / "tokenizer_config.json").read_text())

    (src / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        prepare_export_dir(src, tmp_path / "stage2")


# ----------------------------------------------------------------------------------------------
# slow: real conversion + parity
# ----------------------------------------------------------------------------------------------
REPLIES = [
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "It is sunny in Paris today.",
    "Done.",
    "42",
    "{ }",
    "ok",
]


def _sharpen(model_dir: Path, steps: int = 60) -> float:
    """Overfit the random-init model on the test prompts (about 10 s on one thread).

    A random-init tiny model has near-uniform logits (|logit| < 1 over 4096 tokens), so its top-1 margins
    are smaller than Q8_0 rounding and top-1 agreement measures noise (0.86 on Q8_0 and BF16 before this
    step, 1.0 on F16). A briefly trained model has real margins, like a fine-tuned one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [
        tok(
            tok.apply_chat_template([*c, {"role": "assistant", "content": r}], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for c, r in zip(CONVERSATIONS, REPLIES, strict=True)
    ]
    ids.append(tok(PLAIN_PROMPT + " and some more words")["input_ids"])
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    labels = input_ids.masked_fill(mask == 0, -100)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads are ~7x slower on a busy 2-core machine
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(model_dir)
    finally:
        torch.set_num_threads(threads)
    return loss.item()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from dagtune.models.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "tiny-gemma3"
    build_tiny("tiny-gemma3", out)
    assert _sharpen(out) < 1.0, "the sharpening fine-tune did not converge"
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    assert all(p.startswith(tok.bos_token) for p in rendered), "the Gemma template starts with <bos>"
    return [*rendered, PLAIN_PROMPT]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    find_llama_cpp_tools()  # fails (not skips) with a clear message when the converter is missing
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def f16_gguf(tiny_model, gguf_dir) -> tuple[Path, dict]:
    before = (tiny_model / "tokenizer_config.json").read_bytes()
    info = convert_hf_to_gguf(tiny_model, gguf_dir / "tiny.f16.gguf", "f16")
    info["source_unchanged"] = (tiny_model / "tokenizer_config.json").read_bytes() == before
    return Path(info["out_file"]), info


@pytest.mark.slow
@needs_llama_cpp
def test_convert_f16_types_special_tokens_as_control(f16_gguf, tiny_model):
    path, info = f16_gguf
    assert path.is_file() and info["seconds"] > 0
    assert info["architecture"] == "gemma3"
    assert {"<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"} <= set(info["control_tokens"])
    assert info["special_tokens_not_control"] == []
    assert info["has_chat_template"]
    assert info["add_bos"] is True
    assert info["source_unchanged"], "convert_hf_to_gguf must not modify the source directory"


@pytest.mark.slow
@needs_llama_cpp
def test_parity_f16(f16_gguf, tiny_model, prompts):
    r = parity_check(tiny_model, f16_gguf[0], prompts, max_new_tokens=16)
    assert r["token_ids_match_rate"] == 1.0, r["token_id_mismatches"]
    assert r["top1_agreement"] >= 0.98
    assert r["top1_agreement_all_positions"] >= 0.98
    # relative to the logit range: the tiny models' pretrained-like init gives logits of +-20
    assert r["max_abs_logit_diff"] < 1e-3 * r["hf_logit_absmax"], r
    assert r["greedy_exact_match_rate"] >= 0.8, r
    assert r["passed"], r["failures"]


@pytest.mark.slow
@needs_llama_cpp
def test_quantize_q8_0_parity(f16_gguf, tiny_model, prompts, gguf_dir):
    q = quantize(f16_gguf[0], gguf_dir / "tiny.q8_0.gguf", "q8_0")
    assert q["size_bytes"] < q["in_size_bytes"] and not q["warnings"]
    assert inspect_gguf(q["out_file"])["special_tokens_not_control"] == []
    r = parity_check(tiny_model, q["out_file"], prompts, max_new_tokens=16, greedy_prompts=2)
    assert r["token_ids_match_rate"] == 1.0, r["token_id_mismatches"]
    assert r["greedy_prompts"] == 2 and r["n_prompts"] == len(prompts) > 2  # greedy on the first two only
    assert r["top1_agreement"] >= 0.98, r
    assert r["max_abs_logit_diff"] < 0.05 * r["hf_logit_absmax"], r
    assert r["top1_agreement_ties_ok"] >= r["top1_agreement"] and r["top1_tie_tolerance"] == 0.0
    assert r["passed"], r["failures"]


@pytest.mark.slow
@needs_llama_cpp
def test_q4_k_m_warns_for_small_models(f16_gguf, gguf_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dagtune.gguf.convert"):
        q = quantize(f16_gguf[0], gguf_dir / "tiny.q4_k_m.gguf", "q4_k_m")
    assert q["warnings"] and "under 1B" in q["warnings"][0]
    assert any("under 1B" in rec.getMessage() for rec in caplog.records)
    assert Path(q["out_file"]).is_file()


@pytest.mark.slow
@needs_llama_cpp
def test_parity_catches_special_tokens_not_control(tiny_model, prompts, gguf_dir):
    """Without the fix-up transformers 5's export loses added_tokens_decoder: <start_of_turn> becomes a
    NORMAL token, llama.cpp splits it into characters, and the parity check must fail."""
    broken = gguf_dir / "broken-export"
    shutil.copytree(tiny_model, broken)
    cfg_path = broken / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("added_tokens_decoder", None)  # what transformers 5 writes
    cfg_path.write_text(json.dumps(cfg))
    info = convert_hf_to_gguf(broken, gguf_dir / "tiny.broken.f16.gguf", "f16", prepare=False)
    assert "<start_of_turn>" in info["special_tokens_not_control"]
    r = parity_check(tiny_model, info["out_file"], prompts, max_new_tokens=8)
    assert not r["passed"]
    assert r["token_ids_match_rate"] < 1.0
    assert r["n_token_id_mismatches"] >= len(CONVERSATIONS)  # every chat-template prompt is affected
    assert r["token_id_mismatches"][0]["llama_len"] > r["token_id_mismatches"][0]["hf_len"]
    assert any("token ids differ" in f for f in r["failures"])


@pytest.mark.slow
@needs_llama_cpp
def test_parity_catches_double_bos(f16_gguf, tiny_model, prompts, monkeypatch):
    """Passing a template's leading <bos> to llama.cpp, which adds its own, must show as an id mismatch."""
    import dagtune.gguf.parity as parity

    monkeypatch.setattr(parity, "strip_leading_bos", lambda text, bos: (text, False))
    r = parity.parity_check(tiny_model, f16_gguf[0], prompts, max_new_tokens=4)
    assert not r["passed"]
    bad = r["token_id_mismatches"][0]
    assert bad["first_diff"] == 1 and bad["llama_len"] == bad["hf_len"] + 1  # <bos><bos>...


def test_compare_top1_near_ties():
    import numpy as np

    from dagtune.gguf.parity import compare_top1

    hf = np.array([1.0, 5.00, 4.98, 0.0])
    assert compare_top1(hf, np.array([1.0, 5.1, 4.9, 0.0]), 0.05) == (True, None)
    agree, flip = compare_top1(hf, np.array([1.0, 4.99, 5.0, 0.0]), 0.05)  # rounding flips 1 -> 2
    assert not agree and (flip["hf_top"], flip["llama_top"], flip["tie"]) == (1, 2, True)
    assert abs(flip["hf_gap"] - 0.02) < 1e-9
    assert compare_top1(hf, np.array([1.0, 4.99, 5.0, 0.0]), 0.0)[1]["tie"] is False  # strict
    agree, flip = compare_top1(hf, np.array([9.0, 5.0, 4.9, 0.0]), 0.05)  # a real disagreement
    assert not agree and flip["llama_top"] == 0 and flip["hf_gap"] == 4.0 and not flip["tie"]


def test_llama_loads_in_threads_keep_stdout(f16_gguf, tiny_model, prompts):
    """Two parity checks can share a process (the convert_gguf nodes as threads): llama-cpp-python's quiet
    load swaps fds 1 and 2, and two at once used to leave the node's stdout (its log relay) on /dev/null."""
    import os
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from dagtune.gguf import parity

    tok = AutoTokenizer.from_pretrained(tiny_model)
    before = os.fstat(1), os.fstat(2), sys.stdout, sys.stderr

    def load(_: int) -> None:
        for _ in range(4):
            parity._token_ids(tok, f16_gguf[0], prompts[:1])
            parity._open_llama(f16_gguf[0], 256, 1, gpu=False).close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(load, range(4)))
    after = os.fstat(1), os.fstat(2), sys.stdout, sys.stderr
    assert [(s.st_dev, s.st_ino) for s in after[:2]] == [(s.st_dev, s.st_ino) for s in before[:2]]
    assert after[2:] == before[2:]


def test_llama_threads_are_the_nodes_share_for_prompt_evaluation_too(f16_gguf):
    """Parity's prompt evaluation (llama.cpp's batch threads) keeps to the node's thread share: left to
    llama-cpp-python it takes every CPU of the host, twice over with two models side by side."""
    import os

    from dagtune.gguf import parity

    llm = parity._open_llama(f16_gguf[0], 256, 1, gpu=False)
    try:
        assert (llm.n_threads, llm.n_threads_batch) == (1, 1)
    finally:
        llm.close()
    llm = parity._open_llama(f16_gguf[0], 256, None, gpu=False)
    try:
        assert llm.n_threads == llm.n_threads_batch == len(os.sched_getaffinity(0))
    finally:
        llm.close()


def test_gguf_header_reader_matches_gguf_py(f16_gguf, tmp_path):
    """dagtune's header reader (262k tokens in 0.3 s instead of 14 s) reads what gguf-py's reader does."""
    from gguf import GGUFReader

    from dagtune.gguf.header import GGUFFormatError, read_gguf_header

    meta, tensors = read_gguf_header(f16_gguf[0])
    ref = GGUFReader(str(f16_gguf[0]), "r")
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token"):  # fmt: skip
        assert meta[key] == ref.fields[key].contents(), key
    assert set(meta) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert [(n, s) for n, s in tensors] == [(t.name, tuple(int(x) for x in t.shape)) for t in ref.tensors]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(GGUFFormatError, match="bad magic"):
        read_gguf_header(bad)
    bad.write_bytes(f16_gguf[0].read_bytes()[:4096])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf_header(bad)


def test_llama_gpu_asked_for_but_unavailable_says_so(f16_gguf, tiny_model, prompts, caplog):
    caplog.set_level(logging.WARNING, logger="dagtune.gguf.parity")
    r = parity_check(tiny_model, f16_gguf[0], prompts[:2], max_new_tokens=2, llama_gpu=True)
    assert r["llama_device"] == "cpu" and set(r["phase_seconds"]) >= {"llama_eval", "hf_forward"}
    assert any("llama.cpp on the GPU was asked for" in m for m in caplog.messages)


@pytest.mark.slow
@needs_llama_cpp
def test_prefix_reuse_gives_the_logits_of_a_fresh_evaluation(f16_gguf):
    """Parity evaluates a prompt from where it leaves the previous one (the shared instruction is not
    computed 64 times): every logit row, reused and new, equals a fresh evaluation's, also after a
    greedy continuation left extra tokens in the cache."""
    import numpy as np

    from dagtune.gguf import parity

    llm = parity._open_llama(f16_gguf[0], 256, 1, gpu=False)
    try:
        shared = llm.tokenize(b"<start_of_turn>user\nExtract the equation from this line:", special=True)
        first = shared + llm.tokenize(b" 12 + 30 = 42<end_of_turn>", add_bos=False, special=True)
        second = shared + llm.tokenize(b" 7 * 6 = 42 apples<end_of_turn>", add_bos=False, special=True)
        llm.reset()
        llm.eval(second)
        fresh = np.array(llm.scores[: len(second)])
        llm.reset()
        llm.eval(first)
        parity._llama_greedy(llm, 4, set())  # the cache now also holds generated tokens
        common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
        assert common >= len(shared)
        assert parity._eval_reusing_prefix(llm, second) == common
        reused = np.array(llm.scores[: len(second)])
        assert llm.n_tokens == len(second)
        np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4)
        assert parity._eval_reusing_prefix(llm, second) == len(second) - 1  # the same prompt: last token only
        np.testing.assert_allclose(np.array(llm.scores[: len(second)]), fresh, rtol=0, atol=1e-4)
    finally:
        llm.close()
