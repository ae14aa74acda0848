"""Glue for the ``register`` node: pipeline artifacts -> MLflow runs and registered versions.

Kept thin on purpose: it only knows the artifact layouts (``adapter/``, ``merged/``,
``train_log.jsonl``, ``<model>/<model>.<quant>.gguf``, ``metrics.json``) and calls the library.

Idempotent: each model's digest (sha256 over the files that make the version) is looked up before
anything is logged, so a rerun logs no model twice and registers no version twice; it does open a new
parent run (one MLflow run per pipeline run) with child runs holding each node's params, metrics and
reports. A server that stops mid-way raises RegistryUnavailable; the artifacts stay in the store and
the rerun picks up where registration stopped (including the gate of a version already created).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagtune.registry import models as mdl
from dagtune.registry import registry as reg
from dagtune.registry import rescore
from dagtune.registry.gate import Evidence, decide
from dagtune.registry.identity import content_digest
from dagtune.registry.parent import open_experiment_on_training_runs, record_pipeline_run
from dagtune.registry.tracking import (
    TAG_ARTIFACT_KEY,
    RetryPolicy,
    Tracker,
    child_run,
    connect,
    log_model_retrying,
    parent_run,
    pipeline_tags,
    read_jsonl,
)
from dagtune.store import Artifact, ArtifactStore

log = logging.getLogger("dagtune.registry")

# registered-model key -> (training node, task key in evaluate's metrics.json)
TRAIN_NODE = {
    "function_calling": "train_function_calling",
    "extractor": "train_extractor",
    "classifier": "train_classifier",
}
GENERATIVE = ("function_calling", "extractor")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding this dagtune package


@dataclass(frozen=True)
class RunInfo:
    """What the orchestrator knows about this pipeline run (dagtune never imports Prefect)."""

    config_hash: str
    profile: str
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    repo_dir: Path | None = None
    resolved_config: dict[str, Any] | None = None  # logged as the parent run's config artifact


def tracker_for(cfg: Any) -> Tracker:
    r = cfg.register
    return connect(cfg.tracking_uri, RetryPolicy(r.retries, r.backoff_seconds), cfg.state_dir)


def resolve_model_name(cfg: Any, model: str) -> tuple[str, Any | None]:
    """A CLI argument -> (registered name, its RegisteredModel config or None). Accepts the config
    key (function_calling | extractor | classifier) or the registered name itself."""
    models = cfg.register.models
    if model in models:
        return models[model].name, models[model]
    for rm in models.values():
        if rm.name == model:
            return rm.name, rm
    return model, None


def _file_sha(manifest: Mapping[str, Any], rel: str) -> str | None:
    return next((f["sha256"] for f in manifest.get("files", []) if f["path"] == rel), None)


def _gguf_file(gguf: Artifact | None, model: str, quant: str) -> Path | None:
    if gguf is None:
        return None
    p = gguf.dir / model / f"{model}.{quant}.gguf"
    return p if p.is_file() else None


def _eval_block(evaluate: Artifact | None, model: str) -> dict[str, Any] | None:
    if evaluate is None or not (evaluate.dir / "metrics.json").is_file():
        return None
    block = json.loads((evaluate.dir / "metrics.json").read_text()).get(model) or {}
    return block.get("fine_tuned")


def _components(model: str, cfg: Any, arts: Mapping[str, Artifact]) -> dict[str, dict[str, Any]]:
    """What this model's version is made of: {role: {node, key, sha256, path}}; sha256 is the
    digest of the role's files (a single file's own sha256 for the GGUF)."""
    train = arts[TRAIN_NODE[model]]
    tm = train.manifest()
    parts: dict[str, dict[str, Any]] = {}
    if model == "classifier":
        parts["classifier"] = {"node": train.node, "key": train.key, "sha256": content_digest(tm, train.dir)}
        parts["classifier"]["path"] = str(train.dir)
        return parts
    for role in ("adapter", "merged"):
        if (train.dir / role).is_dir():
            parts[role] = {
                "node": train.node,
                "key": train.key,
                "sha256": content_digest(tm, train.dir, f"{role}/"),
                "path": str(train.dir / role),
            }
    quant = cfg.register.gguf_quantization
    gguf = arts.get(f"convert_gguf_{model}")
    gguf_path = _gguf_file(gguf, model, quant)
    if gguf is not None and gguf_path is not None:
        rel = gguf_path.relative_to(gguf.dir).as_posix()
        parts[f"gguf_{quant}"] = {
            "node": gguf.node,
            "key": gguf.key,
            "sha256": _file_sha(gguf.manifest(), rel) or "",
            "path": str(gguf_path),
        }
    return parts


def _log_version_model(
    model: str,
    cfg: Any,
    run_id: str,
    parts: Mapping[str, Mapping[str, Any]],
    meta: dict[str, Any],
    arts: Mapping[str, Artifact],
) -> tuple[Any, dict[str, str]]:
    """Log what the version serves; returns (ModelInfo of the registered model, extra tags)."""
    extra: dict[str, str] = {}
    if model == "classifier":
        threshold = float((meta.get("eval") or {}).get("threshold", 0.5))
        info = mdl.log_classifier_model(
            run_id,
            parts["classifier"]["path"],
            loader=cfg.register.classifier_loader,
            threshold=threshold,
            metadata={"digest": meta["digest"]},
        )
        return info, {**extra, "dagtune.serving": "classifier"}
    gguf_role = next((r for r in parts if r.startswith("gguf_")), None)
    merged = parts.get("merged")
    if merged is not None and cfg.register.log_merged_model:
        merged_info = mdl.log_merged_model(run_id, merged["path"], metadata={"digest": meta["digest"]})
        extra["dagtune.merged_model_uri"] = merged_info.model_uri
    if gguf_role is None and merged is None:
        raise reg.RegistryError(f"{model}: neither a GGUF file nor a merged model to register")
    gguf_info = None
    if gguf_role is not None:
        extras = {"adapter": parts["adapter"]["path"]} if "adapter" in parts else {}
        gguf_info = mdl.log_gguf_model(
            run_id,
            parts[gguf_role]["path"],
            name="gguf" if merged is not None else "model",
            extra_artifacts=extras,
            max_tokens=cfg.register.gguf_max_tokens,
            metadata={"digest": meta["digest"]},
        )
    if merged is None:  # no HF checkpoint: the GGUF (llama.cpp, prompt in, text out) is what it serves
        extra["dagtune.serving"] = "gguf"
        return gguf_info, extra
    if gguf_info is not None:
        extra["dagtune.gguf_model_uri"] = gguf_info.model_uri
    # the merged checkpoint behind the task signature: messages+tools -> calls, line -> equation
    info = mdl.log_task_model(
        run_id, model, merged["path"], metadata={"digest": meta["digest"]}, **task_settings(model, arts)
    )
    extra["dagtune.serving"] = "task"
    return info, extra


def task_settings(model: str, arts: Mapping[str, Artifact]) -> dict[str, Any]:
    """What the task model needs from the run that built it: the developer turn prepare_data rendered
    and evaluate's generation length and batch size (the same batches give the same greedy output)."""
    out: dict[str, Any] = {}
    data, evaluate = arts.get("prepare_data"), arts.get("evaluate")
    if model == "function_calling" and data is not None:
        section = data.manifest()["inputs"].get("config", {}).get(model, {})
        out["developer_prompt"] = section.get("developer_prompt", "")
    if evaluate is not None:
        section = evaluate.manifest()["inputs"].get("config", {})
        out.update({k: section[k] for k in ("max_new_tokens", "batch_size") if k in section})
    return out


