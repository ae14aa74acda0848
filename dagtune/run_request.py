"""The pipeline's run form: what an operator may choose for one run (Prefect UI, API, CLI).

One pydantic model, so Prefect renders a typed form with a description per field and rejects a bad value
before the flow run starts, naming the parameter (``run.force.0``). Nothing here imports Prefect.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dagtune.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, load_config, profile_names, read_raw
from dagtune.pipeline import NODE_ORDER

NodeName = Literal[tuple(NODE_ORDER)]  # type: ignore[valid-type]
DATA_TASKS = ("function_calling", "extractor", "classifier")


def packaged_profiles() -> list[str]:
    return profile_names(read_raw(DEFAULT_CONFIG)[0])


class DataOverride(BaseModel):
    """Where one task's rows come from for this run, instead of the profile's source."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        description="A local JSONL/JSON/CSV/Parquet file on the worker (relative paths: against the config "
        "file's directory); the source becomes kind=file with this path.",
    )
    hub_revision: str | None = Field(
        None,
        description="For a Hugging Face hub source: the dataset revision (branch, tag or commit sha) to load.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> DataOverride:
        if self.path and self.hub_revision:
            raise ValueError("give either path or hub_revision, not both")
        return self

    def source_overlay(self) -> dict[str, Any]:
        if self.path:
            return {"kind": "file", "path": self.path, "hf_id": None, "format": "auto"}
        if self.hub_revision:
            return {"revision": self.hub_revision}
        return {}


class DataOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function_calling: DataOverride = Field(
        default_factory=DataOverride, description="The function-calling dataset."
    )
    extractor: DataOverride = Field(
        default_factory=DataOverride, description="The equation extractor's dataset."
    )
    classifier: DataOverride = Field(default_factory=DataOverride, description="The math verdict dataset.")


class RunRequest(BaseModel):
    """One pipeline run: which profile, which nodes, whether the gate may promote, which data."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(
        None,
        description="Pipeline config YAML on the worker; empty: the packaged pipeline_config.yaml.",
    )
    profile: str | None = Field(
        None,
        description="Profile overlay of the config (tiny: CPU and tiny models; real: the GPU setup); "
        "empty: the config's default_profile (or DAGTUNE_PROFILE).",
        json_schema_extra={"enum": [*packaged_profiles(), None]},
    )
    only: list[NodeName] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Run only these nodes; the others are reused when built and skipped when not. "
        "Empty: every node.",
    )
    force: list[NodeName] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Recompute these nodes even when their artifact exists.",
    )
    promote: bool | None = Field(
        None,
        description="Let the promotion gate move the champion alias (on) or only record its decision (off); "
        "empty: the config's register.auto_promote.",
    )
    data: DataOverrides = Field(
        default_factory=DataOverrides,
        description="Per dataset: a local file path or a hub revision instead of the profile's source.",
    )

    @model_validator(mode="after")
    def _profile_exists(self) -> RunRequest:
        if self.profile is None:
            return self
        try:
            allowed = profile_names(read_raw(self.config_path)[0])
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.profile not in allowed:
            raise ValueError(f"profile {self.profile!r} is not defined in the config; allowed: {allowed}")
        return self

    def overrides(self) -> dict[str, Any]:
        """The config overlay this request implies (applied after the profile)."""
        out: dict[str, Any] = {}
        sources = {t: getattr(self.data, t).source_overlay() for t in DATA_TASKS}
        sources = {t: {"source": s} for t, s in sources.items() if s}
        if sources:
            out["prepare_data"] = sources
        if self.promote is not None:
            out["register"] = {"auto_promote": self.promote}
        return out

    def load(self) -> PipelineConfig:
        return load_config(self.config_path, self.profile, self.overrides() or None)
