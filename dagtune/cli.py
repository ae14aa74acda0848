"""The `dagtune` command line.

    dagtune run [--config PATH] [--profile NAME] [--only NODE ...] [--force NODE ...] [--json] [-v]
    dagtune status [--config PATH] [--profile NAME] [--json]
    dagtune config validate [--config PATH] [--profile NAME]
    dagtune deploy [--config PATH] [--profile NAME] [--json]
    dagtune worker [--config PATH] [--profile NAME] [--name NAME] [--limit N]
    dagtune models [--config PATH] [--profile NAME] [--json]
    dagtune promote MODEL (--version N | --rollback) [--reason TEXT] [--config PATH] [--profile NAME]
    dagtune gc [--keep-runs N] [--dry-run] [--json] [--config PATH] [--profile NAME]

Exit codes: 0 ok, 1 a node failed, 2 invalid config or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from dagtune.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, load_config, profile_names, read_raw
from dagtune.pipeline import NODE_ORDER


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="pipeline config YAML (default: the packaged pipeline_config.yaml)"
    )
    p.add_argument("--profile", default=None, help="profile overlay (default: the YAML's default_profile)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dagtune", description="Orchestrated training pipeline (Prefect + MLflow)."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run_commands(sub)
    _add_operations_commands(sub)
    return ap


def _command(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand that takes the common --config/--profile arguments."""
    p = sub.add_parser(name, **kwargs)
    _add_config_args(p)
    return p


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """`run`, `status` and `config validate`: running the pipeline and checking its config."""
    run = _command(sub, "run", help="run the pipeline (cached nodes are skipped)")
    run.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NODE",
        choices=NODE_ORDER,
        help="run only these nodes; the others must already be built",
    )
    run.add_argument(
        "--force",
        nargs="+",
        default=[],
        metavar="NODE",
        choices=NODE_ORDER,
        help="recompute these nodes even when their artifact exists",
    )
    run.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="also show library logs (default: dagtune's lines only)"
    )

    st = _command(sub, "status", help="each node's key and whether its artifact exists")
    st.add_argument("--json", action="store_true")

    cfg = sub.add_parser("config", help="config commands")
    csub = cfg.add_subparsers(dest="config_cmd", required=True)
    _command(csub, "validate", help="validate the config (and every profile when --profile is not given)")


def _add_operations_commands(sub: argparse._SubParsersAction) -> None:
    """`gc`, `promote`, `deploy`, `worker` and `models`: the artifact store, the registry's champion
    alias, the Prefect deployment and the registered models."""
    gc = _command(
        sub,
        "gc",
        help="delete artifacts that neither the last N runs, the current config nor a registered "
        "model version use (the registry must be reachable)",
    )
    gc.add_argument("--keep-runs", type=int, default=5, metavar="N", help="keep what the last N runs used")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--json", action="store_true")

    pr = _command(
        sub, "promote", help="move a registered model's champion alias by hand (records who and why; no gate)"
    )
    pr.add_argument(
        "model", help="registered model name, or its config key (function_calling | extractor | classifier)"
    )
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="version to make champion")
    which.add_argument("--rollback", action="store_true", help="champion back to the previous champion")
    pr.add_argument("--reason", default="", help="why (recorded as a tag with the user name)")
    pr.add_argument("--json", action="store_true", help="print the recorded event as JSON")

    dp = _command(
        sub,
        "deploy",
        help="create or update the work pool, the GPU concurrency limit and the scheduled deployment "
        "on the Prefect server (PREFECT_API_URL); runs use --profile",
    )
    dp.add_argument("--json", action="store_true")
    wk = _command(sub, "worker", help="start a Prefect worker on the deployment's work pool")
    wk.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    wk.add_argument(
        "--healthcheck", action="store_true", help="serve the worker's /health on port 8080 (containers)"
    )
    wk.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most this many flow runs at once on this worker (default: no limit)",
    )

    md = _command(sub, "models", help="registered versions, aliases and promotion gate history (MLflow)")
    md.add_argument("--json", action="store_true")


