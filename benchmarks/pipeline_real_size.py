"""The whole nightly DAG at real model sizes through the real Prefect flow, measured per node.

    # GPU (see benchmarks/gpu_real_size.sh for the device call):
    python3 benchmarks/pipeline_real_size.py --cold --out $OUT/pipeline_real_size.json
    # CPU, the same code path on the tiny profile (a few minutes; tests/test_pipeline_real_size_cpu.py):
    PYTHONPATH=$PWD .venv/bin/python benchmarks/pipeline_real_size.py --device cpu --tiny \\
        --fc 60 --extractor 60 --classifier 60 --eval 8 --steps-cap 2 --out /tmp/prs.json

What it does:

1. builds random-init models of the real shapes (FunctionGemma-270M, Gemma-3-1B, Phi-4-mini) with
   ``benchmarks/train_throughput.py``'s builder (its ``--_build``) (same FLOPs and bytes as the hub weights, the
   project's tokenizers with the real chat templates) under ``--model-root``; ``--tiny`` uses the
   project's tiny models instead;
2. writes a config = ``pipeline_config.yaml`` with those directories as model and tokenizer names and
   synthetic sources at the "nightly" size given on the command line (``--fc``, ``--extractor``,
   ``--classifier`` examples; ``--eval`` test examples per task), ``--steps-cap`` as every trainer's
   ``optim.max_steps``, ``--override`` (JSON) deep-merged last;
3. runs ``dagtune run --profile real --config ... --json`` in a subprocess (``HF_HUB_OFFLINE=1``,
   its own state dir; the torch inductor and Triton caches under ``<state>/compile_cache``), while a
   thread samples NVML GPU utilisation and memory every ``--sample-s`` seconds (default 0.5: >= 1 Hz);
   ``--warm`` runs the flow a second time on the same state dir and compile cache with ``--force`` on
   every node (the next nightly run: new data reruns them all, the compile caches are the last run's);
   ``--warm-only`` makes that second run alone, on the state an earlier invocation left (another call
   on a machine kept warm);
4. writes JSON (device named): per run the DAG's wall seconds, and per node its status, wall seconds
   and start/end (from the training slot's acquisition, logged by the flow, or the manifest's
   ``timings.started``, to ``timings.finished``), the training phases the training manifests
   report (``timings: startup_s, load_s, first_step_s, steady_s, merge_s, save_s``, ``steady_tokens_per_s``,
   ``peak_mem_gib``; null when a manifest has none), compile seconds (= ``first_step_s``), the GPU
   busy fraction over the node's interval (mean NVML utilisation of the samples inside it) and the
   peak memory NVML saw there, evaluate's generation seconds, convert_gguf_*'s conversion /
   quantization / parity seconds and GGUF bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1024**3
TRAINING = ("train_function_calling", "train_extractor", "train_classifier")
# pipeline role -> (train_throughput.MODELS key, tiny model, prepare_data.tokenizers key)
MODELS = {
    "train_function_calling": ("functiongemma-270m", "tiny-functiongemma", "function_calling"),
    "train_extractor": ("gemma-3-1b", "tiny-gemma3", "extractor"),
    "train_classifier": ("phi-4-mini", "tiny-phi3", "classifier"),
}
PHASES = (
    "startup_s",
    "load_s",
    "prepare_s",
    "first_step_s",
    "steady_s",
    "checkpoint_s",
    "validate_s",
    "merge_s",
    "save_s",
)


# ----------------------------------------------------------------------------------------------
# models and config
# ----------------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace) -> dict[str, str]:
    """Training node -> model name or directory: the tiny names, or real shapes built once (by
    ``train_throughput.py --_build`` in a child process, so this one never holds a CUDA context)."""
    if args.tiny:
        return {node: spec[1] for node, spec in MODELS.items()}
    out: dict[str, str] = {}
    for node, (real, _tiny, _task) in MODELS.items():
        d = Path(args.model_root) / real
        if not (d / "config.json").is_file():
            cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--_build", real, str(d)]
            cmd += ["--device", args.device]
            if args.tokenizer_cache:
                cmd += ["--tokenizer-cache", args.tokenizer_cache]
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            print(f"built {real} in {time.time() - t0:.1f}s at {d}", flush=True)
        out[node] = str(d.resolve())
    return out


def nightly_overlay(args: argparse.Namespace, models: dict[str, str]) -> dict[str, Any]:
    """What the benchmark changes in the profile it runs: models, sizes, step cap."""
    synthetic = {"kind": "synthetic", "hf_id": None, "format": "auto"}
    overlay: dict[str, Any] = {
        "prepare_data": {
            "function_calling": {"source": {**synthetic, "num_examples": args.fc}},
            "extractor": {"source": {**synthetic, "num_examples": args.extractor}},
            "classifier": {"source": {**synthetic, "num_examples": args.classifier}},
            "tokenizers": {spec[2]: models[node] for node, spec in MODELS.items()},
        },
        "evaluate": {"max_examples": args.eval},
    }
    for node in TRAINING:
        overlay[node] = {"model": {"name": models[node]}}
        if args.steps_cap:
            overlay[node]["optim"] = {"max_steps": args.steps_cap}
    return overlay


def write_config(args: argparse.Namespace, models: dict[str, str], path: Path) -> str:
    """pipeline_config.yaml with the overlay merged into the profile that runs; returns its name."""
    from dagtune.config import DEFAULT_CONFIG, deep_merge

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    profile = "tiny" if args.tiny else "real"
    overlay = deep_merge(nightly_overlay(args, models), json.loads(args.override or "{}"))
    raw["profiles"][profile] = deep_merge(raw["profiles"].get(profile) or {}, overlay)
    if args.device == "cpu":
        raw["profiles"][profile] = deep_merge(raw["profiles"][profile], {"runtime": {"device": "cpu"}})
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return profile


# ----------------------------------------------------------------------------------------------
# NVML sampling
# ----------------------------------------------------------------------------------------------
class GpuSampler(threading.Thread):
    """(time, {GPU: (utilisation %, memory used bytes)}) of every visible GPU each ``interval`` seconds,
    from NVML (the GPUs CUDA_VISIBLE_DEVICES names, by index; all of them when unset)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = (
                [d for d in env.split(",") if d.strip()]
                if env
                else [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
            )
            handles = {d: pynvml.nvmlDeviceGetHandleByIndex(int(d)) for d in ids}
        except Exception as e:  # no GPU or no NVML: the JSON says so, the run goes on
            self.error = f"{type(e).__name__}: {e}"
            return
        while not self._halt.is_set():
            now = {}
            for d, h in handles.items():
                now[d] = (
                    int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    int(pynvml.nvmlDeviceGetMemoryInfo(h).used),
                )
            self.samples.append((time.time(), now))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def window(
        self, start: float | None, end: float | None, devices: list[str] | None = None
    ) -> dict[str, Any]:
        """GPU-busy fraction (mean utilisation / 100 over ``devices``, all when None) and peak memory
        between ``start`` and ``end``. Nodes sharing a GPU share its busy fraction."""
        inside = [s for s in self.samples if start is not None and end is not None and start <= s[0] <= end]
        vals = [v for _, per in inside for d, v in per.items() if devices is None or d in devices]
        if not vals:
            return {"gpu_busy_fraction": None, "gpu_samples": 0, "gpu_mem_peak_gib": None}
        return {
            "gpu_busy_fraction": round(sum(v[0] for v in vals) / len(vals) / 100, 3),
            "gpu_samples": len(inside),
            "gpu_mem_peak_gib": round(max(v[1] for v in vals) / GIB, 2),
        }

    def whole(self) -> dict[str, Any]:
        """The run's busy fraction per GPU (mean utilisation / 100 over every sample)."""
        ids = sorted({d for _, per in self.samples for d in per})
        return {
            d: round(sum(per[d][0] for _, per in self.samples if d in per) / len(self.samples) / 100, 3)
            for d in ids
        }


# ----------------------------------------------------------------------------------------------
# per-node numbers from the manifests
# ----------------------------------------------------------------------------------------------
def _training_numbers(manifest: dict[str, Any]) -> dict[str, Any]:
    metrics = manifest.get("metrics") or {}
    timings = metrics.get("timings") if isinstance(metrics.get("timings"), dict) else {}
    phases = {k: timings.get(k) for k in PHASES}
    return {
        "phases": phases,
        "compile_s": phases["first_step_s"],
        "steady_tokens_per_s": timings.get("steady_tokens_per_s", metrics.get("steady_tokens_per_s")),
        "peak_mem_gib": timings.get("peak_mem_gib", metrics.get("peak_mem_gib")),
        "train_seconds": metrics.get("train_seconds"),
    }


def _evaluate_numbers(art_dir: Path) -> dict[str, Any]:
    path = art_dir / "metrics.json"
    seconds = json.loads(path.read_text()).get("meta", {}).get("seconds", {}) if path.is_file() else {}
    return {"evaluation_s": round(sum(seconds.values()), 3) if seconds else None, "evaluate_phases": seconds}


def _gguf_numbers(manifest: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for model, by_type in (manifest.get("metrics") or {}).items():
        for qtype, f in by_type.items():
            p = f.get("parity", {})
            files[f"{model}.{qtype}"] = {
                "bytes": f.get("size_bytes"),
                "convert_s": f.get("convert_seconds"),
                "quantize_s": f.get("quantize_seconds"),
                "parity_s": p.get("seconds"),
                "top1_all_positions": p.get("top1_agreement_all_positions_ties_ok"),
                "template_greedy_match": p.get("template_greedy_match_rate"),
            }
    return {"gguf": files, "gguf_bytes": sum(f["bytes"] or 0 for f in files.values())}


SLOT_LINE = re.compile(r"node (\S+): training slot acquired at ([0-9.]+)(?: on (\S+))?")


def slot_times(log_text: str) -> dict[str, tuple[float, list[str] | None]]:
    """When each model-loading node got its device slots (``dagtune.slots.device_slots`` logs the epoch and
    the devices): its work starts there, not when it began waiting (the manifest's ``started``)."""
    return {
        m.group(1): (float(m.group(2)), m.group(3).split(",") if m.group(3) else None)
        for m in SLOT_LINE.finditer(log_text)
    }


def node_record(
    row: dict[str, Any], sampler: GpuSampler, slots: dict[str, tuple[float, list[str] | None]]
) -> dict[str, Any]:
    """One node of a run: status and wall time from the CLI row, the rest from its manifest. ``wall_s``
    runs from the node's start (its training slot, for the nodes that need one) to its manifest."""
    rec: dict[str, Any] = {"status": row["status"], "cli_seconds": row["seconds"]}
    path = Path(row.get("artifact") or "") / "manifest.json"
    if not row.get("artifact") or not path.is_file():
        return rec
    manifest = json.loads(path.read_text())
    t = manifest.get("timings") or {}
    started, finished = t.get("started"), t.get("finished")
    if row["status"] == "ran" and started is not None and finished is not None:
        slot, devices = slots.get(row["name"], (None, None))
        work = slot if slot is not None and started <= slot <= finished else started
        rec.update(started=work, finished=finished, wall_s=round(finished - work, 3), devices=devices)
        rec["slot_wait_s"] = round(work - started, 3)
        rec.update(sampler.window(work, finished, devices))
    else:  # cached: nothing ran in this run; the numbers below are those of the run that built it
        rec.update(wall_s=None, built_wall_s=t.get("seconds"))
    name = row["name"]
    if name in TRAINING:
        rec.update(_training_numbers(manifest))
    elif name == "evaluate":
        rec.update(_evaluate_numbers(Path(row["artifact"])))
    elif name.startswith("convert_gguf"):
        rec.update(_gguf_numbers(manifest))
    elif name == "register":
        rec["registration_s"] = t.get("seconds")
        registered = Path(row["artifact"]) / "registered.json"
        if registered.is_file():  # connect, the runs, each model (dagtune.registry.node.register_pipeline)
            rec["register_phases"] = json.loads(registered.read_text()).get("seconds")
    return rec


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
def _communicate_until_stopped(proc: subprocess.Popen, grace_s: float = 10.0) -> tuple[str, bool]:
    """The child's stdout, and whether the device's time limit (SIGINT, sent by `timeout` to the whole
    process group, often more than once) stopped it: then the flow is terminated, killed after
    ``grace_s``, and this process goes on to write the JSON of what finished."""
    stopped_at: list[float] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if not stopped_at:
            stopped_at.append(time.time())
            proc.terminate()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            try:
                stdout, _ = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if stopped_at and time.time() - stopped_at[0] > grace_s:
                    proc.kill()
    finally:
        signal.signal(signal.SIGINT, previous)
    return stdout, bool(stopped_at)


def run_flow(
    args: argparse.Namespace, cfg_path: Path, profile: str, state: Path, force: list[str], label: str
) -> dict[str, Any]:
    env = {**os.environ, "DAGTUNE_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PREFECT_HOME"] = str(state / "prefect")
    # A busy machine (compiles, other jobs) can take longer than Prefect's default 20 s to start it.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for k in ("DAGTUNE_ARTIFACT_ROOT", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    cache = state / "compile_cache"
    env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = str(cache / "inductor"), str(cache / "triton")
    cmd = [
        sys.executable,
        "-m",
        "dagtune.cli",
        "run",
        "--profile",
        profile,
        "--config",
        str(cfg_path),
        "--json",
    ]
    if force:
        cmd += ["--force", *force]
    if args.only:
        cmd += ["--only", *args.only]
    log_path = Path(args.out).with_suffix(f".{label}.log")
    sampler = GpuSampler(args.sample_s)
    sampler.start()
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        stdout, interrupted = _communicate_until_stopped(proc)
    wall = time.time() - t0
    sampler.stop()
    try:
        out = json.loads(stdout)
    except json.JSONDecodeError:
        out = {
            "ok": False,
            "error": f"no JSON on stdout (exit {proc.returncode}, interrupted?); see {log_path}",
            "nodes": finished_rows(state, t0),
        }
    slots = slot_times(log_path.read_text(errors="replace"))
    nodes = {row["name"]: node_record(row, sampler, slots) for row in out.get("nodes", [])}
    from dagtune.pipeline import NODES

    return {
        "label": label,
        "interrupted": interrupted,
        "ok": bool(out.get("ok")) and proc.returncode == 0,
        "error": out.get("error"),
        "exit_code": proc.returncode,
        "dag_wall_s": round(wall, 2),
        "flow_seconds": out.get("seconds"),
        "gpu": {
            "samples": len(sampler.samples),
            "interval_s": args.sample_s,
            "error": sampler.error,
            "busy_fraction_whole_run": sampler.whole() if sampler.samples else None,
        },
        "nodes": nodes,
        "critical_path": critical_path(nodes, {k: n.upstream for k, n in NODES.items()}),
        "log": str(log_path),
    }


def finished_rows(state: Path, since: float) -> list[dict[str, Any]]:
    """CLI-like rows of the nodes whose manifest was written after ``since`` (a run cut short)."""
    from dagtune.pipeline import NODE_ORDER

    rows = []
    for name in NODE_ORDER:
        done = [
            m
            for m in (state / "artifacts" / name).glob("*/manifest.json")
            if json.loads(m.read_text()).get("timings", {}).get("finished", 0) >= since
        ]
        if done:
            rows.append({"name": name, "status": "ran", "seconds": 0.0, "artifact": str(done[0].parent)})
        else:
            rows.append({"name": name, "status": "not finished", "seconds": 0.0, "artifact": None})
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        return torch.cuda.get_device_name(0) if n == 1 else f"{n} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _summary_line(run: dict[str, Any]) -> str:
    parts = [f"{run['label']}: ok={run['ok']} dag {run['dag_wall_s']}s"]
    for name, n in run["nodes"].items():
        busy = n.get("gpu_busy_fraction")
        parts.append(f"{name} {n['status']} {n.get('wall_s')}s busy={busy}")
    return " | ".join(parts)


def _cell(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown_table(run: dict[str, Any]) -> str:
    """The README's per-node table of one run."""
    lines = [
        f"{run['label']} run: DAG {run['dag_wall_s']} s, ok {run['ok']}",
        "",
        *([critical_path_line(run["critical_path"]), ""] if run.get("critical_path") else []),
        "| node | status | wall s | start-up s | load s | prepare s | first step (compile) s | steady s | checkpoints s "
        "| validate s | merge s | save s | steady tok/s | peak GiB | GPU busy | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n in run["nodes"].items():
        ph = n.get("phases") or {}
        other = ""
        if name == "evaluate":
            other = f"evaluation {_cell(n.get('evaluation_s'))} s"
        elif name.startswith("convert_gguf"):
            other = "; ".join(
                f"{k}: {_cell((f['bytes'] or 0) / 1e6, '{:,.1f}')} MB, convert {_cell(f['convert_s'])} s, "
                f"quantize {_cell(f['quantize_s'])} s, parity {_cell(f['parity_s'])} s"
                for k, f in (n.get("gguf") or {}).items()
            )
        elif name == "register":
            phases = ", ".join(f"{k} {v:.1f}" for k, v in (n.get("register_phases") or {}).items())
            other = f"registration {_cell(n.get('registration_s'))} s" + (f" ({phases})" if phases else "")
        lines.append(
            f"| {name} | {n['status']} | {_cell(n.get('wall_s'))} | "
            + " | ".join(_cell(ph.get(k)) for k in PHASES)
            + f" | {_cell(n.get('steady_tokens_per_s'), '{:,.0f}')} | {_cell(n.get('peak_mem_gib'), '{:.2f}')} "
            f"| {_cell(n.get('gpu_busy_fraction'), '{:.0%}')} | {other} |"
        )
    return "\n".join(lines) + "\n"


def critical_path(
    nodes: dict[str, dict[str, Any]], upstream: dict[str, tuple[str, ...]]
) -> list[dict[str, Any]]:
    """The chain that set the run's length: from the node that finished last, back through the upstream
    node that finished last before it (the one it waited for). Times in seconds from the first node's
    start; ``gap_s`` = the wait between that upstream's end and the node's start (flow overhead)."""
    ran = {k: v for k, v in nodes.items() if v.get("started") is not None and v.get("finished") is not None}
    if not ran:
        return []
    t0 = min(v["started"] for v in ran.values())
    chain, name = [], max(ran, key=lambda k: ran[k]["finished"])
    while name is not None:
        n = ran[name]
        before = [u for u in upstream.get(name, ()) if u in ran]
        prev = max(before, key=lambda u: ran[u]["finished"], default=None)
        gap = n["started"] - ran[prev]["finished"] if prev else n["started"] - t0
        chain.append({"node": name, "start_s": round(n["started"] - t0, 1), "end_s": round(n["finished"] - t0, 1),
                      "gap_s": round(gap, 1)})  # fmt: skip
        name = prev
    return chain[::-1]


def critical_path_line(chain: list[dict[str, Any]]) -> str:
    return "critical path: " + " → ".join(f"{c['node']} {c['start_s']:.0f}-{c['end_s']:.0f} s" for c in chain)


def run_plan(mode: str, only: list[str] | None) -> list[tuple[str, list[str]]]:
    """(label, nodes to --force) of each run. Warm = the next nightly run: new data reruns every node,
    the compile caches are the last run's."""
    from dagtune.pipeline import NODE_ORDER

    warm = ("warm", [n for n in NODE_ORDER if not only or n in only])
    return {"cold": [("cold", [])], "warm": [("cold", []), warm], "warm-only": [warm]}[mode]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tiny profile and models (CPU check)")
    ap.add_argument("--fc", type=int, default=4000, help="function-calling examples (synthetic)")
    ap.add_argument("--extractor", type=int, default=8000, help="extractor examples (synthetic)")
    ap.add_argument("--classifier", type=int, default=4000, help="classifier examples (synthetic)")
    ap.add_argument("--eval", type=int, default=512, help="evaluate.max_examples: test examples per task")
    ap.add_argument("--steps-cap", type=int, default=None, help="optim.max_steps of every trainer (smoke)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--cold", dest="mode", action="store_const", const="cold", help="one run, fresh state (default)"
    )
    mode.add_argument(
        "--warm",
        dest="mode",
        action="store_const",
        const="warm",
        help="a cold run, then a warm one: every node rerun (--force) on the warm compile cache",
    )
    mode.add_argument(
        "--warm-only",
        dest="mode",
        action="store_const",
        const="warm-only",
        help="the warm run alone, on the state dir and compile cache an earlier run left",
    )
    ap.set_defaults(mode="cold")
    ap.add_argument("--override", default=None, help="JSON deep-merged into the profile last")
    ap.add_argument(
        "--only", nargs="+", default=None, help="dagtune run --only: these nodes (e.g. one trainer)"
    )
    ap.add_argument("--state-dir", default=None, help="default: a fresh dir next to --out")
    ap.add_argument("--model-root", default="/tmp/dagtune_models_real", help="where real shapes are built")
    ap.add_argument("--tokenizer-cache", default=None, help="train_throughput's prebuilt tokenizers")
    ap.add_argument("--sample-s", type=float, default=0.5, help="NVML sampling interval (<= 1 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline_real_size.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.sample_s > 1:
        raise SystemExit("--sample-s must be at most 1 (the benchmark samples at >= 1 Hz)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = Path(args.state_dir) if args.state_dir else out.with_suffix(".state")
    if args.mode == "warm-only":
        if not (state / "compile_cache").is_dir():
            raise SystemExit(f"--warm-only: no earlier run's compile cache under {state}")
    else:
        shutil.rmtree(state, ignore_errors=True)  # cold: nothing cached, no compile cache
        state.mkdir(parents=True)
    t0 = time.time()
    models = build_models(args)
    build_s = round(time.time() - t0, 1)
    cfg_path = state.parent / f"{out.stem}.config.yaml"
    profile = write_config(args, models, cfg_path)
    doc: dict[str, Any] = {
        "device": None,  # named after the runs: no CUDA context in this process while they run
        "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),  # the lane's share of the host (taskset), not all of it
        "profile": profile,
        "models": models,
        "model_build_s": build_s,
        "nightly": {
            "fc": args.fc,
            "extractor": args.extractor,
            "classifier": args.classifier,
            "eval": args.eval,
        },
        "steps_cap": args.steps_cap,
        "config": str(cfg_path),
        "runs": [],
    }
    for label, force in run_plan(args.mode, args.only):
        run = run_flow(args, cfg_path, profile, state, force, label)
        doc["runs"].append(run)
        out.write_text(json.dumps(doc, indent=1))
        print(_summary_line(run), flush=True)
        if run["interrupted"]:
            break
    doc["device"] = device_name(args.device)
    out.write_text(json.dumps(doc, indent=1))
    table = f"Device: {doc['device']}\n\n" + "\n".join(markdown_table(r) for r in doc["runs"])
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return doc


if __name__ == "__main__":
    main()
