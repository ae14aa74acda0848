"""The dagtune pipeline flow: wiring only (the run form is dagtune.run_request.RunRequest)."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dagtune.run_request import RunRequest
from tasks.convert_gguf_extractor import convert_gguf_extractor
from tasks.convert_gguf_function_calling import convert_gguf_function_calling
from tasks.evaluate import evaluate
from tasks.prepare_data import prepare_data
from tasks.register import register
from tasks.report import publish_report
from tasks.train_classifier import train_classifier
from tasks.train_extractor import train_extractor
from tasks.train_function_calling import train_function_calling


@flow(name="dagtune", task_runner=ThreadPoolTaskRunner(max_workers=4))
def dagtune_pipeline(run: RunRequest = RunRequest()) -> list[dict]:  # noqa: B008 - a frozen default form
    """Retrain, evaluate, export and register dagtune's three LoRA models.

    Nodes (idempotent and content-keyed: a node whose inputs did not change is reused, not re-run):
    prepare_data (the three datasets, validated and split) -> train_function_calling, train_extractor,
    train_classifier (LoRA fine-tunes; one model-loading node per GPU at a time) -> evaluate (each model
    against its base) and convert_gguf_function_calling / convert_gguf_extractor (GGUF Q8_0,
    parity-checked in llama.cpp; each starts when its own training ends) -> register (MLflow
    versions, lineage tags, promotion gate). The run publishes a report artifact (node table, fine-tuned
    vs base, gate decisions, MLflow links) and a table of headline metrics.
    """
    cfg = run.load()
    only, force = run.only, run.force
    data = prepare_data.submit(cfg, {}, only, force)
    up = {"prepare_data": data}
    fc = train_function_calling.submit(cfg, up, only, force)
    ex = train_extractor.submit(cfg, up, only, force)
    cl = train_classifier.submit(cfg, up, only, force)
    trained = {**up, "train_function_calling": fc, "train_extractor": ex, "train_classifier": cl}
    ev = evaluate.submit(cfg, trained, only, force)
    g_fc = convert_gguf_function_calling.submit(cfg, {**up, "train_function_calling": fc}, only, force)
    g_ex = convert_gguf_extractor.submit(cfg, {**up, "train_extractor": ex}, only, force)
    exports = {"convert_gguf_function_calling": g_fc, "convert_gguf_extractor": g_ex}
    reg = register.submit(cfg, {**trained, "evaluate": ev, **exports}, only, force)
    results = [f.result() for f in (data, fc, ex, cl, ev, g_fc, g_ex, reg)]
    publish_report(cfg, results)
    return results
