"""Stage `export`: the lowered model as files a user deploys, each saved, reloaded and checked.

- TorchScript (traced or scripted, frozen or not): with export.form=auto, the form evaluate measured
  fastest for the lowered model at export.target_batch_size and evaluate.latency.threads (frozen when
  frozen won, unfrozen when traced won; frozen when nothing was measured). Its form and measured median
  are the metrics export/torchscript/frozen and export/torchscript/latency_ms and the tag export.form.
  Outputs of the reloaded file should equal the lowered model's. A TorchScript file re-packs weights
  for the engine active at load time, so load
  it with the same `torch.backends.quantized.engine` it was exported for (its name says which).
- qnnpack only: a lite-interpreter (.ptl) file for PyTorch Mobile.
- ONNX: a QDQ graph through torch's TorchScript-based exporter, checked against onnxruntime (the
  [onnx] extra; skipped with the reason when it is not installed, or when the model has dynamic,
  float16 or weight-only quantized ops, which the exporter cannot express). engine=pt2e: the q/dq
  program through the dynamo exporter, which needs onnxscript (also in the [onnx] extra); not for custom
  blocks (Python custom ops), which travel as a registry beside the .pt2 (stages/reports/export.py).

custom_config's preserved attributes (e.g. class names) ride along in the TorchScript and .ptl files
as the extra file `preserved_attributes.json` (tracing drops plain Python attributes), and in the
ONNX file as metadata_props under the same key.

Every written file is reloaded and run on the first evaluation batch against the int8 torch model: below
export.min_sqnr_db or export.min_agreement it is a warning naming the file and the figure (console, the
run's warnings.txt, the `export.disagrees` tag, `export/<format>/disagrees` = 1), not an error.

A lowered GraphModule cannot be pickled in torch 2.13, so torch.save of the module is never used.

Config keys read: export.*, backend.engine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import metric_keys
from pipeline.batch import ModelInputs
from pipeline.engine import introspect
from pipeline.engine.custom_modules import preserved_attributes
from pipeline.engine.qconfigs import quantized_engine
from pipeline.schema import ExportSpec, skip_label
from stages.reports.export import check_agreement, export_pt2e, max_abs_diff
from stages.types import EvaluationReport, ExportBundle, Loaded, Lowered, StageContext, write_json

log = logging.getLogger(__name__)

NAME = "export"
CONSUMES = ("lowered", "loaded")
# evaluation: export.form=auto writes the TorchScript form evaluate measured fastest;
# searched_skip: a search's winner tags the registered model.
USES = ("evaluation", "searched_skip")
PRODUCES = ("export_bundle",)
READS = ("export", "backend")
OPTIONAL = False


def _torchscript(
    lowered: Lowered, example: ModelInputs, spec: ExportSpec, frozen: bool, evaluation: EvaluationReport | None = None
) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """(the module to save, the unfrozen one): traced with the example inputs as a positional tuple (keyword
    inputs placed by forward's signature) or scripted; the first frozen when `frozen`. The forms evaluate
    traced and froze on inputs of the example's shapes are used as they are (0.25 s of tracing and
    freezing the ResNet-18 shape again)."""
    measured = evaluation.lowered_forms if evaluation is not None else {}
    measured_shapes = evaluation.lowered_forms_shapes if evaluation is not None else []
    wanted = "frozen" if frozen else "traced"
    same_inputs = measured_shapes == [tuple(tensor.shape) for _, tensor in example.named()]
    if spec.torchscript == "trace" and {wanted, "traced"} <= set(measured) and same_inputs:
        return measured[wanted], measured["traced"]
    with torch.no_grad():
        if spec.torchscript == "script":
            module = torch.jit.script(lowered.model)
        else:
            module = torch.jit.trace(lowered.model, example.positional(lowered.model), check_trace=False)
    return (torch.jit.freeze(module.eval()) if frozen else module), module


def choose_form(spec: ExportSpec, evaluation: EvaluationReport | None) -> tuple[bool, str, float | None]:
    """(frozen, why, the chosen form's measured median ms or None) for the TorchScript file. export.form
    frozen/unfrozen is obeyed; auto follows evaluate's measurement of the lowered model at
    export.target_batch_size (the nearest measured batch size when that one was not timed): frozen when
    frozen was fastest, unfrozen when traced was; when eager won (a GraphModule cannot be saved), the
    faster of the two TorchScript forms measured. Nothing measured: frozen, the usual winner at one thread."""
    if spec.form != "auto":
        return spec.form == "frozen", f"export.form={spec.form}", None
    sizes = sorted(
        int(key.rpartition("/b")[2])
        for key in (evaluation.fastest_form if evaluation else {})
        if key.startswith("lowered/b")
    )
    if evaluation is None or not sizes:
        return True, "export.form=auto and no latency measured for the lowered model (evaluate did not time it)", None
    size = min(sizes, key=lambda measured: (abs(measured - spec.target_batch_size), measured))
    where = f"batch {size}" + (
        "" if size == spec.target_batch_size else f", nearest to export.target_batch_size={spec.target_batch_size}"
    )
    medians = {
        form: evaluation.metrics[key]
        for form in ("traced", "frozen")
        if (key := metric_keys.form_latency_ms("lowered", form, size, "median")) in evaluation.metrics
    }
    fastest = evaluation.fastest_form[f"lowered/b{size}"]
    if fastest == "eager" and medians:
        fastest = min(medians, key=lambda form: medians[form])
        where += ", eager fastest but not saveable"
    if fastest not in medians:
        return True, f"export.form=auto: no TorchScript form measured at {where}", None
    return fastest == "frozen", f"{fastest} measured fastest at {where}", medians[fastest]


PRESERVED_ATTRIBUTES_FILE = "preserved_attributes.json"


def preserved_attribute_files(model: torch.nn.Module) -> dict[str, str]:
    """custom_config's preserved attributes as a JSON `_extra_files` entry. TorchScript tracing (and
    freezing) drops plain Python attributes, but extra files travel inside the archive; read them back
    with torch.jit.load(path, _extra_files={"preserved_attributes.json": ""}). Values JSON cannot hold
    are written as their str()."""
    attributes = preserved_attributes(model)
    if not attributes:
        return {}
    return {PRESERVED_ATTRIBUTES_FILE: json.dumps(attributes, sort_keys=True, default=str)}


def read_extra_file(path: Path, name: str) -> str:
    """An `_extra_files` entry of a TorchScript or lite-interpreter archive, without loading the model."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        (member,) = [entry for entry in archive.namelist() if entry.endswith(f"/extra/{name}")]
        return archive.read(member).decode()


