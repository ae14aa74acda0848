"""The DAG: which nodes exist, what each depends on, and how one node runs against the store.

A node is a plain function ``build(ctx) -> metrics`` that writes its files into ``ctx.out``. Its
content key depends only on the config and the upstream *keys*, so every key of a run is known before
anything runs (``plan``), which is what ``dagtune status`` and the Prefect task cache use.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dagtune.code_identity import code_inputs
from dagtune.config import PipelineConfig, RuntimeConfig
from dagtune.logs import NODE_LOG, node_output_to
from dagtune.redact import redact
from dagtune.store import Artifact, ArtifactStore, content_key

log = logging.getLogger("dagtune")


@dataclass(frozen=True)
class Settings:
    """Where things live for this run; not part of any key."""

    state_dir: Path
    artifact_root: Path
    tracking_uri: str
    profile: str
    config_hash: str
    config_dir: Path
    flow_run_id: str | None = None  # set by the orchestrator (Prefect) when there is one
    flow_run_url: str | None = None
    resolved_config: dict[str, Any] | None = None  # the whole validated config, for the run's record


@dataclass
class NodeContext:
    name: str
    out: Path  # temp dir: everything written here becomes the artifact
    scratch: Path  # survives a killed attempt (checkpoints for resume); removed after commit
    section: BaseModel  # the node's own config section, nothing else
    runtime: RuntimeConfig
    upstream: dict[str, Artifact]
    store: ArtifactStore
    settings: Settings
    log: logging.Logger = field(default_factory=lambda: log)


@dataclass(frozen=True)
class Node:
    name: str
    version: str  # bump when the node's output changes for the same inputs
    upstream: tuple[str, ...]
    module: str  # "dagtune.data.node:build": imported lazily so `status` never loads torch
    # Extra key inputs the section alone doesn't capture (source file hashes, resolved backend, ...).
    extra_inputs: str | None = None
    # Nodes that load models run in their own process on the devices of their slots (dagtune.slots,
    # dagtune.node_process); the others run in the run's process.
    loads_models: bool = False
    # Source paths (relative to the project root) that implement the node and the libraries whose
    # version changes its output: both enter the key (dagtune.code_identity).
    code: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    # The config section the node reads (and its key holds), when it is not the node's own name:
    # one section can configure several nodes (convert_gguf, one node per model).
    section: str | None = None

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def load(self, attr: str) -> Callable[..., Any]:
        mod, fn = attr.split(":")
        return getattr(importlib.import_module(mod), fn)


# What each node's output depends on besides its inputs (see Node.code / Node.libraries). Packages,
# not single files, where a package implements the node: files move inside packages.
MODELS_CODE = ("dagtune/models/__init__.py",)  # tiny models are keyed by their own artifact key
# the training engine's shared pieces outside dagtune/training: hardware, the classifier model, packing, reading
SHARED_TRAIN_CODE = ("dagtune/runtime.py", "dagtune/jsonl.py", "dagtune/models/classifier.py", "dagtune/data/packing.py",
                     "dagtune/data/split.py")  # fmt: skip
TRAIN_CODE = ("dagtune/training", *SHARED_TRAIN_CODE, *MODELS_CODE)
TRAIN_LIBS = ("torch", "transformers", "peft", "trl", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes")
NODES: dict[str, Node] = {
    n.name: n
    for n in [
        Node(
            "prepare_data",
            "1",
            (),
            "dagtune.data.node:build",
            "dagtune.data.node:key_inputs",
            code=("dagtune/data", "dagtune/formats.py", *MODELS_CODE),
            libraries=("transformers", "tokenizers", "datasets"),
        ),
        Node(
            "train_function_calling",
            "1",
            ("prepare_data",),
            "dagtune.training.sft:build_function_calling",
            "dagtune.training.sft:key_inputs_function_calling",
            loads_models=True,
            code=TRAIN_CODE,
            libraries=TRAIN_LIBS,
        ),
        Node(
            "train_extractor",
            "1",
            ("prepare_data",),
            "dagtune.training.sft:build_extractor",
            "dagtune.training.sft:key_inputs_extractor",
            loads_models=True,
            code=TRAIN_CODE,
            libraries=TRAIN_LIBS,
        ),
        Node(
            "train_classifier",
            "1",
            ("prepare_data",),
            "dagtune.training.classifier:build_classifier",
            "dagtune.training.classifier:key_inputs",
            loads_models=True,
            code=TRAIN_CODE,
            libraries=TRAIN_LIBS,
        ),
        Node(
            "evaluate",
            "1",
            ("prepare_data", "train_function_calling", "train_extractor", "train_classifier"),
            "dagtune.evaluation.node:build",
            loads_models=True,
            # evaluate loads the classifier through dagtune.training.classifier
            code=("dagtune/evaluation", "dagtune/formats.py", "dagtune/data/report.py", *TRAIN_CODE),
            libraries=("torch", "transformers", "peft"),
        ),
        # One export per model, so each starts when its own training ends (the function caller's
        # conversion and parity check run while the extractor still trains).
        *(
            Node(
                f"convert_gguf_{model}",
                "1",
                ("prepare_data", f"train_{model}"),
                f"dagtune.gguf.node:build_{model}",
                "dagtune.gguf.node:key_inputs",
                loads_models=True,
                code=("dagtune/gguf", *MODELS_CODE),
                libraries=("torch", "transformers", "gguf", "llama_cpp_python"),
                section="convert_gguf",
            )
            for model in ("function_calling", "extractor")
        ),
        Node(
            "register",
            "1",
            (
                "prepare_data",
                "train_function_calling",
                "train_extractor",
                "train_classifier",
                "evaluate",
                "convert_gguf_function_calling",
                "convert_gguf_extractor",
            ),
            "dagtune.registry.node:build",
            "dagtune.registry.node:key_inputs",
            # the gate re-scores the champion with evaluate's functions: it may load a model
            loads_models=True,
            code=(
                "dagtune/registry",
                "dagtune/evaluation",
                "dagtune/jsonl.py",
                *SHARED_TRAIN_CODE,
                *MODELS_CODE,
            ),
            libraries=("mlflow",),
        ),
    ]
}
NODE_ORDER = list(NODES)
# Nodes the DAG no longer has, whose artifacts may still be in a store: `dagtune gc` keeps them while a
# registered version or a recent run names them, and removes the rest.
RETIRED_NODES = ("convert_gguf",)  # split into convert_gguf_function_calling / convert_gguf_extractor


def settings_for(cfg: PipelineConfig, flow_run: dict[str, str | None] | None = None) -> Settings:
    flow_run = flow_run or {}
    return Settings(
        flow_run_id=flow_run.get("id"),
        flow_run_url=flow_run.get("url"),
        state_dir=cfg.state_dir,
        artifact_root=cfg.artifact_root,
        tracking_uri=cfg.tracking_uri,
        profile=cfg.profile,
        config_hash=content_key(cfg.model_dump(mode="json", exclude={"config_dir"})),
        config_dir=Path(cfg.config_dir),
        resolved_config=redact(cfg.model_dump(mode="json")),  # logged to MLflow: no credentials
    )


def node_inputs(name: str, cfg: PipelineConfig, upstream_keys: dict[str, str]) -> dict[str, Any]:
    node = NODES[name]
    inputs: dict[str, Any] = {
        "node": name,
        "version": node.version,
        # redacted: a tracking URI's password must not reach a manifest (nor change a key)
        "config": redact(getattr(cfg, node.section_name).model_dump(mode="json")),
        "upstream": {u: upstream_keys[u] for u in node.upstream},
    }
    if node.extra_inputs:
        inputs["extra"] = node.load(node.extra_inputs)(cfg)
    backend = inputs.get("extra", {}).get("backend")  # training nodes: unsloth libs count on unsloth only
    inputs["code"] = code_inputs(node.code, node.libraries, backend)
    return inputs


def plan(cfg: PipelineConfig, nodes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every node's inputs and key, in DAG order, without running anything."""
    keys: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    for name in NODE_ORDER:
        inputs = node_inputs(name, cfg, keys)
        keys[name] = content_key(inputs)
        out[name] = {"key": keys[name], "inputs": inputs}
    if nodes is not None:
        out = {k: v for k, v in out.items() if k in nodes}
    return out


