"""Which CPU ran it: every run is tagged with the CPU model, torch's CPU capability and the int8
instruction sets, and writes them to <run dir>/machine.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline.machine import cpu_model, machine_tags
from pipeline.tracking import run_tags
from tests.conftest import compose_config, to_spec

KEYS = {"cpu.model", "cpu.capability", "cpu.vnni", "cpu.avx512", "cpu.amx", "torch.version"}


def test_detection_matches_torch_and_proc_cpuinfo(tmp_path: Path) -> None:
    tags = machine_tags()
    assert set(tags) == KEYS
    assert tags["cpu.capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["cpu.vnni"] == str(torch.cpu._is_vnni_supported()).lower()
    assert tags["cpu.avx512"] == str(torch.cpu._is_avx512_supported()).lower()
    assert tags["cpu.amx"] == str(torch.cpu._is_amx_tile_supported()).lower()
    assert tags["cpu.model"] and tags["cpu.model"] == cpu_model()
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU\n")
    assert cpu_model(fake) == "Intel(R) Xeon(R) Gold 6338 CPU"
    assert cpu_model(tmp_path / "missing") != ""  # platform.processor() or "unknown"


def test_run_tags_include_the_machine() -> None:
    tags = run_tags(to_spec(compose_config([])))
    assert {key: tags[key] for key in KEYS} == machine_tags()


def test_a_run_is_tagged_with_its_cpu_and_writes_machine_json(run_pipeline, tmp_path: Path) -> None:
    _, _, run_dir = run_pipeline(["stages=[load]"])
    assert json.loads((run_dir / "machine.json").read_text()) == machine_tags()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fx-ptq").experiment_id])
    assert {key: run.data.tags[key] for key in KEYS} == machine_tags()
    assert "machine.json" in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
