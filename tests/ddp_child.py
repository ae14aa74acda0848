"""Run by tests/test_training_ddp.py, under ``torchrun --nproc_per_node N`` or plain python: one training
node's real build function on the tiny profile. Every rank shares the node's scratch directory (as the
launcher gives it) and gets an output directory of its own, so the test sees which rank wrote what;
each rank leaves a result JSON with its metrics and the training micro-batches it collated (a hash per
example, in order)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import test_training_common as H  # noqa: E402
from transformers import Trainer  # noqa: E402

from dagtune.store import Artifact, ArtifactStore  # noqa: E402
from dagtune.training import classifier, ddp, sft  # noqa: E402

EVALUATING = [False]


def _recording_evaluate(real):
    def evaluate(self, *a, **kw):
        EVALUATING[0] = True
        try:
            return real(self, *a, **kw)
        finally:
            EVALUATING[0] = False

    return evaluate


def _recording_collator(real, seen: list[list[str]]):
    def make(tokenizer):
        collate = real(tokenizer)

        def collate_and_record(items):
            if not EVALUATING[0]:
                seen.append([hashlib.sha1(json.dumps(it["input_ids"]).encode()).hexdigest() for it in items])
            return collate(items)

        return collate_and_record

    return make


def run_node(spec: dict) -> None:
    rank = ddp.world().rank
    work = Path(spec["work"])
    seen: list[list[str]] = []
    classifier.collator = _recording_collator(REAL_COLLATOR, seen)
    section = H.tiny_section(spec["node"], **spec["updates"])
    ctx = H.make_ctx(work, spec["node"], section, Artifact("prepare_data", "t", spec["data"]))
    ctx.out = work / f"out-rank{rank}"  # the test's view of who writes; the launcher gives one out dir
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.store = ArtifactStore(spec["store"])
    build = {"train_classifier": classifier.build_classifier, "train_extractor": sft.build_extractor}
    metrics = build[spec["node"]](ctx)
    result = {"rank": rank, "world": list(ddp.world()), "metrics": metrics, "micro_batches": seen}
    (work / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))


REAL_COLLATOR = classifier.collator


def main(spec_path: str) -> None:
    """The spec file holds a list of node runs, done one after another in this process."""
    Trainer.evaluate = _recording_evaluate(Trainer.evaluate)
    for spec in json.loads(Path(spec_path).read_text()):
        run_node(spec)


if __name__ == "__main__":
    main(sys.argv[1])
