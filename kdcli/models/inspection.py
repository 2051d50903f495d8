"""What `kdcli methods` and `kdcli inspect` show: the method library, and a model's taps. No printing here."""

from __future__ import annotations

from pydantic import BaseModel

from kdcli.models import taps
from kdcli.models.checkpoint import LoadedModel, check_arch, count_params, fresh_model, is_checkpoint_ref, load_checkpoint
from kdcli.models.preprocessing import Layer, Resolved, merge, own_preprocessing, preprocessing_flags
from kdcli.errors import KdcliError, is_out_of_memory
from kdcli.training.methods import REGISTRY


def _default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_default(v) for v in value]
    return value


def brief(value: object) -> str:
    """A parameter default for a table: tap pairs as 'student->teacher', numbers as given."""
    if isinstance(value, dict) and set(value) == {"student", "teacher"}:
        return f"{value['student']}->{value['teacher']}"
    if isinstance(value, list):
        return "[" + ", ".join(brief(v) for v in value) + "]"
    return str(value)


def method_rows() -> list[dict]:
    """Every registered method: name, summary, parameters with defaults, and what it reads by default."""
    rows = []
    for name, cls in REGISTRY.items():
        params = cls.Params(method=name)
        reads = [f"{model} {', '.join((['logits'] if wanted.logits else []) + list(wanted.taps))}"
                 for model, wanted in cls(params).needs().items()]
        fields = {
            field.alias or key: {"default": _default(getattr(params, key)), "description": field.description or ""}
            for key, field in cls.Params.model_fields.items() if key != "method"
        }
        rows.append({"name": name, "summary": cls.summary, "parameters": fields,
                     "reads": "; ".join(reads) or "student logits and labels only"})
    return rows


def _load(ref: str, arch_flag: str | None, flags: Layer | None, num_classes: int) -> tuple[LoadedModel, Resolved]:
    """The model (from its checkpoint, or fresh) and its preprocessing: flags, else the checkpoint's, else timm's."""
    if is_checkpoint_ref(ref):
        loaded = load_checkpoint(ref, arch_flag, "checkpoint", "--arch")
        return loaded, own_preprocessing(flags, loaded.stated, None, loaded.arch)
    check_arch(ref, "kdcli inspect ARCH")
    resolved = own_preprocessing(flags, None, None, ref)
    return fresh_model(ref, num_classes, resolved.config.image_size), resolved


def inspect_model(ref: str, image_size: int | None = None, arch_flag: str | None = None,
                  num_classes: int = 1000, flags: Layer | None = None) -> dict:
    """Architecture, parameters, size and every tap (with its shape at image_size) of an arch or checkpoint.

    image_size defaults to the size recorded with a checkpoint, else the architecture's timm default; a
    fixed-size architecture (ViT) named by arch is built for the size asked, as `kdcli distill` would."""
    flags = merge(preprocessing_flags("", image_size, None, None, None), flags)
    loaded, resolved = _load(ref, arch_flag, flags, num_classes)
    size = resolved.config.image_size
    model = loaded.model.eval()
    available = taps.available_taps(model)
    try:
        found = taps.shapes(model, tuple(t.key for t in available), size)
    except (RuntimeError, ValueError, AssertionError, MemoryError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_out_of_memory(err):
            raise KdcliError(f"{loaded.arch} at {size}x{size} needs more memory than this machine has ({reason}); "
                             "pass a smaller --image-size") from err
        raise KdcliError(f"{loaded.arch} cannot take {size}x{size} images ({reason}); pass another --image-size") from err
    params = count_params(model)
    return {
        "ref": ref,
        "arch": loaded.arch,
        "num_classes": loaded.num_classes,
        "params": params,
        "bytes": loaded.file_bytes or sum(p.numel() * p.element_size() for p in model.parameters()),
        "from_file": loaded.pretrained,
        "image_size": size,
        "model_args": loaded.model_args,
        "init": loaded.init,
        "preprocessing": {**resolved.summary(), **({} if loaded.pretrained else {"guessed": []})},
        "notes": loaded.notes,
        "taps": [
            {"key": t.key, "module": t.module, "channels": t.channels, "reduction": t.reduction,
             "shape": list(found[t.key][1:])}
            for t in available
        ],
    }
