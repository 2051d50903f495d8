"""What identifies a run, so that --resume continues only the run that was interrupted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kdcli.errors import KdcliError, brief
from kdcli.jobs.outputs import RECIPE_NAME, public
from kdcli.models.checkpoint import LoadedModel
from kdcli.training.engine import EpochRecord, EpochSums, Position
from kdcli.training.trainstate import CHECKPOINT_NAME, file_digest, first_difference, read_checkpoint

AFRESH = "rerun with its inputs, or start afresh with --force"


def identity(loaded: LoadedModel | None, ref: str | None) -> str | None:
    """What must not change between a run and its resumption: the weights' contents as the run started
    (read before anything is written, so an in-place fine-tune is recognised), or the architecture."""
    if loaded is None:
        return None
    return f"sha256:{file_digest(loaded.weights_path)[:16]}" if loaded.weights_path else f"arch:{ref}"


def check_same_run(folder: Path, saved: dict, now: dict) -> None:
    """Refuse to resume with other inputs than the interrupted run's, saying what differs. folder: where the
    interrupted run's state is."""
    out = public(folder)
    labels = {"kind": "the command differs", "teacher": "the teacher's weights differ",
              "student": "the starting student differs"}
    for key, label in labels.items():
        if saved.get(key) != now.get(key):
            raise KdcliError(
                f"cannot resume {out}: {label} from the interrupted run's "
                f"({saved.get(key)} then, {now.get(key)} now); {AFRESH}"
            )
    then, current = saved.get("data_identity"), now.get("data_identity")
    if then and current and then.keys() == current.keys():  # the same kind of data: compare contents, not places
        change = data_change(then, current)
    else:
        change = None if saved.get("data") == now.get("data") else f"{saved.get('data')} then, {now.get('data')} now"
    if change:
        raise KdcliError(f"cannot resume {out}: the data differs from the interrupted run's ({change}); {AFRESH}")
    difference = first_difference(saved["recipe"], now["recipe"])
    if difference:
        raise KdcliError(
            f"cannot resume {out}: the recipe differs at {difference}; rerun with --recipe {folder / RECIPE_NAME} "
            "(the recipe it ran), or start afresh with --force"
        )


def data_change(saved: dict, now: dict) -> str | None:
    """What changed in the data between two DataSource.identity values, in words; None if nothing did."""
    if saved == now:
        return None
    if saved.get("synthetic") != now.get("synthetic"):
        return f"synthetic {saved.get('synthetic')} then, {now.get('synthetic')} now"
    before, after = saved.get("classes") or [], now.get("classes") or []
    if before != after:
        gone, added = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        if len(gone) == len(added) == 1:
            return f"class '{gone[0]}' is now '{added[0]}': a renamed class folder shifts the labels"
        return (f"{len(before)} classes then, {len(after)} now (gone: {', '.join(gone[:3]) or '-'}; "
                f"new: {', '.join(added[:3]) or '-'}): the labels would shift")
    if "files" in saved:  # CIFAR: a digest per batch file
        changed = sorted(k for k in {**saved["files"], **now.get("files", {})} if saved["files"].get(k) != now.get("files", {}).get(k))
        return f"CIFAR file {changed[0]} has other contents" if changed else None
    for split in ("train", "val"):
        for name in before:
            then, current = (saved.get(split) or {}).get(name), (now.get(split) or {}).get(name)
            if then == current or not then or not current:
                continue
            where = f"{split}/{name}"
            if then[0] != current[0]:
                return f"{where} held {then[0]} images then, {current[0]} now"
            if then[1] != current[1]:
                return f"{where} has other file names (a file renamed, or one added and one removed)"
            return f"an image in {where} was replaced or edited (its size or modification time changed)"
    return None


def open_resume(folder: Path) -> tuple[dict, dict]:
    """(tensors, state) of the interrupted run whose state is in folder, checked so that a damaged file
    (a field or tensor missing, a position outside the recipe) is a clear error rather than a crash later."""
    path = Path(folder) / CHECKPOINT_NAME
    tensors, state = read_checkpoint(path)
    problem = _state_problem(state, tensors)
    if problem:
        raise KdcliError(f"checkpoint {path} is damaged ({problem}); start afresh with --force instead of --resume")
    return tensors, state


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _state_problem(state: dict, tensors: dict) -> str | None:
    """What is wrong with a checkpoint's saved state, or None: the fields the run reads back, and the tensors
    they refer to."""
    needs = {"fingerprint": dict, "position": dict, "done": list, "history": list, "runner": dict}
    for key, kind in needs.items():
        if not isinstance(state.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    stages = state["fingerprint"].get("recipe", {}).get("stages") if isinstance(state["fingerprint"].get("recipe"), dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) and type(s.get("epochs")) is int for s in stages):
        return "the recipe it ran is missing"
    position = state["position"]
    if set(position) != _fields(Position) or not all(type(v) is int and v >= 0 for v in position.values()):
        return f"'position' is {brief(position)}, not a stage, epoch and step"
    if position["stage"] >= len(stages) or position["epoch"] > stages[position["stage"]]["epochs"]:
        return f"'position' {brief(position)} lies outside the recipe it ran"
    done = state["done"]
    if len(done) != position["stage"] or not all(isinstance(s, dict) and isinstance(s.get("history"), list) for s in done):
        return "'done' does not list the stages before the position"
    records = [*state["history"], *(r for stage in done for r in stage["history"])]
    if not all(isinstance(r, dict) and set(r) == _fields(EpochRecord) for r in records):
        return "an epoch record is malformed"
    sums = state.get("sums")
    if sums is not None and (not isinstance(sums, dict) or set(sums) != _fields(EpochSums)):
        return "'sums' is malformed"
    if "rng.torch" not in tensors or not any(k.startswith("student.") for k in tensors):
        return "the student's tensors or the RNG state are missing"
    missing = _missing_tensors(state["runner"], tensors)
    return f"tensor '{missing}' is missing" if missing else None


def _missing_tensors(obj, tensors: dict) -> str | None:
    """The first tensor a saved structure refers to ({'__tensor__': key}) that the file does not hold."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return None if obj["__tensor__"] in tensors else str(obj["__tensor__"])
        obj = list(obj.values())
    if isinstance(obj, list):
        return next((m for m in (_missing_tensors(v, tensors) for v in obj) if m), None)
    return None
