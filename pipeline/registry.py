"""The one declared stage graph: every stage the pipeline has, in pipeline order, and the start-up plan
that checks a config against it before any work.

A stage is a module of stages/ that declares NAME, CONSUMES, USES, PRODUCES, READS and OPTIONAL and
defines compute(ctx) and write(produced, ctx) (and optionally check(spec)); stages/types.py documents
the contract. Adding a stage is one module and one line in REGISTRY.
"""

from __future__ import annotations

import logging
from types import ModuleType

from pipeline.errors import ConfigError, closest
from pipeline.schema import PipelineSpec
from stages import calibrate, diagnose, evaluate, export, inspect, load, lower, reference_convert, search

log = logging.getLogger(__name__)

REGISTRY: tuple[ModuleType, ...] = (
    load,
    inspect,
    calibrate,
    search,
    reference_convert,
    lower,
    evaluate,
    export,
    # An analysis after the run's products: its files and figures never wait for it, and the exported model
    # is recorded by the tracker while it runs (0.5 s of MLflow's copying for the ResNet-18 shape).
    diagnose,
)
NAMES: tuple[str, ...] = tuple(stage.NAME for stage in REGISTRY)


def failure_is_fatal(stage: ModuleType) -> bool:
    """A stage's declared FAILURE_IS_FATAL (stages/types.py): True unless it says otherwise."""
    return bool(getattr(stage, "FAILURE_IS_FATAL", True))


def measures_time(stage: ModuleType, spec: PipelineSpec) -> bool:
    """Whether the stage times models in this run: its declared MEASURES_TIME (stages/types.py), narrowed by
    its measures_time(spec) when it has one; False unless it says otherwise."""
    if not getattr(stage, "MEASURES_TIME", False):
        return False
    narrowed = getattr(stage, "measures_time", None)
    return bool(narrowed(spec)) if narrowed is not None else True


def contract_problems(stages: tuple[ModuleType, ...] = REGISTRY) -> list[str]:
    """Declarations that break the stage contract: a later stage CONSUMES what a stage whose failure is
    not fatal produces (after such a failure that input would be missing; it may only USE it)."""
    problems = []
    for position, stage in enumerate(stages):
        if failure_is_fatal(stage):
            continue
        for later in stages[position + 1 :]:
            needed = sorted(set(stage.PRODUCES) & set(later.CONSUMES))
            if needed:
                problems.append(
                    f"{later.NAME} CONSUMES {needed} from {stage.NAME}, whose FAILURE_IS_FATAL is False: "
                    f"move them to {later.NAME}.USES or make {stage.NAME}'s failure fatal"
                )
    return problems


def _producer(artifact: str) -> str:
    return next(stage.NAME for stage in REGISTRY if artifact in stage.PRODUCES)


def is_switched_on(stage: ModuleType, spec: PipelineSpec) -> bool:
    """Listed in `stages`, or an optional stage whose config group says enabled=true."""
    return stage.NAME in spec.stages or (stage.OPTIONAL and getattr(spec, stage.NAME).enabled)


def plan(spec: PipelineSpec) -> list[ModuleType]:
    """The stages this config runs, in registry order, each with its inputs produced earlier; a listed
    stage whose inputs are not is a ConfigError. An optional stage switched on by its group alone is
    dropped, with a log line, when this run does not produce its inputs (diagnose without lower)."""
    for position, name in enumerate(spec.stages):
        if name not in NAMES:
            raise ConfigError(
                f"stages[{position}]='{name}' is not a stage; choose from {list(NAMES)}.{closest(name, NAMES)}"
            )
    if len(set(spec.stages)) != len(spec.stages):
        raise ConfigError(f"stages={list(spec.stages)} names a stage twice; list each stage once.")
    planned: list[ModuleType] = []
    produced: set[str] = set()
    for stage in REGISTRY:
        if not is_switched_on(stage, spec):
            continue
        missing = [artifact for artifact in stage.CONSUMES if artifact not in produced]
        if missing and stage.NAME in spec.stages:
            needed = sorted({_producer(artifact) for artifact in missing}, key=NAMES.index)
            raise ConfigError(
                f"stages={list(spec.stages)} runs '{stage.NAME}' without {needed}, which it reads from "
                f"({', '.join(missing)}). Add them, or run a prefix of the default stage list."
            )
        if missing:
            continue  # check() says so once, at start-up
        planned.append(stage)
        produced.update(stage.PRODUCES)
    return planned


def check(spec: PipelineSpec) -> list[ModuleType]:
    """Plan the run and run each planned stage's own start-up checks: every config error before any work."""
    planned = plan(spec)
    for stage in REGISTRY:
        if stage not in planned and is_switched_on(stage, spec):
            inputs = list(stage.CONSUMES)
            log.info(
                "%s.enabled=true, but this run does not produce its inputs %s: it does not run", stage.NAME, inputs
            )
    for stage in planned:
        stage_check = getattr(stage, "check", None)
        if stage_check is not None:
            stage_check(spec)
    return planned