def register_model(
    tracker: Tracker,
    cfg: Any,
    model: str,
    arts: Mapping[str, Artifact],
    node_runs: Mapping[str, str],
    run: RunInfo,
) -> dict[str, Any]:
    rm = cfg.register.models[model]
    parts = _components(model, cfg, arts)
    digest = reg.combined_digest({role: p["sha256"] for role, p in parts.items()})
    eval_metrics = _eval_block(arts.get("evaluate"), model)
    existing = reg.find_version_by_digest(tracker, rm.name, digest)
    if existing is None:
        train = arts[TRAIN_NODE[model]]
        tm = train.manifest()
        run_id = node_runs[train.node]
        meta = {"digest": digest, "eval": eval_metrics}
        exp_id = tracker.call("get run", tracker.client.get_run, run_id).info.experiment_id
        info, extra = log_model_retrying(
            tracker,
            f"log model {model}",
            exp_id,
            run_id,
            lambda: _log_version_model(model, cfg, run_id, parts, meta, arts),
        )
        if eval_metrics is not None:
            reg.log_eval_metrics(tracker, run_id, model, eval_metrics)
        data = arts.get("prepare_data")
        revisions = hub_revisions(arts, model)
        tags = reg.version_tags(
            artifacts={r: {k: v for k, v in p.items() if k != "path"} for r, p in parts.items()},
            dataset_digest=reg.manifest_digest(data.manifest()) if data else None,
            eval_metrics=eval_metrics,
            train_seconds=tm.get("metrics", {}).get("train_seconds", tm.get("timings", {}).get("seconds")),
            flow_run_id=run.flow_run_id,
            flow_run_url=run.flow_run_url,
            extra={**extra, **({"dagtune.hub_revisions": revisions} if revisions else {})},
        )
        mv, created = reg.register_version(
            tracker, rm.name, info.model_uri, digest, tags, run_id=run_id, model_id=info.model_id
        )
    else:
        mv, created = existing, False
    gate = reg.gate_and_alias(
        tracker,
        rm.name,
        mv,
        lambda champion: decide(gate_evidence(cfg, model, arts, champion, rm.gate), reg.Gate.of(rm.gate)),
        auto_promote=cfg.register.auto_promote,
    )
    champion = reg.alias_version(tracker, rm.name, reg.CHAMPION)
    challenger = reg.alias_version(tracker, rm.name, reg.CHALLENGER)
    return {
        "name": rm.name,
        "version": str(mv.version),
        "created": created,
        "digest": digest,
        "gate_passed": gate.passed,
        "gate_reasons": gate.reasons,
        "gate": gate.details,
        "champion": str(champion.version) if champion is not None else None,
        "challenger": str(challenger.version) if challenger is not None else None,
    }