def _load(args: argparse.Namespace) -> PipelineConfig:
    cfg = load_config(args.config, args.profile)
    # First line of every command: a config outside the repository moves the relative state dir next
    # to it (a full cache miss), so say which config and which state dir this run uses.
    config_path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    print(
        f"dagtune: config {config_path} (profile {cfg.profile!r}), state dir {cfg.state_dir}", file=sys.stderr
    )
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    if args.profile:
        names = [args.profile]
    else:
        raw, _ = read_raw(args.config)
        names = profile_names(raw) or [None]
    for name in names:
        cfg = load_config(args.config, name)
        print(f"ok: profile {cfg.profile or '<base>'!r}: {len(NODE_ORDER)} nodes, state dir {cfg.state_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dagtune.pipeline import node_status

    cfg = _load(args)
    rows = node_status(cfg)
    if args.json:
        print(json.dumps({"profile": cfg.profile, "artifact_root": str(cfg.artifact_root), "nodes": rows}))
        return 0
    print(f"profile {cfg.profile!r}, artifacts in {cfg.artifact_root}")
    for r in rows:
        if r["exists"]:
            extra = f"{r['size_bytes'] / 1e6:9.2f} MB  {r['age_seconds'] / 3600:7.2f} h old"
        else:
            from dagtune.staleness import describe

            extra = "not built: " + describe(r.get("reasons", []))
            if r.get("problem"):
                extra += f" ({r['problem']}: rebuilt by the next run)"
        print(f"  {r['name']:<24} {r['key'][:12]}  {extra}")
    return 0


def _run_flow(args: argparse.Namespace, cfg: PipelineConfig, t0: float) -> dict[str, Any]:
    from dagtune.run_request import RunRequest
    from dagtune.runner import failure_rows, summarize
    from flows.pipeline import dagtune_pipeline

    request = RunRequest(
        config_path=args.config, profile=cfg.profile or None, only=args.only, force=args.force
    )
    state = dagtune_pipeline(run=request, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    error: str | None = None
    try:
        rows = summarize(state.result(), flow_run_id, cfg.artifact_root)
    except Exception as e:  # a failed node: report which one, and what finished before it
        error = f"{type(e).__name__}: {e}"
        rows = failure_rows(cfg, t0, only=args.only, force=args.force)
    out = {"ok": error is None, "profile": cfg.profile, "flow_run_id": flow_run_id, "nodes": rows}
    out.update(_registry(rows))
    from dagtune.gc import record_run

    record_run(cfg.state_dir, cfg.profile, error is None, {r["name"]: r["key"] for r in rows})
    return {**out, "error": error} if error else out


def _registry(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The register node's versions, gate outcome and aliases per model (dagtune.registry), if it ran."""
    from dagtune.registry.node import registry_block

    register_dir = next((r.get("artifact") for r in rows if r["name"] == "register"), None)
    registry = registry_block(register_dir)
    return {} if registry is None else {"registry": registry}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from dagtune.procs import reap_children_on_exit
    from dagtune.runner import prepare_environment

    cfg = _load(args)
    reap_children_on_exit()  # a killed run takes its Prefect server and converter with it
    prepare_environment(cfg)
    from tasks._node import prefect_server_configured

    if prefect_server_configured():  # the shared GPU slots live on that server
        from flows.deploy import ensure_gpu_limit_on_server

        ensure_gpu_limit_on_server(cfg.deploy.gpu_slots)
    t0 = time.time()
    out = _run_flow(args, cfg, t0)
    out["seconds"] = round(time.time() - t0, 3)
    return out


def print_run(out: dict[str, Any]) -> None:
    from dagtune.registry.node import registry_lines

    for r in out.get("nodes", []):
        print(f"  {r['name']:<24} {r['status']:<7} {r['seconds']:8.1f}s  {r['key'][:12]}")
    if out.get("registry") is not None:
        print("registry:")
        print("\n".join(registry_lines(out["registry"])))
    print(("FAILED: " + out["error"]) if out.get("error") else f"done in {out['seconds']:.1f}s")


def _describe_crash(e: Exception) -> str:
    """The exception, and which Prefect server the run talked to (a refused connection names no URL)."""
    import os

    from dagtune.registry.tracking import redact_uri

    api = os.environ.get("PREFECT_API_URL")
    return f"{type(e).__name__}: {e}" + (f" (PREFECT_API_URL={redact_uri(api)})" if api else "")


def _json_main(args: argparse.Namespace) -> int:
    """`run --json`: everything but the final object goes to stderr, and every outcome -- success, a
    failed node, a config error, an unreachable server, a crash -- is one JSON object on stdout."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        try:
            out = cmd_run(args)
            rc = 0 if out["ok"] else 1
        except ConfigError as e:
            out, rc = {"ok": False, "error": f"ConfigError: {e}", "nodes": []}, 2
        except Exception as e:  # noqa: BLE001 - the promise is one JSON object whatever happened
            logging.getLogger("dagtune").exception("dagtune run failed")
            out, rc = {"ok": False, "error": _describe_crash(e), "nodes": []}, 1
    print(json.dumps(out, default=str), file=real_stdout)
    return rc


def cmd_gc(args: argparse.Namespace) -> int:
    from dagtune.gc import collect
    from dagtune.registry.tracking import RegistryUnavailable

    cfg = _load(args)
    try:
        out = collect(cfg, args.keep_runs, dry_run=args.dry_run)
    except RegistryUnavailable as e:
        print(f"dagtune gc: nothing deleted: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(out['deleted'])} artifact(s), {out['bytes_freed'] / 1e6:.1f} MB")
        for name in out["deleted"]:
            print(f"  {name}")
        for name in out["skipped_busy"]:
            print(f"  {name} (in use: skipped)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import getpass
    import os

    from dagtune.registry import registry as reg
    from dagtune.registry.node import resolve_model_name, tracker_for
    from dagtune.registry.tracking import RegistryUnavailable

    cfg = _load(args)
    name, _ = resolve_model_name(cfg, args.model)
    who = os.environ.get("USER") or getpass.getuser()
    try:
        tracker = tracker_for(cfg)
        if args.rollback:
            event = reg.rollback(tracker, name, who, args.reason or "manual rollback")
        else:
            event = reg.promote(tracker, name, args.version, who, args.reason or "manual promotion")
    except (reg.RegistryError, RegistryUnavailable) as e:
        print(f"dagtune promote: {e}", file=sys.stderr)
        return 1
    event = {"model": name, **event}
    if args.json:
        print(json.dumps(event))
    else:
        print(
            f"{name}@champion -> v{event['version']} (was v{event['previous']}), "
            f"{event['action']} by {who}: {event['why']}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dagtune.models_view import format_summary, model_summary
    from dagtune.registry.node import tracker_for
    from dagtune.registry.tracking import RegistryUnavailable

    cfg = _load(args)
    try:
        tracker = tracker_for(cfg)
        models = [model_summary(tracker, rm.name) for rm in cfg.register.models.values()]
    except RegistryUnavailable as e:
        print(f"dagtune models: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"models": models}, default=str) if args.json else format_summary(models))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from dagtune.deployment import deployment_spec
    from dagtune.runner import prepare_environment

    cfg = _load(args)
    prepare_environment(cfg)
    from flows.deploy import deploy

    out = deploy(deployment_spec(cfg, args.config))
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(
            f"deployment dagtune/{out['name']} ({out['deployment_id']}) on {out['work_pool_type']} pool "
            f"{out['work_pool']!r} (pool {out['work_pool_status']}, GPU limit {out['gpu_limit_status']}: "
            f"{out['gpu_slots']} slot(s)), "
            f"cron {out['cron']!r} {out['timezone']}, profile {cfg.profile!r}"
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from dagtune.deployment import worker_command, worker_env
    from dagtune.runner import prepare_environment

    cfg = _load(args)
    prepare_environment(cfg)
    cmd = worker_command(cfg, args.name, healthcheck=args.healthcheck, limit=args.limit)
    # exec, not a child: a stop signal (compose, systemd, Ctrl-C) reaches the worker itself
    os.execve(cmd[0], cmd, worker_env(dict(os.environ)))
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    from dagtune.logs import configure_console

    args = _parser().parse_args(argv)
    configure_console(verbose=getattr(args, "verbose", False))
    if args.cmd == "run" and args.json:
        return _json_main(args)
    try:
        if args.cmd == "config":
            return cmd_validate(args)
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "promote":
            return cmd_promote(args)
        if args.cmd == "gc":
            return cmd_gc(args)
        if args.cmd == "models":
            return cmd_models(args)
        if args.cmd in ("deploy", "worker"):
            return {"deploy": cmd_deploy, "worker": cmd_worker}[args.cmd](args)
        out = cmd_run(args)
        print_run(out)
        return 0 if out["ok"] else 1
    except ConfigError as e:
        print(f"dagtune: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
