"""Custom modules on engine=pt2e: each block custom_config names stays float as one `torch.library.custom_op`.

torch.export cannot capture a block with data-dependent control flow (the custom_block example's
`if (peaks > cap).any()`), and a Quantizer has no observed/quantized module classes. So before export,
every instance of a class custom_config names (the float classes of
`prepare.float_to_observed_custom_module_class`, any quant mode, and `prepare.non_traceable_module_class` /
`non_traceable_module_name`) is replaced by `CustomOpBlock`, whose forward calls one op
`ptq_pipeline::<class name in snake case>(Tensor[] inputs, Tensor[] params, str instance) -> Tensor`:

- the block's parameters and buffers go in as the `params` list, so torch.export lifts them as the
  program's own tensors (saved in the .pt2) instead of baking them into the op;
- `instance` names the block in a registry (the module itself, for its code and non-tensor attributes);
  the op runs it with `torch.func.functional_call` on the passed tensors;
- the op's fake (shape) function runs the block on the fake inputs when the block runs on meta tensors,
  else gives the output shape recorded on the example inputs, with the batch dimension following the
  input's (the op checks every real output against that rule and says so when a block breaks it).

The Quantizer annotates no custom op, so the block's node takes and returns float tensors: it stays float
(`node_kinds` calls it float), and the compiled form and the AOTInductor package call back into Python for it.
The convert side of custom_config (observed -> quantized classes) is FX only: on pt2e the block is float.

A saved program needs its ops registered before it loads: `save_registry` writes the ops it calls (op name,
class, each instance as a meta-device copy, the shape rule and the folder its class imports from) beside the
file, and `load_custom_ops(path)` registers them in a fresh process (it unpickles modules: load only registries
you trust). ONNX is not written: the dynamo exporter has no translation for a Python custom op.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

NAMESPACE = "ptq_pipeline"
SCHEMA = "(Tensor[] inputs, Tensor[] params, str instance) -> Tensor"
REGISTRY_VERSION = 1


@dataclass
class Instance:
    """One wrapped block: the module, and how its output shape follows its input's."""

    module: nn.Module
    meta_ok: bool  # the block runs on meta tensors: its fake function runs it on fake ones
    batch_dim_follows: bool  # recorded output dim 0 == input dim 0: the output batch follows the input's
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype


@dataclass
class CustomOp:
    """One op per block class: its qualified name and the blocks it runs, by instance key."""

    name: str  # ptq_pipeline::peak_limiter
    cls: type
    instances: dict[str, Instance] = field(default_factory=dict)


_OPS: dict[str, CustomOp] = {}  # by qualified name; ops live as long as the process (torch cannot drop them)


def _tensor_names(module: nn.Module) -> list[str]:
    return [name for name, _ in [*module.named_parameters(), *module.named_buffers()]]


def _expected_shape(entry: Instance, inputs: list[torch.Tensor]) -> tuple[Any, ...]:
    shape = list(entry.out_shape)
    if entry.batch_dim_follows and inputs:
        shape[0] = inputs[0].shape[0]
    return tuple(shape)


def _define(name: str, cls: type) -> CustomOp:
    """torch.library.custom_op `name` (qualified) running the registered instances of `cls`."""
    op = CustomOp(name, cls)

    def run(inputs: list[torch.Tensor], params: list[torch.Tensor], instance: str) -> torch.Tensor:
        entry = op.instances[instance]
        tensors = dict(zip(_tensor_names(entry.module), params, strict=True))
        out = torch.func.functional_call(entry.module, tensors, tuple(inputs))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name}: block '{instance}' returned a {type(out).__name__}, not a tensor")
        if not entry.meta_ok and tuple(out.shape) != _expected_shape(entry, inputs):
            raise RuntimeError(
                f"{name}: block '{instance}' returned shape {tuple(out.shape)} for input shapes "
                f"{[tuple(x.shape) for x in inputs]}, but torch.export recorded {entry.out_shape} on the example "
                f"inputs and only the batch dimension may vary for a block that cannot run on meta tensors; "
                f"export with inputs of the size you deploy, or use engine=fx."
            )
        # A custom op may not return (a view of) one of its inputs.
        storages = {t.untyped_storage().data_ptr() for t in [*inputs, *params]}
        return out.clone() if out.untyped_storage().data_ptr() in storages else out

    def fake(inputs: list[torch.Tensor], params: list[torch.Tensor], instance: str) -> torch.Tensor:
        entry = op.instances[instance]
        if entry.meta_ok:
            tensors = dict(zip(_tensor_names(entry.module), params, strict=True))
            return torch.func.functional_call(entry.module, tensors, tuple(inputs))
        return inputs[0].new_empty(_expected_shape(entry, inputs), dtype=entry.out_dtype)

    library_op = torch.library.custom_op(name, run, mutates_args=(), schema=SCHEMA)
    library_op.register_fake(fake)
    _OPS[name] = op
    return op


