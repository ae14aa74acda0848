"""HF -> GGUF conversion with llama.cpp's own converter, plus quantization through llama-cpp-python.

The converter (``convert_hf_to_gguf.py``, its ``conversion/`` package and the matching ``gguf-py/``) is
not in the llama-cpp-python wheel nor in the ``gguf`` PyPI package: ``scripts/build_llama_cpp.sh``
extracts it from the llama-cpp-python sdist. :func:`find_llama_cpp_tools` locates it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REPO_ROOT = Path(__file__).resolve().parents[2]

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType)
TOKEN_TYPE_NAMES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
TOKEN_TYPE_CONTROL = 3

# qtype -> name of the llama_ftype constant in llama_cpp (LLAMA_FTYPE_MOSTLY_<NAME>)
QTYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_0": "MOSTLY_Q5_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_0": "MOSTLY_Q4_0",
}
SMALL_MODEL_PARAMS = 1_000_000_000
_LOW_BIT_QTYPES = {"q4_k_m", "q4_0"}


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------
def wheel_cache_dir() -> Path:
    """The wheel/tool cache shared across checkouts and CI runs (``$DAGTUNE_WHEEL_CACHE``)."""
    return Path(os.environ.get("DAGTUNE_WHEEL_CACHE", Path.home() / ".cache" / "dagtune" / "wheels"))


def find_llama_cpp_tools() -> Path:
    """Directory holding llama.cpp's ``convert_hf_to_gguf.py`` (+ ``conversion/`` and ``gguf-py/``).

    Looks in ``$DAGTUNE_LLAMA_CPP_TOOLS``, ``<state_dir>/llama_cpp_tools`` (``$DAGTUNE_STATE_DIR`` or the
    repo's ``.state``) and ``<wheel cache>/llama_cpp_tools-<version>``, in that order.

    Raises:
        FileNotFoundError: none found; run ``scripts/build_llama_cpp.sh``.
    """
    candidates: list[Path] = []
    if env := os.environ.get("DAGTUNE_LLAMA_CPP_TOOLS"):
        candidates.append(Path(env))
    state = Path(os.environ.get("DAGTUNE_STATE_DIR", REPO_ROOT / ".state"))
    candidates += [
        state / "llama_cpp_tools",
        REPO_ROOT / ".state" / "llama_cpp_tools",
        wheel_cache_dir() / f"llama_cpp_tools-{LLAMA_CPP_PYTHON_VERSION}",
    ]
    for cand in candidates:
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py" / "gguf").is_dir():
            return cand
    raise FileNotFoundError(
        "llama.cpp converter not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run scripts/build_llama_cpp.sh, which extracts it from the llama-cpp-python sdist"
    )


# ----------------------------------------------------------------------------------------------
# export dir fix-up
# ----------------------------------------------------------------------------------------------
def _special_token_strings(tok_cfg: dict[str, Any], special_map: dict[str, Any]) -> set[str]:
    """Strings of the tokenizer's special tokens (bos/eos/pad/unk/... and extra/additional ones)."""
    out: set[str] = set()

    def add(value: Any) -> None:
        if isinstance(value, str):
            out.add(value)
        elif isinstance(value, dict) and isinstance(value.get("content"), str):
            out.add(value["content"])
        elif isinstance(value, list | tuple):
            for v in value:
                add(v)

    for cfg in (tok_cfg, special_map):
        for key, value in cfg.items():
            if key.endswith("_token") or key in ("additional_special_tokens", "extra_special_tokens"):
                add(value)
    return out


def restored_added_tokens_decoder(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Rebuild transformers-4 style ``added_tokens_decoder`` from ``tokenizer.json``'s ``added_tokens``.

    Every token the tokenizer treats as special (tokenizer.json ``special: true``, or named as a
    bos/eos/pad/unk/extra special token in ``tokenizer_config.json``) gets ``"special": true``; that is
    what makes llama.cpp's converter type it CONTROL.
    """
    model_dir = Path(model_dir)
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    stm_path = model_dir / "special_tokens_map.json"
    special_map = json.loads(stm_path.read_text()) if stm_path.is_file() else {}
    special_strings = _special_token_strings(tok_cfg, special_map)

    decoder: dict[str, dict[str, Any]] = {}
    tj_path = model_dir / "tokenizer.json"
    if tj_path.is_file():
        for tok in json.loads(tj_path.read_text()).get("added_tokens", []):
            decoder[str(tok["id"])] = {
                "content": tok["content"],
                "lstrip": bool(tok.get("lstrip", False)),
                "normalized": bool(tok.get("normalized", False)),
                "rstrip": bool(tok.get("rstrip", False)),
                "single_word": bool(tok.get("single_word", False)),
                "special": bool(tok.get("special", False)) or tok["content"] in special_strings,
            }
    # tokens named special in the config but absent from tokenizer.json's added_tokens: look them up
    # in the SentencePiece model (ids must come from somewhere authoritative)
    known = {v["content"] for v in decoder.values()}
    missing = special_strings - known
    if missing and (model_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        for s in sorted(missing):
            tid = sp.PieceToId(s)
            if tid != sp.unk_id() or s == sp.IdToPiece(sp.unk_id()):
                decoder[str(tid)] = {
                    "content": s,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
    return dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))


def _link_model_files(model_dir: Path, target: Path) -> None:
    """Symlink every file of ``model_dir`` into ``target`` (weights are not copied), replacing old entries."""
    target.mkdir(parents=True, exist_ok=True)
    for src in model_dir.iterdir():
        dst = target / src.name
        if dst.exists() or dst.is_symlink():
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            else:
                dst.unlink()
        dst.symlink_to(src)


def _ensure_tokenizer_model(model_dir: Path, target: Path, tokenizer_source: Path | None) -> None:
    """Copy ``tokenizer.model`` from ``tokenizer_source`` when ``target`` lacks it; error when neither has it."""
    if (target / "tokenizer.model").is_file():
        return
    src = Path(tokenizer_source) / "tokenizer.model" if tokenizer_source else None
    if src is None or not src.is_file():
        raise FileNotFoundError(
            f"{model_dir}/tokenizer.model is missing (pass tokenizer_source=<base model dir>); llama.cpp's "
            "Gemma converter needs the SentencePiece model to build a vocab that round-trips"
        )
    shutil.copy2(src, target / "tokenizer.model")


def _merged_added_tokens_decoder(
    restored: dict[str, dict[str, Any]], existing: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The config's own entries over the restored ones, but never downgrading a special token; id-sorted."""
    merged = {**restored, **existing}
    for tid, entry in restored.items():
        if entry["special"]:
            merged[tid] = {**merged[tid], "special": True}
    return dict(sorted(merged.items(), key=lambda kv: int(kv[0])))


def _write_tokenizer_config(model_dir: Path, target: Path) -> dict[str, Any]:
    """Write ``target``'s tokenizer_config.json with the restored ``added_tokens_decoder``; returns it."""
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    restored = restored_added_tokens_decoder(model_dir)
    existing = cfg.get("added_tokens_decoder") or {}
    cfg["added_tokens_decoder"] = _merged_added_tokens_decoder(restored, existing)
    if cfg_path.is_symlink():  # an edited copy, never a write through to model_dir
        cfg_path.unlink()
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return cfg


def _has_chat_template(cfg: dict[str, Any], target: Path) -> bool:
    if cfg.get("chat_template"):
        return True
    return (target / "chat_template.jinja").is_file() or (target / "chat_template.json").is_file()


def prepare_export_dir(
    model_dir: Path,
    out_dir: Path | None = None,
    tokenizer_source: Path | None = None,
) -> Path:
    """Make an exported HF model directory convertible without losing the chat-format tokens.

    Fixes (each learned on this project):

    - ``tokenizer.model`` must be present (the Gemma converter builds the SentencePiece vocab from it);
      copied from ``tokenizer_source`` when missing there, else :class:`FileNotFoundError`.
    - ``tokenizer_config.json`` gets ``added_tokens_decoder`` back with ``"special": true`` for the
      tokenizer's special tokens. transformers 5 stopped writing it; without it ``<start_of_turn>`` is a
      NORMAL token in the GGUF and llama.cpp tokenizes it as characters.
    - the chat template must be present (``chat_template`` in tokenizer_config.json or
      ``chat_template.jinja``) so that it is embedded in the GGUF metadata; a warning otherwise.

    Args:
        model_dir: exported (merged) HF model directory.
        out_dir: where to write the prepared directory; ``None`` fixes ``model_dir`` in place. Otherwise
            files are symlinked from ``model_dir`` (weights are not copied) and the edited files written.
        tokenizer_source: a directory (e.g. the base model) to take ``tokenizer.model`` from if missing.

    Returns:
        The prepared directory.
    """
    model_dir = Path(model_dir).resolve()
    target = model_dir if out_dir is None else Path(out_dir)
    if out_dir is not None:
        _link_model_files(model_dir, target)
    _ensure_tokenizer_model(model_dir, target, tokenizer_source)
    cfg = _write_tokenizer_config(model_dir, target)
    if not _has_chat_template(cfg, target):
        logger.warning("%s has no chat template; the GGUF will carry none", model_dir)
    decoder = cfg["added_tokens_decoder"]
    n_special = sum(1 for e in decoder.values() if e["special"])
    logger.info("prepared %s: %d added tokens (%d special)", target, len(decoder), n_special)
    return target


# ----------------------------------------------------------------------------------------------
# GGUF inspection
# ----------------------------------------------------------------------------------------------
def inspect_gguf(gguf_file: Path) -> dict[str, Any]:
    """Tokenizer and size facts of a GGUF file, for checks and manifests.

    Returns:
        ``architecture``, ``file_type``, ``n_params``, ``size_bytes``, ``n_vocab``, ``has_chat_template``,
        ``add_bos``, ``bos_token_id``, ``eos_token_id``, ``control_tokens`` (strings typed CONTROL),
        ``special_tokens_not_control`` (``<...>``-looking tokens that are not CONTROL, e.g. a broken
        ``<start_of_turn>``).
    """
    from math import prod

    from dagtune.gguf.header import read_gguf_header

    meta, tensors = read_gguf_header(Path(gguf_file))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_TYPE_CONTROL]
    suspicious = [
        t
        for t, ty in zip(tokens, types, strict=False)
        if ty in (1, 4)
        and t.startswith("<")
        and t.endswith(">")
        and len(t) > 2
        and not t.startswith("<0x")
        and not t.startswith("<unused")
    ]
    return {
        "architecture": meta.get("general.architecture"),
        "file_type": meta.get("general.file_type"),
        "n_params": int(sum(prod(shape) for _, shape in tensors)),
        "size_bytes": Path(gguf_file).stat().st_size,
        "n_vocab": len(tokens),
        "has_chat_template": bool(meta.get("tokenizer.chat_template")),
        "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "control_tokens": control,
        "special_tokens_not_control": suspicious,
    }


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------
def convert_hf_to_gguf(
    model_dir: Path,
    out_file: Path,
    outtype: str = "f16",
    *,
    prepare: bool = True,
    tokenizer_source: Path | None = None,
    tools_dir: Path | None = None,
    timeout_s: float | None = 3600,
) -> dict[str, Any]:
    """Convert an HF model directory to one GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    Runs offline (``HF_HUB_OFFLINE=1``) in a subprocess with the sdist's ``gguf-py`` first on
    ``PYTHONPATH`` (the PyPI ``gguf`` of the same version number is older than the vendored tree).

    Args:
        model_dir: HF model directory (merged weights + tokenizer files).
        out_file: GGUF file to write (parent directories are created).
        outtype: ``f16`` | ``bf16`` | ``f32`` | ``q8_0`` (the converter's own ``--outtype``).
        prepare: apply :func:`prepare_export_dir` to a symlinked staging copy first (``model_dir`` is
            never modified). ``False`` converts the directory as it is.
        tokenizer_source: passed to :func:`prepare_export_dir`.
        tools_dir: converter location; default :func:`find_llama_cpp_tools`.
        timeout_s: subprocess timeout.

    Returns:
        ``{"out_file", "outtype", "seconds", "size_bytes", "prepared", "converter", **inspect_gguf(...)}``.

    Raises:
        RuntimeError: the converter failed (the message carries the end of its output).
    """
    model_dir = Path(model_dir).resolve()
    out_file = Path(out_file).resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tools = Path(tools_dir) if tools_dir else find_llama_cpp_tools()
    script = tools / "convert_hf_to_gguf.py"

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tools / "gguf-py"), str(tools)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.pop("NO_LOCAL_GGUF", None)

    with tempfile.TemporaryDirectory(prefix=".gguf-stage-", dir=out_file.parent) as stage:
        src = prepare_export_dir(model_dir, Path(stage) / "model", tokenizer_source) if prepare else model_dir
        tmp_out = out_file.with_name(out_file.name + ".partial")
        cmd = [sys.executable, str(script), str(src), "--outfile", str(tmp_out), "--outtype", outtype]
        logger.info("converting %s -> %s (%s)", model_dir, out_file, outtype)
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, env=env, cwd=str(tools), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not tmp_out.is_file():
        tmp_out.unlink(missing_ok=True)
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (rc={proc.returncode}):\n{tail}")
    os.replace(tmp_out, out_file)
    info = inspect_gguf(out_file)
    mb, total = out_file.stat().st_size / 1e6, time.perf_counter() - t0
    logger.info("%s written in %.1fs (%.0f MB; converter %.1fs)", out_file.name, total, mb, seconds)
    if info["special_tokens_not_control"]:
        logger.warning(
            "%s: special-looking tokens not typed CONTROL: %s (llama.cpp will split them into characters)",
            out_file.name,
            info["special_tokens_not_control"][:10],
        )
    return {
        "out_file": str(out_file),
        "outtype": outtype,
        "seconds": round(seconds, 3),
        "prepared": prepare,
        "converter": str(script),
        **info,
    }