@dataclass
class NodeResult:
    name: str
    status: str  # ran | cached | failed
    seconds: float
    key: str
    artifact: str | None
    error: str | None = None
    wait_seconds: float = 0.0  # waiting for a device slot: not part of `seconds`

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "key": self.key,
            "artifact": self.artifact,
            "wait_seconds": round(self.wait_seconds, 3),
        }
        if self.error:
            d["error"] = self.error
        return d


def run_node(
    name: str,
    cfg: PipelineConfig,
    upstream: dict[str, Artifact],
    force: bool = False,
    flow_run: dict[str, str | None] | None = None,
) -> tuple[Artifact, NodeResult]:
    """Return the node's artifact, computing it only if its manifest is not in the store yet."""
    t0 = time.time()
    waited: list[float] = []
    node = NODES[name]
    missing = [u for u in node.upstream if u not in upstream]
    if missing:
        raise ValueError(f"node {name} needs upstream artifacts {missing}")
    store = ArtifactStore(cfg.artifact_root)
    inputs = node_inputs(name, cfg, {u: a.key for u, a in upstream.items()})
    key = content_key(inputs)

    def compute(out: Path, scratch: Path) -> dict[str, Any] | None:
        log.info("node %s: computing %s", name, key[:12])
        ctx = NodeContext(
            name=name,
            out=out,
            scratch=scratch,
            section=getattr(cfg, node.section_name),
            runtime=cfg.runtime,
            upstream={u: upstream[u] for u in node.upstream},
            store=store,
            settings=settings_for(cfg, flow_run),
        )
        if not node.loads_models:
            # Library logs, prints and progress bars of this node's thread: into its artifact (dagtune.logs).
            with node_output_to(out / NODE_LOG):
                return node.load(node.module)(ctx)
        # Lock order, the same in every run and thread, so no cycle: node key lock (store.build) ->
        # device slots -> a base model's key lock (ensure_tiny); nothing is awaited while that last
        # one is held.
        t_wait = time.time()
        with device_slots_for(name, cfg) as devices:
            waited.append(time.time() - t_wait)
            return run_on_devices(ctx, cfg, node, devices)

    art, ran = store.build(name, inputs, compute, force=force)
    wait = sum(waited)
    status = "ran" if ran else "cached"
    return art, NodeResult(name, status, time.time() - t0 - wait, key, art.path, wait_seconds=wait)