def op_for(cls: type, name: str | None = None) -> CustomOp:
    """The op of `cls` (defined on first use): `ptq_pipeline::<snake_case class name>`, with a numeric suffix
    when another class of the same name took it; `name` (a saved registry's) is used as it is."""
    if name is None:
        found = next((op for op in _OPS.values() if op.cls is cls), None)
        if found is not None:
            return found
        base = f"{NAMESPACE}::" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        name, suffix = base, 2
        while name in _OPS:
            name, suffix = f"{base}_{suffix}", suffix + 1
    elif name in _OPS:
        if _OPS[name].cls is not cls:
            raise RuntimeError(f"custom op {name} already runs {_OPS[name].cls}, not {cls}")
        return _OPS[name]
    return _define(name, cls)


class CustomOpBlock(nn.Module):
    """A block replaced by its custom op: `module` keeps its weights (named `<block>.module.<tensor>`)."""

    def __init__(self, module: nn.Module, op: CustomOp, instance: str) -> None:
        super().__init__()
        self.module = module
        self.op_name = op.name
        self.instance = instance

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        namespace, _, name = self.op_name.partition("::")
        params = [*self.module.parameters(), *self.module.buffers()]
        return getattr(getattr(torch.ops, namespace), name)(list(inputs), params, self.instance)


def _runs_on_meta(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    try:
        with torch.no_grad():
            copy.deepcopy(module).to("meta")(*(x.to("meta") for x in inputs))
    except Exception:  # data-dependent control flow (`bool` of a meta tensor), or ops without meta kernels
        return False
    return True


def block_names(model: nn.Module, classes: tuple[type, ...], names: list[str]) -> list[str]:
    """Submodules to wrap: instances of `classes` and the named ones, outermost only."""
    found: list[str] = []
    for name, module in model.named_modules():
        named = name and (isinstance(module, classes) or name in names)
        if named and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


def wrap_blocks(model: nn.Module, names: list[str], call_example: Any, config: str = "custom_config") -> dict[str, str]:
    """Replace each named submodule of `model` (in place) by a CustomOpBlock; `call_example(model)` runs the
    example inputs through the model to record each block's inputs and output. {block name: op name}.
    A block the op cannot carry is a ConfigError naming `config` (e.g. custom_config=custom_block)."""
    from pipeline.errors import ConfigError

    recorded: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            recorded.setdefault(name, (args, kwargs, out))  # a hook returning a value would replace the output

        return record

    hooks = [model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True) for name in names]
    try:
        with torch.no_grad():
            call_example(model)
    finally:
        for hook_handle in hooks:
            hook_handle.remove()
    wrapped: dict[str, str] = {}
    valid = (
        "engine=pt2e keeps a custom block float as a torch.library.custom_op, which takes tensors positionally "
        "and returns one tensor; leave this class out of custom_config.prepare for engine=pt2e, or use engine=fx"
    )
    for name in names:
        module = model.get_submodule(name)
        what = f"{config} names block '{name}' ({type(module).__module__}.{type(module).__qualname__})"
        if name not in recorded:
            raise ConfigError(
                f"{what}, which the example inputs never call, so its custom op has no output shape to record; {valid}."
            )
        args, kwargs, out = recorded[name]
        if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
            given = [type(a).__name__ for a in args] + [f"{k}=" for k in sorted(kwargs)]
            raise ConfigError(f"{what}, which is called with ({', '.join(given)}): {valid}.")
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{what}, which returns a {type(out).__name__}: {valid}.")
        op = op_for(type(module))
        key = f"{name}@{uuid.uuid4().hex[:8]}"
        follows = out.dim() > 0 and out.shape[0] == args[0].shape[0]
        op.instances[key] = Instance(module, _runs_on_meta(module, args), follows, tuple(out.shape), out.dtype)
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, CustomOpBlock(module, op, key))
        wrapped[name] = op.name
    return wrapped