def quantize(
    in_gguf: Path,
    out_gguf: Path,
    qtype: str = "q8_0",
    *,
    nthread: int | None = None,
    n_params: int | None = None,
) -> dict[str, Any]:
    """Quantize a GGUF file with ``llama_cpp.llama_model_quantize`` (the ``llama-quantize`` binary is
    not shipped in the llama-cpp-python wheel).

    Args:
        in_gguf: F16/BF16/F32 GGUF file.
        out_gguf: output file.
        qtype: one of :data:`QTYPES` (``q8_0``, ``q4_k_m``, ...). ``q4_k_m``/``q4_0`` log a warning for
            models under 1B parameters: small models lose bracket (JSON) syntax at 4 bits.
        nthread: quantization threads (default: all cores).
        n_params: the input's parameter count when the caller has it (``convert_hf_to_gguf``'s result):
            reading it from the file parses the whole vocabulary in Python, seconds for 262k tokens.

    Returns:
        ``{"out_file", "qtype", "seconds", "size_bytes", "in_size_bytes", "n_params", "warnings"}``.
    """
    import ctypes

    import llama_cpp

    qtype = qtype.lower()
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; known: {sorted(QTYPES)}")
    in_gguf, out_gguf = Path(in_gguf), Path(out_gguf)
    out_gguf.parent.mkdir(parents=True, exist_ok=True)

    warnings: list[str] = []
    n_params = n_params if n_params is not None else inspect_gguf(in_gguf)["n_params"]
    if qtype in _LOW_BIT_QTYPES and n_params < SMALL_MODEL_PARAMS:
        msg = (
            f"{qtype.upper()} on a {n_params / 1e6:.1f}M-parameter model: models under 1B parameters lose "
            "bracket/JSON syntax at 4 bits; prefer q8_0"
        )
        logger.warning(msg)
        warnings.append(msg)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QTYPES[qtype]}")
    params.nthread = nthread or os.cpu_count() or 1
    tmp_out = out_gguf.with_name(out_gguf.name + ".partial")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(in_gguf).encode(), str(tmp_out).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - t0
    if rc != 0 or not tmp_out.is_file():
        tmp_out.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({in_gguf} -> {qtype}) failed with code {rc}")
    os.replace(tmp_out, out_gguf)
    logger.info("%s quantized to %s in %.1fs", in_gguf.name, qtype, seconds)
    return {
        "out_file": str(out_gguf),
        "qtype": qtype,
        "seconds": round(seconds, 3),
        "size_bytes": out_gguf.stat().st_size,
        "in_size_bytes": in_gguf.stat().st_size,
        "n_params": n_params,
        "warnings": warnings,
    }
