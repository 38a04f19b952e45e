"""stages/export.py's engine=pt2e files and the checks every format shares: the q/dq program as a stripped
`.pt2`, a static-batch AOTInductor package and ONNX (dynamo exporter), each reloaded in a fresh process (ONNX:
onnxruntime) and compared with the q/dq program; custom blocks (pipeline/engine/pt2e_custom.py) travel as a
registry file beside them, loaded first in the fresh process; ONNX is skipped for them with the reason."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import torch

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine.qconfigs import quantized_engine
from pipeline.measure import sqnr_db
from pipeline.schema import ExportSpec
from stages.types import ExportBundle, Loaded, Lowered

log = logging.getLogger(__name__)


def max_abs_diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return (expected - actual).abs().max().item()


def _agreement(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """Top-1 agreement for class-score outputs ([N, C], C > 1); None for other outputs (embeddings...)."""
    if expected.dim() != 2 or expected.shape[1] < 2:
        return None
    return (actual.argmax(1) == expected.argmax(1)).float().mean().item()


def check_agreement(
    name: str, expected: torch.Tensor, actual: torch.Tensor, spec: ExportSpec, metrics: dict[str, float]
) -> str | None:
    """Record how far a reloaded file's outputs are from the int8 torch model's (`export/<name>/sqnr_db`,
    `export/<name>/agreement`, `export/<name>/disagrees`); return the figures that miss export.min_sqnr_db
    or export.min_agreement (e.g. "14.4 dB SQNR, 72.0% agreement"), or None when the file agrees."""
    sqnr = sqnr_db(expected, actual)
    agreement = _agreement(expected, actual)
    if math.isfinite(sqnr):  # identical outputs (inf dB) are said by max_abs_diff = 0
        metrics[metric_keys.export_metric(f"{name}/sqnr_db")] = sqnr
    if agreement is not None:
        metrics[metric_keys.export_metric(f"{name}/agreement")] = agreement
    misses = []
    if sqnr < spec.min_sqnr_db:
        misses.append(f"{sqnr:.1f} dB SQNR (export.min_sqnr_db={spec.min_sqnr_db:g})")
    if agreement is not None and agreement < spec.min_agreement:
        misses.append(f"{agreement:.1%} agreement (export.min_agreement={spec.min_agreement:g})")
    metrics[metric_keys.export_metric(f"{name}/disagrees")] = float(bool(misses))
    return ", ".join(misses) or None


# Run in a fresh process: a plain-torch loader (no torchao) needs only the decomposed q/dq ops, and, when the
# program calls custom blocks, their registry loaded first (pipeline.engine.pt2e_custom.load_custom_ops).
_RELOAD_SCRIPT = """
import sys, torch
import torch.ao.quantization.fx._decomposed  # registers quantized_decomposed ops the .pt2 program calls
kind, path, inputs, result, registry = sys.argv[1:]
if registry:
    from pipeline.engine.pt2e_custom import load_custom_ops
    load_custom_ops(registry)
args = torch.load(inputs)
if kind == "pt2":
    module = torch.export.load(path).module()
else:
    module = torch._inductor.aoti_load_package(path)
with torch.no_grad():
    torch.save(module(*args), result)