def custom_block_names(model: nn.Module, custom: Any) -> list[str]:
    """The blocks custom_config names in `model` (`custom` is a CustomConfigSpec)."""
    from pipeline.engine.custom_modules import build_custom_configs

    prepare_config, convert_config = build_custom_configs(custom)
    settings = prepare_config.to_dict()
    if convert_config.to_dict().get("observed_to_quantized_custom_module_class"):
        log.info(
            "custom_config=%s on engine=pt2e: its blocks stay float as custom ops; the observed / quantized "
            "classes (custom_config.prepare / convert) are FX's and are not used",
            custom.name,
        )
    classes = {
        float_class
        for mapping in settings.get("float_to_observed_custom_module_class", {}).values()
        for float_class in mapping
    }
    classes |= set(settings.get("non_traceable_module_class", []))
    return block_names(model, tuple(classes), list(settings.get("non_traceable_module_name", [])))


def ops_in(program: nn.Module) -> list[tuple[str, str]]:
    """(op name, instance key) of every ptq_pipeline op a program's graph calls, in graph order."""
    graph = getattr(program, "graph", None)
    found = []
    for node in graph.nodes if graph is not None else []:
        name = getattr(node.target, "_schema", None)
        if node.op == "call_function" and name is not None and name.name.startswith(f"{NAMESPACE}::"):
            found.append((name.name, str(node.args[2])))
    return found


def _import_root(cls: type) -> str:
    """The sys.path folder `cls`'s module imports from (its file, up by the module's dotted depth)."""
    module = sys.modules[cls.__module__]
    path = Path(module.__file__ or "").resolve()
    depth = cls.__module__.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


def save_registry(program: nn.Module, path: Path) -> bool:
    """The ops `program` calls, saved to `path` for load_custom_ops; False (nothing written) when it calls none.
    The file holds the classes' import folders as plain strings and the ops as a nested torch.save, so the
    folders go on sys.path before any class is unpickled."""
    import io

    calls = ops_in(program)
    if not calls:
        return False
    ops: dict[str, Any] = {}
    for name, key in calls:
        op = _OPS[name]
        entry = op.instances[key]
        saved = ops.setdefault(name, {"class": op.cls, "instances": {}})
        # The op receives the weights from the program: a meta copy carries the code and plain attributes.
        saved["instances"][key] = {
            "module": copy.deepcopy(entry.module).to("meta"),
            **{f: getattr(entry, f) for f in ("meta_ok", "batch_dim_follows", "out_shape", "out_dtype")},
        }
    payload = io.BytesIO()
    torch.save(ops, payload)
    roots = sorted({_import_root(_OPS[name].cls) for name in ops})
    torch.save({"version": REGISTRY_VERSION, "roots": roots, "ops": payload.getvalue()}, str(path))
    return True


def load_custom_ops(path: str | Path) -> list[str]:
    """Register the ops a saved registry lists; call it before torch.export.load / aoti_load_package of the
    file it was saved beside. Puts the classes' import folders on sys.path (after the existing entries) and
    unpickles the blocks: load only registries you trust. Returns the op names."""
    import io

    outer = torch.load(str(path), weights_only=True)
    if outer.get("version") != REGISTRY_VERSION:
        raise RuntimeError(f"{path}: custom-op registry version {outer.get('version')}, expected {REGISTRY_VERSION}")
    sys.path.extend(root for root in outer["roots"] if root not in sys.path)
    ops = torch.load(io.BytesIO(outer["ops"]), weights_only=False)
    for name, saved in ops.items():
        op = op_for(saved["class"], name)
        for key, entry in saved["instances"].items():
            op.instances[key] = Instance(
                entry["module"], entry["meta_ok"], entry["batch_dim_follows"], entry["out_shape"], entry["out_dtype"]
            )
    return sorted(ops)