def _check_extra_files(written: dict[str, str], reloaded: dict[str, str | bytes], path: Path) -> None:
    for name, text in written.items():
        value = reloaded.get(name, "")
        if (value.decode() if isinstance(value, bytes) else value) != text:
            raise RuntimeError(f"export: {name} reloaded from {path} differs from what was written.")


FORMAT_LABELS = {
    "torchscript": "TorchScript",
    "lite_interpreter": "lite-interpreter",
    "onnx": "ONNX",
    "pt2": "torch.export program",
    "aot_inductor": "AOTInductor package",
}


def export(
    lowered: Lowered, loaded: Loaded, spec: ExportSpec, out_dir: Path, evaluation: EvaluationReport | None = None
) -> ExportBundle:
    """`evaluation` (evaluate's report) decides the TorchScript form with export.form=auto."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(lowered.model, "compiled_form", False):
        return export_pt2e(lowered, loaded, spec, out_dir)
    frozen, form_reason, form_ms = choose_form(spec, evaluation)
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    metrics: dict[str, float] = {}
    disagreements: dict[str, str] = {}
    engine = lowered.engine
    check_inputs = loaded.data.evaluation[0][0]
    example = loaded.data.example_inputs
    check_positional = check_inputs.positional(lowered.model)  # what a TorchScript or mobile file is called with

    extra_files = preserved_attribute_files(lowered.model)
    with quantized_engine(engine), torch.no_grad():
        expected = check_inputs.call(lowered.model)

        scripted, traced = (
            (None, None) if spec.torchscript == "none" else _torchscript(lowered, example, spec, frozen, evaluation)
        )
        if scripted is not None:
            metrics[metric_keys.EXPORT_FROZEN] = float(frozen)
            if form_ms is not None:
                metrics[metric_keys.EXPORT_LATENCY_MS] = form_ms
            path = out_dir / f"lowered_{engine}.torchscript.pt"
            torch.jit.save(scripted, str(path), _extra_files=extra_files)
            reloaded_extra = dict.fromkeys(extra_files, "")
            reloaded = torch.jit.load(str(path), _extra_files=reloaded_extra)
            _check_extra_files(extra_files, reloaded_extra, path)
            actual = reloaded(*check_positional)
            metrics[metric_keys.export_metric("torchscript/max_abs_diff")] = max_abs_diff(expected, actual)
            metrics[metric_keys.export_metric("torchscript/bytes")] = float(path.stat().st_size)
            files["torchscript"] = path
            if (missed := check_agreement("torchscript", expected, actual, spec, metrics)) is not None:
                disagreements["torchscript"] = missed

        if spec.lite_interpreter and engine == "qnnpack":
            from torch.jit.mobile import _load_for_lite_interpreter

            path = out_dir / "lowered_qnnpack.ptl"
            module = scripted or _torchscript(lowered, example, ExportSpec(), frozen)[0]
            module._save_for_lite_interpreter(str(path), _extra_files=extra_files)
            # The mobile loader reads no extra files; they sit in the zip archive's extra/ folder.
            _check_extra_files(extra_files, {name: read_extra_file(path, name) for name in extra_files}, path)
            actual = _load_for_lite_interpreter(str(path))(*check_positional)
            metrics[metric_keys.export_metric("lite_interpreter/max_abs_diff")] = max_abs_diff(expected, actual)
            files["lite_interpreter"] = path
            if (missed := check_agreement("lite_interpreter", expected, actual, spec, metrics)) is not None:
                disagreements["lite_interpreter"] = missed
        elif spec.lite_interpreter:
            skipped["lite_interpreter"] = f"mobile lite-interpreter files are for backend=qnnpack (this run: {engine})"

    if spec.onnx:
        missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        float_io = introspect.float_io_quantized_ops(lowered.model)
        if missing:
            skipped["onnx"] = f"{' and '.join(missing)} not installed; pip install -e '.[onnx]' to export ONNX"
        elif float_io:
            # torch's ONNX exporter has no symbolic for quantized::linear_dynamic(_fp16) or embedding_byte.
            skipped["onnx"] = (
                f"torch's ONNX exporter cannot express dynamic, float16 or weight-only quantized ops: "
                f"{', '.join(float_io[:3])}{' ...' if len(float_io) > 3 else ''}; use the TorchScript file"
            )
        else:
            path = out_dir / f"lowered_{engine}.onnx"
            try:
                # From the traced module when there is one: the exporter then skips its own trace of the
                # GraphModule (0.26 against 0.51 s on the ResNet-18 shape, the same graph and outputs).
                traced_source = traced if spec.torchscript == "trace" else None
                actual = _export_onnx(lowered, example, check_inputs, spec.onnx_opset, path, traced_source)
                metrics[metric_keys.export_metric("onnx/bytes")] = float(path.stat().st_size)
                if extra_files:
                    _add_onnx_metadata(path, extra_files)
                files["onnx"] = path
                if (missed := check_agreement("onnx", expected, actual, spec, metrics)) is not None:
                    disagreements["onnx"] = missed
            except torch.onnx.errors.UnsupportedOperatorError as error:
                # e.g. onednn fuses conv+add+relu into one kernel that has no ONNX symbolic.
                path.unlink(missing_ok=True)
                skipped["onnx"] = f"torch's ONNX exporter cannot express this {engine} model: {error}"
                log.warning("export: no ONNX file for backend=%s: %s", engine, error)

    for name, reason in skipped.items():
        log.info("export: skipped %s: %s", name, reason)
    form = ("frozen" if frozen else "unfrozen") if "torchscript" in files else None
    return ExportBundle(files, skipped, metrics, disagreements, form=form, form_reason=form_reason)


def _add_onnx_metadata(path: Path, extra_files: dict[str, str]) -> None:
    """The preserved attributes as ONNX metadata_props (key preserved_attributes.json)."""
    import onnx

    model = onnx.load(str(path))
    for name, text in extra_files.items():
        model.metadata_props.add(key=name, value=text)
    onnx.save(model, str(path))


def onnx_input_names(model: torch.nn.Module, example: ModelInputs) -> list[str]:
    """The ONNX graph's input names: the keyword inputs' names (input_ids, attention_mask...), and
    input_0, input_1... for positional inputs."""
    return example.positional_names(model)


def _dynamic_axes(names: list[str], values: tuple[Any, ...]) -> dict[str, dict[int, str]]:
    """Every input's batch dimension is dynamic; an integer or bool input's other dimensions too (token
    ids and masks padded per batch to different lengths)."""
    axes: dict[str, dict[int, str]] = {}
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            continue
        axes[name] = {0: "batch"}
        if not (value.is_floating_point() or value.is_complex()):
            axes[name].update({dim: f"{name}_dim{dim}" for dim in range(1, value.dim())})
    return axes


def _export_onnx(
    lowered: Lowered,
    example: ModelInputs,
    check_inputs: ModelInputs,
    opset: int,
    path: Path,
    traced: torch.jit.ScriptModule | None = None,
) -> torch.Tensor:
    """Write the ONNX file (from `traced`, the lowered model traced on `example`, when given) and return its
    outputs on `check_inputs` through onnxruntime, fed by name."""
    import onnxruntime

    names = onnx_input_names(lowered.model, example)
    with quantized_engine(lowered.engine), torch.no_grad():
        torch.onnx.export(
            traced if traced is not None else lowered.model,
            example.positional(lowered.model),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["output"],
            dynamic_axes={**_dynamic_axes(names, example.positional(lowered.model)), "output": {0: "batch"}},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # An input the graph does not use is not a graph input (the exporter drops it).
    graph_inputs = {entry.name for entry in session.get_inputs()}
    values = dict(zip(names, check_inputs.positional(lowered.model), strict=True))
    feed = {name: value.numpy() for name, value in values.items() if name in graph_inputs and value is not None}
    return torch.from_numpy(session.run(None, feed)[0])


def compute(ctx: StageContext) -> dict[str, Any]:
    # Export writes its files as it makes them (each is reloaded and checked against the lowered model).
    artifacts = ctx.artifacts
    bundle = export(
        artifacts["lowered"], artifacts["loaded"], ctx.spec.export, ctx.out_dir, artifacts.get("evaluation")
    )
    return {"export_bundle": bundle}


def write(produced: dict[str, Any], ctx: StageContext) -> dict[str, float]:
    """skipped.json: formats not written, with the reason (the files themselves are written by compute);
    disagreements.json when a file's outputs disagree with the int8 torch model, each also a warning (on
    the console and in the run's summary) and the tag `export.disagrees`."""
    out = ctx.out_dir
    bundle: ExportBundle = produced["export_bundle"]
    write_json(out / "skipped.json", bundle.skipped)
    for name, missed in bundle.disagreements.items():
        ctx.warn(
            f"{bundle.files[name]} ({FORMAT_LABELS[name]}) disagrees with the int8 torch model on the first "
            f"evaluation batch: {missed}. Check it on your own data before deploying it, or deploy another format."
        )
    if bundle.disagreements:
        write_json(out / "disagreements.json", bundle.disagreements)
        ctx.set_tags({"export.disagrees": "; ".join(f"{n}: {m}" for n, m in sorted(bundle.disagreements.items()))})
    written = [
        f"{name} ({FORMAT_LABELS[name]} disagrees: {bundle.disagreements[name].split(' (')[0]})"
        if name in bundle.disagreements
        else name
        for name in sorted(bundle.files)
    ]
    log.info("export: wrote %s", ", ".join(written))
    if bundle.form is not None:
        speed = bundle.metrics.get(metric_keys.EXPORT_LATENCY_MS)
        shown = f"{bundle.form} ({bundle.form_reason}" + (f": {speed:.3f} ms)" if speed is not None else ")")
        ctx.set_tags({"export.form": shown})
        log.info("export: TorchScript form %s", shown)
    if "torchscript" in bundle.files:
        _log_model(bundle.files["torchscript"], ctx)
    return bundle.metrics


def _log_model(torchscript: Path, ctx: StageContext) -> None:
    """The TorchScript file as the run's tracking model (inputs positional, as it was traced), tagged for
    the registry with what the search left float when a search ran."""
    lowered, loaded = ctx.artifacts["lowered"], ctx.artifacts["loaded"]
    example = loaded.data.example_inputs.map(lambda tensor: tensor[:2]).positional(lowered.model)
    if not all(isinstance(value, torch.Tensor) for value in example):
        log.info("export: the int8 model is not logged as a tracking model (an input is not a tensor: %s)", example)
        return
    with quantized_engine(lowered.engine), torch.no_grad():
        output = lowered.model(*example)
    if not isinstance(output, torch.Tensor):
        log.info("export: the int8 model is not logged as a tracking model (its output is a %s)", type(output))
        return
    searched = ctx.artifacts.get("searched_skip")
    tags = {"skip": f"searched:{skip_label(searched)}"} if searched else {}
    ctx.log_model(torchscript, lowered.engine, [t.numpy() for t in example], output.numpy(), tags)
