"""The recipe: a pydantic v2 schema of an ordered list of distillation stages, loaded from YAML.

The schema here is the single source of truth: validation, `--set` overrides, error messages and
`kdcli recipe schema` are all derived from it. Method parameters come from the method classes themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdcli.errors import KdcliError, brief, close_matches
from kdcli.safeyaml import load_yaml
from kdcli.training.methods import REGISTRY, AnchorFields, AnchorParams, MethodParams
from kdcli.training.optim import OptimizerSettings, ScheduleSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Augment(_Strict):
    hflip: bool = Field(True, description="random horizontal flip")
    crop: Literal["pad", "resized", "none"] = Field(
        "pad", description="pad: pad by image_size/8 and crop back (CIFAR style); resized: random resized crop"
    )


# Pixels are scaled to [0, 1] before normalising (timm's convention): a mean far outside it or a tiny std turns
# every input into huge numbers and the first loss into infinity.
_Mean = Annotated[float, Field(ge=-10, le=10)]
_Std = Annotated[float, Field(ge=0.001, le=100)]


class DataSettings(_Strict):
    image_size: int | None = Field(
        None, ge=8, le=4096, description="square input size; default: teacher's config, else the data set's native size"
    )
    batch_size: int = Field(
        64, ge=2, le=65536, description="at least 2: batch norm cannot train on one image (a last batch of 1 is dropped)"
    )
    eval_batch_size: int = Field(256, ge=1, le=65536)
    mean: tuple[_Mean, _Mean, _Mean] | None = Field(None, description="default: from the teacher's config")
    std: tuple[_Std, _Std, _Std] | None = Field(None, description="default: from the teacher's config")
    augment: Augment = Field(default_factory=Augment)
    workers: int | Literal["auto"] = Field(
        "auto", description="data loader worker processes (0-64); auto: none when the images are decoded in memory "
        "and cropped in batches, else all cores but one (at most 8)"
    )
    views: int | None = Field(
        None, ge=1, le=1000, description="fixed augmented views per training image, each epoch showing one of them "
        "(lets teacher and reference outputs be stored, see --cache); default: a fresh view every epoch, or "
        "without random augmentation the one view each image has"
    )

    def fixed_views(self) -> int | None:
        """How many fixed views each image has: data.views, else 1 when nothing is random (no flip, no crop: every
        epoch shows the image itself, so its outputs can be stored as they are), else None (fresh every epoch)."""
        if self.views is not None:
            return self.views
        return 1 if not self.augment.hflip and self.augment.crop == "none" else None

    @model_validator(mode="after")
    def _workers_in_range(self) -> DataSettings:
        if isinstance(self.workers, int) and not 0 <= self.workers <= 64:
            raise ValueError("workers must be 0 to 64, or auto")
        return self


class AnchorSettings(AnchorFields):
    """The stage's `anchor:` block: shorthand for an `anchor` loss (weight 1) with these settings."""

    def as_loss(self) -> AnchorParams | None:
        if self.weighting == "none":
            return None
        return AnchorParams(**self.model_dump(by_alias=True))


def _loss_union() -> Any:
    members = tuple(cls.Params for cls in REGISTRY.values())
    return Annotated[Union[members], Field(discriminator="method")]  # noqa: UP007 - built at run time


LossSpec = _loss_union()


class Stage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64, description="letters, digits, '_', '-', '.'")
    epochs: int = Field(ge=1, le=10000)
    losses: list[LossSpec] = Field(min_length=1, description="weighted KD methods summed in this stage")
    anchor: AnchorSettings = Field(
        default_factory=AnchorSettings, description="shorthand for an anchor loss: the frozen reference of the stage"
    )
    optimizer: OptimizerSettings = Field(
        default_factory=OptimizerSettings, description="defaults to the recipe's optimizer; keys here override it"
    )
    schedule: ScheduleSettings = Field(
        default_factory=ScheduleSettings, description="defaults to the recipe's schedule; keys here override it"
    )

    @model_validator(mode="after")
    def _one_anchor(self) -> Stage:
        if self.anchor.weighting != "none" and any(isinstance(spec, AnchorParams) for spec in self.losses):
            raise ValueError("the anchor is given twice, as an anchor: block and as an anchor loss; keep one")
        return self

    def loss_specs(self) -> list[MethodParams]:
        """The stage's losses, with the `anchor:` shorthand expanded into the anchor loss it stands for."""
        anchor = self.anchor.as_loss()
        return [*self.losses, anchor] if anchor else list(self.losses)

    def anchor_weighting(self) -> str:
        """How the stage is anchored: 'none', 'fixed' or 'tcp' (of its anchor loss, however it was written)."""
        return next((spec.weighting for spec in self.loss_specs() if isinstance(spec, AnchorParams)), "none")


