"""Schema-driven fuzzing of the job config: every field declares its bounds, and every bad value is refused with a
short ConfigError naming the field (in-process: one pydantic validation per case, no CLI process)."""

from __future__ import annotations

import copy
import math
import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel

from rr.config import JobConfig, validate_config
from rr.errors import ConfigError

MAX_MESSAGE = 700  # characters: a refusal is a few lines, whatever the value was
SOURCE = "fuzz.yaml"

# Settings a field's in-bounds values need from other fields (cross-field rules, tested in test_config.py).
BASES = {
    ("compute",): {"compute": {"executor": "ray"}},  # replica and worker counts need the ray executor
    ("task", "toxicity"): {"task": {"name": "toxicity", "samples_per_prompt": 1}},  # temperature 0 needs 1 sample
    ("compare", "rmu", "update_layers"): {"compare": {"rmu": {"layer": 1023}}},  # update layers go up to `layer`
    # the recovery gate reads one of the relearning checkpoints: every in-bounds step is one here
    ("audit", "gates", "relearn_gate_step"): {"audit": {"relearn_steps": [1, 2, 99_999, 100_000]}},
    ("audit", "min_probe_base_hits"): {"audit": {"probe_items_per_family": 10_000}},  # at most the items asked
    ("audit", "probe_items_per_family"): {"audit": {"min_probe_base_hits": 0}},
    # the general check floor holds candidates to the validation split's own instructions
    ("release", "min_general_check_ratio"): {"task": {"name": "code", "n_general_check_validation": 40}},
}


def _strip_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(metadata) -> dict:
    found = {}
    for item in metadata:
        for name, kind in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(item, kind):
                found[name] = getattr(item, name)
    return found