"""


def reload_in_fresh_process(
    kind: str, path: Path, args: tuple, work: Path, registry: Path | None = None
) -> torch.Tensor:
    """Load `path` in a new Python process with plain torch (and the custom-op `registry` when given: then
    the pipeline package is put on its PYTHONPATH for the registry's loader), run it on `args`, return
    its outputs."""
    import os
    import subprocess
    import sys

    import pipeline

    inputs, result = work / f"{kind}_check_inputs.pt", work / f"{kind}_check_outputs.pt"
    torch.save(tuple(args), inputs)
    # The registry's loader is the pipeline's: make it importable from wherever the run was started.
    root = str(Path(pipeline.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RELOAD_SCRIPT, kind, str(path), str(inputs), str(result), str(registry or "")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env if registry else None,
        )
        if done.returncode != 0:
            raise RuntimeError(f"export: reloading {path} in a fresh process failed: {done.stderr.strip()[-2000:]}")
        return torch.load(result)
    finally:
        inputs.unlink(missing_ok=True)
        result.unlink(missing_ok=True)


def export_pt2e(lowered: Lowered, loaded: Loaded, spec: ExportSpec, out_dir: Path) -> ExportBundle:
    """engine=pt2e: the q/dq program as a stripped `.pt2` (torch.export.save, dynamic batch), an AOTInductor
    package (static batch: a dynamic one gave wrong outputs on the digits net) and ONNX (dynamo exporter),
    each reloaded in a fresh process (ONNX: onnxruntime) and checked against the q/dq program."""
    from pipeline.engine import pt2e, pt2e_export

    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    metrics: dict[str, float] = {}
    disagreements: dict[str, str] = {}
    engine = lowered.engine
    program = pt2e.program_of(lowered.model)
    check_inputs = loaded.data.evaluation[0][0]
    positional = check_inputs.positional(program)
    with quantized_engine(engine), torch.no_grad():
        expected = program(*positional)

    def record(name: str, path: Path, actual: torch.Tensor) -> None:
        metrics[metric_keys.export_metric(f"{name}/bytes")] = float(path.stat().st_size)
        metrics[metric_keys.export_metric(f"{name}/max_abs_diff")] = max_abs_diff(expected, actual)
        files[name] = path
        if (missed := check_agreement(name, expected, actual, spec, metrics)) is not None:
            disagreements[name] = missed

    ops = pt2e_export.custom_ops(program)
    registry = out_dir / f"qdq_{engine}.custom_ops.pt" if ops else None
    if registry is not None:
        pt2e_export.save_custom_op_registry(program, registry)
        metrics[metric_keys.export_metric("custom_ops/bytes")] = float(registry.stat().st_size)
        log.info("export: custom blocks %s saved to %s (load_custom_ops before loading the files)", ops, registry)
    path = out_dir / f"qdq_{engine}.pt2"
    pt2e_export.save_program(program, pt2e.export_example(loaded.data.example_inputs), path)
    record("pt2", path, reload_in_fresh_process("pt2", path, positional, out_dir, registry))

    if spec.aot_inductor and not getattr(lowered.model, "compile", True):
        skipped["aot_inductor"] = f"inductor cannot compile this backend's q/dq program (backend={engine}; see lower)"
    elif spec.aot_inductor:
        path = out_dir / f"compiled_{engine}_b{check_inputs.batch_size}.aoti.pt2"
        pt2e_export.save_aot_inductor(program, check_inputs, path)
        record("aot_inductor", path, reload_in_fresh_process("aot_inductor", path, positional, out_dir, registry))

    if spec.onnx:
        missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
        if ops:
            skipped["onnx"] = (
                f"the q/dq program calls custom blocks as Python custom ops ({', '.join(ops)}), which torch's "
                f"dynamo ONNX exporter cannot translate (ONNX would need each block rewritten as an onnxscript "
                f"function, data-dependent branches included); deploy the .pt2 or AOTInductor file with "
                f"{registry.name if registry else ''}"
            )
        elif missing:
            skipped["onnx"] = (
                f"{' and '.join(missing)} not installed; torch's dynamo ONNX exporter (the one that takes a "
                f"torch.export program) needs onnxscript: pip install -e '.[onnx]' to export ONNX"
            )
        else:
            path = out_dir / f"qdq_{engine}.onnx"
            try:
                actual = pt2e_onnx(program, loaded.data.example_inputs, check_inputs, spec.onnx_opset, path)
                record("onnx", path, actual)
            except torch.onnx.errors.OnnxExporterError as error:
                path.unlink(missing_ok=True)
                skipped["onnx"] = f"torch's dynamo ONNX exporter cannot express this {engine} q/dq program: {error}"
                log.warning("export: no ONNX file for engine=pt2e backend=%s: %s", engine, error)
    for name in ("torchscript", "lite_interpreter"):
        if name != "torchscript" or spec.torchscript != "none":
            skipped[name] = "engine=pt2e: a torch.export program has no TorchScript form; the .pt2 file is its format"
    for name, reason in skipped.items():
        log.info("export: skipped %s: %s", name, reason)
    return ExportBundle(files=files, skipped=skipped, metrics=metrics, disagreements=disagreements)


# torch's dynamo exporter cannot write below opset 18: asked for 17 (export.onnx_opset's default, for FX's
# TorchScript-based exporter), its version converter fails and leaves the model at 18 with a traceback in the log.
PT2E_MIN_ONNX_OPSET = 18


def pt2e_onnx(
    program: torch.nn.Module, example: ModelInputs, check_inputs: ModelInputs, opset: int, path: Path
) -> torch.Tensor:
    """The q/dq program through torch.onnx.export(dynamo=True) (a dynamic batch, opset `opset` or 18 if
    lower), as one self-contained file; its outputs on `check_inputs` by onnxruntime."""
    import onnxruntime

    from pipeline.engine import pt2e

    if opset < PT2E_MIN_ONNX_OPSET:
        log.info(
            "export: ONNX opset %d for engine=pt2e (export.onnx_opset=%d; the dynamo exporter writes %d or newer)",
            PT2E_MIN_ONNX_OPSET,
            opset,
            PT2E_MIN_ONNX_OPSET,
        )
    exported = pt2e.export_program(program, pt2e.export_example(example))
    # The exporter warns once per torchvision op it could register (torchvision is not installed here).
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        # external_data=False: weights inside the .onnx (the default writes a <name>.onnx.data beside it, which
        # export/onnx/bytes would miss and a user could leave behind); verbose=False: no progress prints.
        torch.onnx.export(
            exported,
            f=str(path),
            dynamo=True,
            opset_version=max(opset, PT2E_MIN_ONNX_OPSET),
            external_data=False,
            verbose=False,
        )
    finally:
        registration.setLevel(level)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {
        entry.name: value.numpy()
        for entry, value in zip(session.get_inputs(), check_inputs.positional(program), strict=False)
    }
    return torch.from_numpy(session.run(None, feed)[0])