def devices_wanted(name: str, cfg: PipelineConfig) -> int:
    """Devices a node trains on (its section's ``gpus``, data parallel); every other node takes one."""
    return int(getattr(getattr(cfg, NODES[name].section_name), "gpus", 1) or 1)


@contextmanager
def device_slots_for(name: str, cfg: PipelineConfig) -> Iterator[list[str]]:
    from dagtune.slots import device_slots, worker_devices

    rt = cfg.runtime
    lock_dir = cfg.state_dir / ".locks"
    with device_slots(
        lock_dir, worker_devices(rt), rt.nodes_per_device, devices_wanted(name, cfg), name
    ) as got:
        yield got


def run_on_devices(
    ctx: NodeContext, cfg: PipelineConfig, node: Node, devices: list[str]
) -> dict[str, Any] | None:
    if cfg.runtime.isolation == "thread":  # debugging: in this process, on whatever device torch picks
        if len(devices) > 1:
            raise ValueError(
                f"node {node.name} asks for {len(devices)} devices: runtime.isolation must be process"
            )
        with node_output_to(ctx.out / NODE_LOG):
            return node.load(node.module)(ctx)
    from dagtune.node_process import run_in_process
    from dagtune.slots import threads_per_slot

    threads = threads_per_slot(cfg.runtime)
    return run_in_process(ctx, cfg, node.module, devices, processes=len(devices), threads=threads)


def node_status(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """For `dagtune status`: each node's key, whether its artifact exists (and is intact), size and age;
    for a node not built, why (``reasons``: data / code / config / upstream / missing, see
    dagtune.staleness) and, for a damaged artifact, its ``problem``. Read-only: a damaged artifact is
    only moved aside by a run that rebuilds it."""
    from dagtune.staleness import why_not_built
    from dagtune.store import artifact_problem, dir_size, read_manifest

    store = ArtifactStore(cfg.artifact_root)
    rows = []
    for name, p in plan(cfg).items():
        d = store.path(name, p["key"])
        problem = artifact_problem(d)
        row: dict[str, Any] = {"name": name, "key": p["key"], "exists": problem is None, "artifact": None}
        if problem is None:
            finished = (read_manifest(d) or {}).get("timings", {}).get("finished", time.time())
            row.update(
                artifact=str(d),
                size_bytes=dir_size(d),
                age_seconds=round(time.time() - finished, 1),
            )
        else:  # what differs from the newest artifact of this node: data, code, config, ...
            row["reasons"] = why_not_built(store, name, p["inputs"])
            if problem != "not built":
                row["problem"] = problem
        rows.append(row)
    return rows
