"""What `kdcli methods` and `kdcli inspect` show: the method library, and a model's taps. No printing here."""

from __future__ import annotations

from pydantic import BaseModel

from kdcli.models import taps
from kdcli.models.checkpoint import LoadedModel, check_arch, count_params, fresh_model, is_checkpoint_ref, load_checkpoint
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
        needs = cls(params).needs()
        reads = []
        if needs.teacher_logits:
            reads.append("teacher logits")
        if needs.student_taps or needs.teacher_taps:
            reads.append(f"student {', '.join(needs.student_taps)}; teacher {', '.join(needs.teacher_taps)}")
        fields = {
            key: {"default": _default(getattr(params, key)), "description": field.description or ""}
            for key, field in cls.Params.model_fields.items() if key != "method"
        }
        rows.append({"name": name, "summary": cls.summary, "parameters": fields,
                     "reads": "; ".join(reads) or "student logits and labels only"})
    return rows


def _load(ref: str, arch_flag: str | None, image_size: int | None, num_classes: int) -> tuple[LoadedModel, int]:
    if is_checkpoint_ref(ref):
        loaded = load_checkpoint(ref, arch_flag, "checkpoint", "--arch")
        recorded = loaded.data_config.image_size if loaded.data_config else None
        size = image_size or recorded or int(loaded.model.pretrained_cfg["input_size"][-1])
        return loaded, size
    from timm.models import get_pretrained_cfg

    check_arch(ref, "kdcli inspect ARCH")
    cfg = get_pretrained_cfg(ref)
    size = image_size or (int(cfg.input_size[-1]) if cfg is not None else 224)
    return fresh_model(ref, num_classes, size), size


def inspect_model(ref: str, image_size: int | None = None, arch_flag: str | None = None,
                  num_classes: int = 1000) -> dict:
    """Architecture, parameters, size and every tap (with its shape at image_size) of an arch or checkpoint.

    image_size defaults to the size recorded with a checkpoint, else the architecture's timm default; a
    fixed-size architecture (ViT) named by arch is built for the size asked, as `kdcli distill` would."""
    if image_size is not None and image_size < 8:
        raise KdcliError(f"--image-size {image_size}: must be 8 or more")
    loaded, size = _load(ref, arch_flag, image_size, num_classes)
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
        "taps": [
            {"key": t.key, "module": t.module, "channels": t.channels, "reduction": t.reduction,
             "shape": list(found[t.key][1:])}
            for t in available
        ],
    }
