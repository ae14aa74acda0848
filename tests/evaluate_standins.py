"""Small stand-ins of the evaluate node's upstream artifacts (prepare_data splits, training outputs)
built with the project's tiny models, so the node can be tested without running the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from dagtune.data.tools import normalize_tool
from dagtune.formats import END_OF_TURN, format_eq, format_function_call
from dagtune.models import resolve_model
from dagtune.store import Artifact, ArtifactStore

NEGATIVE_REPLY = "لا يحتاج هذا الطلب إلى استدعاء أي أداة."
# The function-calling datasets' tool form; normalize_tool adds the OpenAI wrapper and "type": "object".
TOOLS = [
    normalize_tool(
        {
            "name": "get_weather",
            "description": "weather forecast",
            "parameters": {
                "properties": {"city": {"type": "string", "description": "city"}},
                "required": ["city"],
            },
        }
    ),
    normalize_tool(
        {
            "name": "book_hotel",
            "description": "book a hotel",
            "parameters": {
                "properties": {
                    "city": {"type": "string", "description": "city"},
                    "nights": {"type": "integer", "description": "nights"},
                },
                "required": ["city", "nights"],
            },
        }
    ),
]
FC_ROWS = [
    ("MSA", "weather", "أريد معرفة الطقس في الرياض", "get_weather", {"city": "الرياض"}),
    ("Gulf", "weather", "أبغى الطقس في جدة", "get_weather", {"city": "جدة"}),
    ("Egyptian", "travel", "عايز فندق في القاهرة 3 ليالي", "book_hotel", {"city": "القاهرة", "nights": 3}),
    ("Levantine", "travel", "بدي فندق في بيروت 2 ليالي", "book_hotel", {"city": "بيروت", "nights": 2}),
    ("MSA", "unknown", "كيف حالك اليوم؟", None, None),
    ("Gulf", "unknown", "شلونك اليوم؟", None, None),
]
EX_ROWS = [
    ("Sara has 3 apples and gets 4 more, so Sara has 3 + 4 = 7 apples.", "3+4=7", "correct"),
    ("After selling 5 of them, 12 - 5 = 8 books remain.", "12-5=8", "flawed"),
    ("Let us count the cards in each of the 4 boxes.", "", "missing"),
    ("Each of the 6 bags holds 2 coins, so there are 6 * 2 = 12 coins.", "6*2=12", "correct"),
]
CL_ROWS = [
    (
        "Omar has 5 toys and gets 3 more. How many?",
        "Omar starts with 5 toys and gets 3 more, so 5 + 3 = 8. The answer is 8.",
        0,
        "",
    ),
    (
        "Omar has 5 toys and gets 3 more. How many?",
        "Omar starts with 5 toys and gets 3 more, so 5 + 3 = 9. The answer is 9.",
        1,
        "arithmetic",
    ),
    (
        "Lina has 9 cards and gives 4 away. How many are left?",
        "Lina starts with 9 cards and gives away 4, so 9 + 4 = 13. The answer is 13.",
        1,
        "wrong_operation",
    ),
    (
        "Lina has 9 cards and gives 4 away. How many are left?",
        "Lina starts with 9 cards and gives away 4, so 9 - 4 = 5.\nThe answer is 5.",
        0,
        "",
    ),
    (
        "There are 4 boxes with 6 pens each. How many pens?",
        "There are 4 boxes with 6 pens each, so 4 * 6 = 24. The answer is 25.",
        1,
        "final_answer",
    ),
    (
        "There are 4 boxes with 6 pens each. How many pens?",
        "There are 4 boxes with 6 pens each, so 4 * 6 = 24. The answer is 24.",
        0,
        "",
    ),
]
EXTRACT_INSTRUCTION = "Extract the equation from this line as <eq>lhs=rhs</eq> (empty if none):\n"


def _tok(name: str, store: ArtifactStore) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name, store))


def _render(tok: Any, messages: list[dict[str, str]], **kw: Any) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)


def write_prepare_data(out: Path, store: ArtifactStore) -> None:
    fg, g3, phi = (_tok(n, store) for n in ("tiny-functiongemma", "tiny-gemma3", "tiny-phi3"))
    fc = []
    for i, (dialect, domain, user, name, args) in enumerate(FC_ROWS):
        prompt = _render(fg, [{"role": "user", "content": user}], tools=TOOLS)
        completion = (format_function_call(name, args) if name else NEGATIVE_REPLY) + END_OF_TURN
        fc.append(
            {
                "id": f"fc-{i}",
                "prompt": prompt,
                "completion": completion,
                "text": prompt + completion,
                "dialect": dialect,
                "domain": domain,
                "has_call": name is not None,
                "target_name": name or "",
                "target_arguments": json.dumps(args or {}, ensure_ascii=False),
                "tools": json.dumps(TOOLS, ensure_ascii=False),
            }
        )
    ex = []
    for i, (line, eqn, kind) in enumerate(EX_ROWS):
        prompt = _render(g3, [{"role": "user", "content": EXTRACT_INSTRUCTION + line}])
        completion = format_eq(eqn) + END_OF_TURN
        ex.append(
            {
                "id": f"ex-{i}",
                "prompt": prompt,
                "completion": completion,
                "text": prompt + completion,
                "line": line,
                "eqn": eqn,
                "type": kind,
            }
        )
    cl = []
    for i, (q, sol, label, err) in enumerate(CL_ROWS):
        prompt = _render(
            phi, [{"role": "user", "content": f"Question: {q}\nSolution: {sol}\nIs it correct?"}]
        )
        completion = ("flawed" if label else "correct") + "<|end|>"
        cl.append(
            {
                "id": f"cl-{i}",
                "prompt": prompt,
                "completion": completion,
                "text": prompt + completion,
                "question": q,
                "solution": sol,
                "label": label,
                "error_type": err,
            }
        )
    for task, rows in (("function_calling", fc), ("extractor", ex), ("classifier", cl)):
        (out / task).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            pd.DataFrame(rows).to_parquet(out / task / f"{split}.parquet", index=False)


def write_training(out: Path, store: ArtifactStore, base: str, *, garbage_seed: int | None) -> None:
    """merged/ = the base model, or (garbage_seed) the base re-initialized at random; a train log."""
    src = Path(resolve_model(base, store))
    merged = out / "merged"
    shutil.copytree(src, merged, ignore=shutil.ignore_patterns("manifest.json", "tiny_model.json"))
    if garbage_seed is not None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(garbage_seed)
        model = AutoModelForCausalLM.from_pretrained(str(merged))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        model.save_pretrained(str(merged))
    log = [
        {"step": s, "loss": 3.0 / s, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_second": 100.0}
        for s in range(1, 6)
    ]
    (out / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n{broken json\n")


class KeywordClassifier:
    """Stand-in for the trained classifier: 'flawed' (0.8) for the three flawed CL_ROWS solutions."""

    MARKERS = ("= 9.", "= 13.", "answer is 25")

    def predict_proba(self, texts: list[str]) -> list[float]:
        return [0.8 if any(m in t for m in self.MARKERS) else 0.2 for t in texts]


def make_upstream(store: ArtifactStore, *, garbage: bool = True) -> dict[str, Artifact]:
    """prepare_data + the three training artifacts, committed into ``store`` like real nodes."""
    ups: dict[str, Artifact] = {}
    ups["prepare_data"], _ = store.build(
        "prepare_data", {"standin": "prepare_data"}, lambda out, _s: write_prepare_data(out, store)
    )
    for node, base, seed in (
        ("train_function_calling", "tiny-functiongemma", 1),
        ("train_extractor", "tiny-gemma3", 2),
    ):
        inputs = {"standin": node, "garbage": garbage, "config": {"model": {"name": base}}}
        ups[node], _ = store.build(
            node,
            inputs,
            lambda out, _s, b=base, s=seed: write_training(
                out, store, b, garbage_seed=s if garbage else None
            ),
        )

    def clf(out: Path, _s: Path) -> None:
        (out / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")

    ups["train_classifier"], _ = store.build(
        "train_classifier", {"standin": "train_classifier", "config": {"model": {"name": "tiny-phi3"}}}, clf
    )
    return ups
