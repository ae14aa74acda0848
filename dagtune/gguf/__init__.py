"""GGUF export and HF-vs-llama.cpp parity checks (no Prefect; heavy imports live inside functions).

Public API:

- :func:`prepare_export_dir` -- fix up an exported HF directory so llama.cpp's converter keeps the
  tokenizer's special tokens as CONTROL tokens (transformers 5 no longer writes ``added_tokens_decoder``).
- :func:`convert_hf_to_gguf` -- run llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python
  sdist, see ``scripts/build_llama_cpp.sh``) in a subprocess.
- :func:`quantize` -- quantize a GGUF file through ``llama_cpp.llama_model_quantize``.
- :func:`inspect_gguf` -- tokenizer facts of a GGUF file (control tokens, chat template, add_bos).
- :func:`parity_check` -- token ids, next-token logits and greedy generation, HF vs llama.cpp.
"""

from dagtune.gguf.convert import (
    LLAMA_CPP_PYTHON_VERSION,
    convert_hf_to_gguf,
    find_llama_cpp_tools,
    inspect_gguf,
    prepare_export_dir,
    quantize,
)
from dagtune.gguf.parity import parity_check, strip_leading_bos

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "convert_hf_to_gguf",
    "find_llama_cpp_tools",
    "inspect_gguf",
    "parity_check",
    "prepare_export_dir",
    "quantize",
    "strip_leading_bos",
]