def gate_evidence(cfg: Any, model: str, arts: Mapping[str, Artifact], champion: Any, gate: Any) -> Evidence:
    """Per-example scores for the gate: this run's fine-tune and its base (evaluate's predictions) and
    the champion's on the same rows (dagtune.registry.rescore); what could not be scored says why."""
    metric = reg.Gate.of(gate).metric
    evaluate, data = arts.get("evaluate"), arts.get("prepare_data")
    if evaluate is None or data is None:
        return Evidence(None, None, champion_source="no evaluate artifact in this run")
    ft, base = rescore.run_scores(evaluate, model, metric)
    ev = Evidence(
        ft.scores if ft else None,
        base.scores if base else None,
        base_kind="majority-class baseline" if model == "classifier" else "base model",
        challenger_metrics=ft.metrics if ft else None,
    )
    if champion is None:
        return ev
    ev.champion_version = str(champion.version)
    from dagtune.evaluation.generate import resolve_device

    store = ArtifactStore(cfg.artifact_root)
    scorer = rescore.Rescorer(store, resolve_device(cfg.runtime.device), cfg.register.classifier_loader)
    try:
        scored = rescore.champion_scores(store, evaluate, data, model, champion, metric, scorer)
    except rescore.Unavailable as e:
        ev.champion_source = str(e)
    except Exception as e:  # a champion that cannot be loaded or scored: the gate says so, no promotion
        log.warning("gate: %s champion v%s could not be re-scored: %s", model, champion.version, e)
        ev.champion_source = f"re-scoring failed: {type(e).__name__}: {e}"
    else:
        ev.champion, ev.champion_metrics, ev.champion_source = scored.scores, scored.metrics, scored.source
    return ev


def hub_revisions(arts: Mapping[str, Artifact], model: str) -> dict[str, Any]:
    """Hub commits this model was built from (base model, hub datasets), from the manifests' key inputs."""
    out: dict[str, Any] = {}
    train = arts.get(TRAIN_NODE[model])
    base = ((train.manifest()["inputs"].get("extra") or {}).get("model") or {}) if train else {}
    if base.get("revision"):
        out["base_model"] = {"id": base.get("hub_id"), "revision": base["revision"]}
    data = arts.get("prepare_data")
    sources = ((data.manifest()["inputs"].get("extra") or {}).get("sources") or {}) if data else {}
    hub = (sources.get(model) or {}).get("hub")
    if hub:
        out["dataset"] = hub
    return out


def registry_block(register_dir: str | Path | None) -> dict[str, Any] | None:
    """For the CLI: per model the version, whether it was created, the gate outcome and the aliases,
    from the register node's ``registered.json``."""
    p = Path(register_dir) / "registered.json" if register_dir else None
    if p is None or not p.is_file():
        return None
    models = json.loads(p.read_text()).get("models", {})
    keys = ("name", "version", "created", "gate_passed", "gate_reasons", "champion", "challenger")
    return {m: {k: r.get(k) for k in keys} for m, r in models.items()}