def _item_type(annotation):
    """(base type, bounds) of an Annotated[...] or plain type."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        metadata = []
        for e in extra:
            metadata.extend(getattr(e, "metadata", []) or [e])
        return base, _bounds(metadata)
    return annotation, {}


def fields(model: type[BaseModel], path: tuple = ()):
    """(path, kind, info) for every leaf field, and ("model", path) for every nested model, walking the schema."""
    yield path, "model", {"model": model}
    for name, field in model.model_fields.items():
        annotation, optional = _strip_optional(field.annotation)
        where = path + (name,)
        if name == "task" and model is JobConfig:
            for member in typing.get_args(typing.get_args(field.annotation)[0]):
                tag = member.model_fields["name"].default
                yield from fields(member, where + (tag,))
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from fields(annotation, where)
            continue
        info = {"optional": optional, "field": field, "model": model}
        origin = typing.get_origin(annotation)
        if origin is list:
            item, item_bounds = _item_type(typing.get_args(annotation)[0])
            info.update(item=item, item_bounds=item_bounds,
                        max_length=next((m.max_length for m in field.metadata if isinstance(m, at.MaxLen)), None))
            yield where, "list", info
        elif annotation is bool:
            yield where, "bool", info
        elif annotation in (int, float):
            info.update(type=annotation, bounds=_bounds(field.metadata))
            yield where, "number", info
        elif origin is typing.Literal:
            yield where, "literal", info
        elif annotation in (str, Path):
            yield where, "text", info
        else:
            raise AssertionError(f"{'.'.join(where)}: a field type the fuzzer does not know ({annotation}); teach it")


def _base_for(path: tuple) -> dict:
    for prefix, base in BASES.items():
        if path[: len(prefix)] == prefix:
            return copy.deepcopy(base)
    if path[:1] == ("task",):
        return {"task": {"name": path[1]}}
    return {}


def _set(data: dict, path: tuple, value) -> dict:
    keys = [k for i, k in enumerate(path) if not (i == 1 and path[0] == "task")]  # task.<tag>.x is task.x
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return data


def _in_bounds(value, bounds: dict, integer: bool) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if integer and isinstance(value, float) and not value.is_integer():
        return False
    return (("ge" not in bounds or value >= bounds["ge"]) and ("gt" not in bounds or value > bounds["gt"])
            and ("le" not in bounds or value <= bounds["le"]) and ("lt" not in bounds or value < bounds["lt"]))


def _number_cases(bounds: dict, integer: bool) -> list:
    values = [math.nan, math.inf, -math.inf, -1, 0, 1, 10**12, 1e300, -1e300]
    for name in ("ge", "gt", "le", "lt"):
        if name in bounds:
            edge = bounds[name]
            step = 1 if integer else max(abs(edge) * 1e-6, 1e-9)
            values += [edge, edge - step, edge + step]
    return values


def cases():
    """(description, path, data, expected_accept) for every field of the schema."""
    out = []
    for path, kind, info in fields(JobConfig):
        if kind == "model":
            if path and not (len(path) == 2 and path[0] == "task"):
                for wrong in ("x", [1], 3):
                    out.append(("wrong type for a section", path, _set(_base_for(path), path, wrong), False))
            unknown = path + ("zz_unknown_key",)
            out.append(("unknown key", unknown, _set(_base_for(unknown), unknown, 1), False))
            continue
        for wrong in ({"a": 1}, [[1]]) if kind != "list" else ({"a": 1}, "x"):
            out.append(("wrong type", path, _set(_base_for(path), path, wrong), False))
        if kind == "number":
            integer = info["type"] is int
            for value in _number_cases(info["bounds"], integer):
                out.append((f"value {value!r}", path, _set(_base_for(path), path, value),
                            _in_bounds(value, info["bounds"], integer)))
            out.append(("not a number", path, _set(_base_for(path), path, "many"), False))
        elif kind == "bool":
            out.append(("not a boolean", path, _set(_base_for(path), path, "maybe"), False))
        elif kind == "literal":
            out.append(("not a choice", path, _set(_base_for(path), path, "zz-not-a-choice"), False))
        elif kind == "text":
            out.append(("a huge string", path, _set(_base_for(path), path, "y" * 100_000), False))
        elif kind == "list":
            if info["max_length"] is not None:
                default = info["field"].get_default(call_default_factory=True) or [1]
                out.append(("too many items", path, _set(_base_for(path), path, (default * 10_000)[:info["max_length"] + 1]),
                            False))
            if info["item"] in (int, float):
                for value in _number_cases(info["item_bounds"], info["item"] is int):
                    out.append((f"item {value!r}", path, _set(_base_for(path), path, [value]),
                                _in_bounds(value, info["item_bounds"], info["item"] is int)))
    return out


def test_every_field_declares_its_bounds():
    unbounded = []
    for path, kind, info in fields(JobConfig):
        name = ".".join(path)
        if kind == "model":
            config = info["model"].model_config
            if config.get("extra") != "forbid" or config.get("allow_inf_nan") is not False \
                    or not config.get("str_max_length"):
                unbounded.append(f"{name or 'JobConfig'}: model_config needs extra=forbid, allow_inf_nan=False, "
                                 "str_max_length")
        elif kind == "number":
            bounds = info["bounds"]
            if not ({"ge", "gt"} & set(bounds) and {"le", "lt"} & set(bounds)):
                unbounded.append(f"{name}: numeric with bounds {bounds}")
        elif kind == "list":
            if info["max_length"] is None:
                unbounded.append(f"{name}: list without max_length")
            if info["item"] in (int, float) and not ({"ge", "gt"} & set(info["item_bounds"])
                                                      and {"le", "lt"} & set(info["item_bounds"])):
                unbounded.append(f"{name}: list items without bounds")
    assert unbounded == []


def test_schema_fuzz_refuses_every_bad_value_with_a_short_message_naming_the_field():
    all_cases = cases()
    assert len(all_cases) >= 150
    problems = []
    refused = accepted = 0
    for description, path, data, expected_accept in all_cases:
        name = ".".join(str(p) for p in path)
        try:
            config = validate_config(data, SOURCE)
        except ConfigError as error:
            refused += 1
            message = str(error)
            if expected_accept:
                problems.append(f"{name} {description}: in bounds but refused: {message}")
            elif name not in message or SOURCE not in message:
                problems.append(f"{name} {description}: message does not name the field: {message[:300]}")
            elif len(message) > MAX_MESSAGE:
                problems.append(f"{name} {description}: message of {len(message)} characters")
        except Exception as error:  # noqa: BLE001 - the point: anything but ConfigError is a bug
            problems.append(f"{name} {description}: {type(error).__name__} {str(error)[:200]}")
        else:
            accepted += 1
            if not expected_accept:
                problems.append(f"{name} {description}: out of bounds but accepted")
            assert isinstance(config, JobConfig)
    assert problems == []
    assert refused > accepted > 0  # most cases are bad values; the in-bounds ones do load


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("where", ["release:\n  forget_weights: [1.0, {v}]", "reveal:\n  temperature: {v}",
                                   "release:\n  lora:\n    learning_rate: {v}", "reveal:\n  ucb_lambda: {v}",
                                   "compare:\n  icu:\n    similarity_threshold: {v}",
                                   "compare:\n  finetune:\n    learning_rate: {v}"])
def test_non_finite_numbers_in_a_config_file_are_refused(tmp_path, where, value):
    from rr.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text(where.format(v=value) + "\n")
    with pytest.raises(ConfigError, match="finite number"):
        load_config(path)