class Recipe(_Strict):
    name: str = Field("custom", max_length=100)
    description: str = Field("", max_length=10000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    data: DataSettings = Field(default_factory=DataSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, raw: Any) -> Any:
        """A stage's optimizer/schedule start from the recipe-wide ones; keys the stage gives override."""
        if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
            return raw
        stages = []
        for stage in raw["stages"]:
            if isinstance(stage, dict):
                stage = dict(stage)
                for key in ("optimizer", "schedule"):
                    base, own = raw.get(key) or {}, stage.get(key) or {}
                    if isinstance(base, dict) and isinstance(own, dict):
                        stage[key] = {**base, **own}
            stages.append(stage)
        return {**raw, "stages": stages}

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """Short content hash of the recipe as it runs (after overrides)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]


class RecipeError(KdcliError):
    """Every problem found in a recipe; the message is the first, `problems` has them all."""

    def __init__(self, source: str, problems: list[str], shown: int = 20):
        self.problems = [f"recipe {source}: {p}" for p in problems[:shown]]
        if len(problems) > shown:
            self.problems.append(f"recipe {source}: {len(problems) - shown} more problems not shown")
        more = f" (+{len(problems) - 1} more: run 'kdcli recipe validate')" if len(problems) > 1 else ""
        super().__init__(self.problems[0] + more)


# ---------------------------------------------------------------- built-in recipes


def builtin_dir() -> Path:
    """Built-in recipes: packaged inside the wheel as kdcli/recipes, or the checkout's top-level recipes/."""
    packaged = Path(str(resources.files("kdcli"))) / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


DEFAULT_RECIPE = "joint"  # the best of kdcli ablate's cells on the measured sets (README, "Which recipe")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; refuse to read a huge file whole


def load_recipe(ref: str | None = None, overrides: list[str] = (), seed: int | None = None) -> Recipe:
    """Load a recipe by built-in name or YAML path, apply `--set` overrides and --seed, validate."""
    ref = ref or DEFAULT_RECIPE
    path = Path(ref)
    if path.is_dir():
        raise KdcliError(f"recipe {ref} is a folder; pass a YAML file or a built-in name")
    if not path.is_file():
        if ref not in builtin_names():
            hint = close_matches(ref, builtin_names())
            raise KdcliError(
                f"no recipe '{ref}': not a file, nor a built-in{hint}; built-ins: {', '.join(builtin_names())}"
            )
        path = builtin_dir() / f"{ref}.yaml"
    try:
        with open(path, "rb") as handle:
            content = handle.read(MAX_RECIPE_BYTES + 1)
        if len(content) > MAX_RECIPE_BYTES:
            raise KdcliError(f"recipe {ref}: larger than {MAX_RECIPE_BYTES // 1024} KiB, which no recipe is; check the path")
        raw = load_yaml(content.decode("utf-8"), f"recipe {ref}")
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise KdcliError(f"recipe {ref}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise KdcliError(f"recipe {ref}: cannot read it ({err})") from err
    if not isinstance(raw, dict):
        raise KdcliError(f"recipe {ref}: the top level must be a mapping of keys (name, stages, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    if seed is not None:
        raw["seed"] = seed
    return validate_recipe(raw, ref)


def _non_finite(raw: Any, path: tuple = ()) -> tuple[tuple, float] | None:
    """(location, value) of the first NaN or infinity anywhere in a raw recipe (.nan, .inf in YAML)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return path, raw
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    return next((found for key, value in items if (found := _non_finite(value, (*path, key)))), None)


def validate_recipe(raw: dict, source: str) -> Recipe:
    found = _non_finite(raw)
    if found:
        raise RecipeError(source, [f"{_dotted(list(found[0]))}: must be a finite number (got {found[1]})"])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(source, [_describe(e) for e in err.errors()]) from None


def recipe_schema() -> dict:
    return Recipe.model_json_schema(by_alias=True)


# ---------------------------------------------------------------- walking the schema

_PARAMS_BY_TAG: dict[str, type[MethodParams]] = {name: cls.Params for name, cls in REGISTRY.items()}


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] to the type that holds structure."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType) and not _is_loss_union(tp):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_loss_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, UnionType) and all(
        isinstance(a, type) and issubclass(a, MethodParams) for a in get_args(tp)
    )


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _field(model: type[BaseModel], key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _model_at(loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """Follow a pydantic error location through the schema: (location without union tags, model at its end)."""
    tp: Any = Recipe
    path: list = []
    for part in loc:
        tp = _unwrap(tp)
        if _is_loss_union(tp):
            tp = _PARAMS_BY_TAG.get(part)
            continue
        path.append(part)
        if isinstance(part, int) and get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif _is_model(tp) and _field(tp, part) is not None:
            tp = _field(tp, part).annotation
        else:
            tp = None
    tp = _unwrap(tp)
    return path, tp if _is_model(tp) else None


def _dotted(path: list) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: dict) -> str:
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        path, _ = _model_at(loc)
        _, parent = _model_at(loc[:-1])
        allowed = _field_names(parent) if parent else []
        hint = close_matches(str(loc[-1]), allowed)
        return f"{_dotted(path)}: unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    path, _ = _model_at(loc)
    where = _dotted(path)
    methods = ", ".join(REGISTRY)
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        return f"{where}: unknown method '{tag}'{close_matches(tag, REGISTRY)}; available: {methods}"
    if kind == "union_tag_not_found":
        return f"{where}: each loss needs a 'method'; available: {methods}"
    if kind == "missing":
        return f"{where}: required key missing"
    if kind == "literal_error":
        return f"{where}: got {brief(error['input'])}; allowed: {ctx.get('expected')}"
    message = error["msg"].removeprefix("Value error, ")
    bounds = {"greater_than": "greater than", "greater_than_equal": "greater than or equal to", "less_than": "less than",
              "less_than_equal": "less than or equal to"}
    if kind in bounds:  # pydantic writes a float bound such as float32's largest in full: 39 digits
        limit = next(iter(ctx.values()))
        message = f"input should be {bounds[kind]} {limit if isinstance(limit, int) else f'{limit:g}'}"
    if kind.startswith(("greater", "less", "too_", "int_", "float_", "bool_", "string_", "list_", "finite")):
        return f"{where}: {message[:1].lower()}{message[1:]} (got {brief(error['input'])})"
    return f"{where}: {message[:1].lower()}{message[1:]}"


# ---------------------------------------------------------------- --set overrides


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set dotted.path=value` to the raw recipe; the value is read as YAML (3, 0.1, tcp, [1, 2])."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise KdcliError(f"--set {brief(assignment)}: expected key=value, e.g. --set stages.0.epochs=3")
    try:
        value = load_yaml(text, f"--set {key}") if text.strip() else text
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    tp: Any = Recipe
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the recipe"
        last = depth == len(parts) - 1
        tp = _unwrap(tp)
        if _is_loss_union(tp):
            tag = node.get("method") if isinstance(node, dict) else None
            tp = _PARAMS_BY_TAG.get(tag)
            if tp is None:
                raise KdcliError(f"--set {key}: {where} has no valid 'method' to look up '{part}' in")
        if get_origin(tp) is list:
            if not isinstance(node, list):
                raise KdcliError(f"--set {key}: {where} is not given in the recipe, so it has no entries to set")
            if not part.isdigit() or int(part) >= len(node):
                raise KdcliError(
                    f"--set {key}: {where} has {len(node)} entries, so '{part}' must be an index 0..{len(node) - 1}"
                )
            index = int(part)
            if last:
                node[index] = value
            node, tp = node[index], get_args(tp)[0]
        elif _is_model(tp):
            field = _field(tp, part)
            if field is None:
                allowed = _field_names(tp)
                raise KdcliError(
                    f"--set {key}: '{part}' is not a key of {where}{close_matches(part, allowed)}; "
                    f"keys there: {', '.join(allowed)}"
                )
            name = field.alias or part
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, (dict, list)):
                    raise KdcliError(f"--set {key}: {where}.{name} is a single value, it has no '{parts[depth + 1]}'")
                tp = field.annotation
        else:
            raise KdcliError(f"--set {key}: {where} is a single value, it has no '{part}'")