def registry_lines(block: Mapping[str, Any]) -> list[str]:
    """Human lines for ``dagtune run``: one per model, then the gate's reasons indented."""
    lines = []
    for model, r in block.items():
        outcome = "passed" if r["gate_passed"] else "failed"
        new = "new version" if r["created"] else "existing version"
        lines.append(
            f"  {model:<18} {r['name']} v{r['version']} ({new}): gate {outcome}; "
            f"champion v{r['champion']}, challenger v{r['challenger']}"
        )
        lines.extend(f"      - {why}" for why in r.get("gate_reasons") or [])
    return lines


def register_pipeline(
    cfg: Any,
    arts: Mapping[str, Artifact],
    run: RunInfo,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Track the pipeline run and register every model whose training artifact is present.

    ``arts`` maps node name -> Artifact (prepare_data, train_*, evaluate, convert_gguf_*; missing ones
    are skipped). Returns ``{"parent_run_id", "models": {model: {...}}, "seconds": {phase: s}}``: the
    seconds of connecting, of the pipeline and node runs, and of each model (logging, gate, aliases)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    tracker = tracker or tracker_for(cfg)
    lap("connect")
    tags = pipeline_tags(
        flow_run_id=run.flow_run_id,
        flow_run_url=run.flow_run_url,
        config_hash=run.config_hash,
        profile=run.profile,
        repo_dir=run.repo_dir,
    )
    out: dict[str, Any] = {"models": {}}
    name = f"pipeline-{(run.flow_run_id or run.config_hash)[:12]}"
    with parent_run(tracker, cfg.register.experiment, run_name=name, tags=tags) as parent_id:
        out["parent_run_id"] = parent_id
        record_pipeline_run(tracker, parent_id, tags, run.resolved_config)
        open_experiment_on_training_runs(tracker, tracker.experiment_id(cfg.register.experiment))
        node_runs: dict[str, str] = {}
        for node, art in arts.items():
            manifest = art.manifest()
            node_runs[node] = child_run(
                tracker,
                parent_id,
                node,
                # the node's own config section, as recorded in its manifest's key inputs
                params=manifest.get("inputs", {}).get("config", {}),
                metrics=manifest.get("metrics", {}),
                artifacts_dir=art.dir,
                step_metrics=read_jsonl(art.dir / "train_log.jsonl"),
                tags={TAG_ARTIFACT_KEY: art.key},
            )
        lap("runs")
        for model in cfg.register.models:
            if TRAIN_NODE[model] in arts:
                out["models"][model] = register_model(tracker, cfg, model, arts, node_runs, run)
                lap(model)
    out["seconds"] = seconds
    log.info("register: %s", ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return out


def build(ctx: Any) -> dict[str, Any]:
    """The ``register`` node: track the run and register the three models (see module docstring).
    It sees its own section only; the tracking URI and state dir come from the run's settings."""
    from types import SimpleNamespace

    view = SimpleNamespace(
        register=ctx.section,
        tracking_uri=ctx.settings.tracking_uri,
        state_dir=ctx.settings.state_dir,
        artifact_root=ctx.settings.artifact_root,  # the champion's artifacts, for re-scoring it
        runtime=ctx.runtime,
    )
    run = RunInfo(
        config_hash=ctx.settings.config_hash,
        profile=ctx.settings.profile,
        flow_run_id=ctx.settings.flow_run_id,
        flow_run_url=ctx.settings.flow_run_url,
        # the commit of the code that ran, wherever the config file lives
        repo_dir=PROJECT_ROOT,
        resolved_config=ctx.settings.resolved_config,
    )
    result = register_pipeline(view, ctx.upstream, run)
    (ctx.out / "registered.json").write_text(json.dumps(result, indent=2, default=str))
    return {
        model: {k: r.get(k) for k in ("version", "created", "gate_passed", "champion", "challenger")}
        for model, r in result["models"].items()
    }


def key_inputs(cfg: Any) -> dict[str, Any]:
    """Registering into another tracking server is another output. Hashed: a URI may hold credentials."""
    import hashlib

    from dagtune.redact import redact_uri

    # Without the credentials: a password change is not another output (nor guessable from a hash).
    uri = redact_uri(cfg.tracking_uri)
    if uri == f"sqlite:///{cfg.state_dir / 'mlflow.db'}":  # the embedded store moves with the state dir
        uri = "sqlite:///<state_dir>/mlflow.db"
    return {"tracking_uri_sha256": hashlib.sha256(uri.encode()).hexdigest()}
