"""train_classifier on tiny-phi3 (CPU): last-non-pad-token pooling independent of the padding side,
class weights, the artifact and its loader (reproduces the trained model's logits), early stopping, and
resume after an interruption giving the same weights as an uninterrupted run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_training_common import (
    prepared_data,
    progress_lines,
    progress_steps,
    shared_store,
    tiny_ctx,
    tiny_section,
    tokenizer,
)

from dagtune.training import classifier as K

FAST = {
    "optim": {"max_steps": 8},
    "log_every": 2,
    "checkpoint_every": 100,
    "early_stopping": {"eval_every": 4},
}


def test_last_token_index_left_and_right():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert K.last_token_index(right).tolist() == [2, 4, 0]
    assert K.last_token_index(left).tolist() == [4, 4, 4]


def test_pooling_does_not_depend_on_padding_side():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dagtune import runtime as R
    from dagtune.models import resolve_model

    lm = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-phi3", shared_store()))
    sec = tiny_section("train_classifier")
    lm = get_peft_model(lm, R.lora_config(sec, R.resolve_target_modules(lm, ["all-linear"]), None))
    torch.manual_seed(0)
    for n, p in lm.named_parameters():  # non-zero LoRA B so the adapter matters
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model = K.LastTokenClassifier(K.decoder_of(lm), lm.config.hidden_size, 2).eval()
    tok = tokenizer("tiny-phi3")
    df = pd.read_parquet(prepared_data().dir / "classifier" / "validation.parquet")
    texts = [t[: 40 + 17 * i] for i, t in enumerate(df["prompt"][:6])]  # different lengths
    enc = K.encode(tok, texts, None)
    assert len({len(e) for e in enc}) > 3
    with torch.no_grad():
        tok.padding_side = "right"
        right = model(**K.collate(enc, tok))
        tok.padding_side = "left"
        left = model(**K.collate(enc, tok))
        alone = torch.cat([model(**K.collate([e], tok)) for e in enc])
    tok.padding_side = "right"
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


def test_class_weights():
    labels = [0, 0, 0, 1]
    assert K.class_weights(None, labels, 2) is None
    assert K.class_weights("balanced", labels, 2) == pytest.approx([4 / 6, 2.0])
    assert K.class_weights([1, 3], labels, 2) == [1.0, 3.0]
    with pytest.raises(ValueError):
        K.class_weights([1.0], labels, 2)


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    y, p = [0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 0, 0, 0]
    m = K.classification_metrics(y, p, 2)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert K.classification_metrics([0, 0], [0, 0], 2)["macro_f1"] == pytest.approx(0.5)


def _head(out):
    return load_file(str(out / K.HEAD_FILE))


def test_train_classifier_artifact_and_loader(tmp_path):
    with progress_lines() as lines:
        m = K.build_classifier(tiny_ctx(tmp_path, "train_classifier", **FAST, class_weights="balanced"))
    out = tmp_path / "out"
    # The progress line: 8 planned steps, a tenth rounds up to one step: a line at each, in order.
    assert progress_steps(lines, "train_classifier") == [(i, 8, "") for i in range(1, 9)]
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", K.HEAD_FILE, K.CONFIG_FILE,
              "tokenizer/tokenizer.json", "merged/model.safetensors", "train_log.jsonl", K.REFERENCE_FILE):  # fmt: skip
        assert (out / f).is_file(), f
    conf = json.loads((out / K.CONFIG_FILE).read_text())
    assert conf["num_labels"] == 2 and conf["pooling"] == "last_non_pad_token"
    assert m["backend"] == "hf" and m["steps"] == 8 and m["trainable_params"] > 0
    assert set(m["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    y = pd.read_parquet(prepared_data().dir / "classifier" / "train.parquet")["label"].tolist()
    assert m["class_weights"] == pytest.approx(K.class_weights("balanced", y, 2))
    for k in (
        "val_loss",
        "val_macro_f1",
        "val_accuracy",
        "peak_memory_bytes",
        "tokens_per_second",
        "train_loss",
    ):
        assert m[k] is not None, k
    # The timing hook's phases (what the real-size GPU benchmark reads) and the runtime's reasons.
    t = m["timings"]
    assert set(t) == {"startup_s", "load_s", "prepare_s", "first_step_s", "steady_s", "checkpoint_s",
                      "validate_s", "merge_s", "save_s", "steady_tokens_per_s", "peak_mem_gib"}  # fmt: skip
    in_process = ("peak_mem_gib", "startup_s")  # no GPU; called in this process, not started by a parent
    assert all(t[k] > 0 for k in t if k not in in_process) and t["peak_mem_gib"] is None
    assert t["startup_s"] is None
    assert t["checkpoint_s"] < t["steady_s"]  # the checkpoint writes happen between steady steps
    assert set(m["runtime_reasons"]) == {"device", "backend", "dtype", "load_in_4bit", "attn_implementation"}
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4, 6, 8]
    assert [r["step"] for r in log if "eval_macro_f1" in r] == [4, 8]

    # The loader rebuilds the classifier from the artifact alone and reproduces the trained logits.
    ref = json.loads((out / K.REFERENCE_FILE).read_text())
    model, tok = K.load_classifier(out)
    torch.testing.assert_close(model.logits(ref["texts"]), torch.tensor(ref["logits"]), atol=1e-5, rtol=1e-5)
    tok.padding_side = "left"
    torch.testing.assert_close(model.logits(ref["texts"]), torch.tensor(ref["logits"]), atol=1e-5, rtol=1e-5)
    p = K.predict_proba(model, ref["texts"])
    assert p.shape == (len(ref["texts"]), 2)
    assert abs(p.sum(1) - 1).max() < 1e-5

    # Without merged/, base + adapter give the same logits.
    import shutil

    shutil.rmtree(out / "merged")
    model2, _ = K.load_classifier(out)
    torch.testing.assert_close(model2.logits(ref["texts"]), torch.tensor(ref["logits"]), atol=1e-4, rtol=1e-4)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    # A learning rate too small to move anything: macro-F1 never improves after the first evaluation.
    ctx = tiny_ctx(
        tmp_path,
        "train_classifier",
        optim={"max_steps": 30, "learning_rate": 1e-12},
        early_stopping={"metric": "macro_f1", "eval_every": 2, "patience": 2},
        log_every=2,
        checkpoint_every=100,
        save_merged=False,
    )
    with progress_lines() as lines:
        m = K.build_classifier(ctx)
    assert m["stopped_early"] and m["best_step"] == 2
    # N is the planned maximum; the last line is the step it stopped at, and says so.
    steps = progress_steps(lines, "train_classifier")
    assert [s for s, _, _ in steps] == [3, 6, 6] and {n for _, n, _ in steps} == {30}
    assert steps[-1][2].startswith(", stopped early after ")
    assert m["steps"] == 6 < m["planned_steps"]  # evaluations at 2 (best), 4, 6 -> patience 2 exhausted
    assert not (tmp_path / "out" / "merged").exists()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    """Kill the loop right after its step-4 checkpoint, rerun: it resumes at step 4 and ends with the
    same weights as a run that was never interrupted (data order, RNG, optimizer and scheduler restored)."""
    upd = {"optim": {"max_steps": 10}, "log_every": 1, "checkpoint_every": 4, "early_stopping": {"eval_every": 3},
           "save_merged": False}  # fmt: skip
    full = K.build_classifier(tiny_ctx(tmp_path / "full", "train_classifier", **upd))

    from transformers import Trainer

    real_save = Trainer._save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(self, *a, **kw):
        real_save(self, *a, **kw)
        if self.state.global_step == 4:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        K.build_classifier(tiny_ctx(tmp_path / "cut", "train_classifier", **upd))
    monkeypatch.setattr(Trainer, "_save_checkpoint", real_save)
    resumed = K.build_classifier(tiny_ctx(tmp_path / "cut", "train_classifier", **upd))
    assert resumed["resumed_from_step"] == 4 and resumed["steps_this_run"] == 6 and resumed["steps"] == 10
    a, b = _head(tmp_path / "full" / "out"), _head(tmp_path / "cut" / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)
    aa = load_file(str(tmp_path / "full" / "out" / "adapter" / "adapter_model.safetensors"))
    bb = load_file(str(tmp_path / "cut" / "out" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(aa[k], bb[k]) for k in aa)
    assert resumed["val_loss"] == full["val_loss"] and resumed["best_step"] == full["best_step"]
    log = [json.loads(x) for x in (tmp_path / "cut" / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    assert [r for r in log if r.get("event") == "resume"][0]["step"] == 4


class _Planted:
    """A pickle that, when unpickled, writes a marker file (what a malicious checkpoint would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng_state.pth"])
def test_resume_never_unpickles_a_planted_checkpoint_file(tmp_path, monkeypatch, planted):
    """Resume loads the checkpoint with weights_only (tensors and plain containers only): a pickle that
    would run code is refused with an error naming it, and the code never runs."""
    import pickle

    from transformers import Trainer

    upd = {"optim": {"max_steps": 4}, "log_every": 1, "checkpoint_every": 2, "early_stopping": {"eval_every": 100},
           "save_merged": False}  # fmt: skip
    real_save = Trainer._save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(self, *a, **kw):
        real_save(self, *a, **kw)
        raise Killed

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        K.build_classifier(tiny_ctx(tmp_path, "train_classifier", **upd))
    monkeypatch.setattr(Trainer, "_save_checkpoint", real_save)
    ckpt = tmp_path / "scratch" / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "marker"
    assert (ckpt / planted).is_file()
    (ckpt / planted).write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        K.build_classifier(tiny_ctx(tmp_path, "train_classifier", **upd))
    assert not marker.exists()
    pickle.loads((ckpt / planted).read_bytes())  # the planted file does run code when unpickled
    assert marker.exists()
