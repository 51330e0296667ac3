"""Pipeline specs: YAML validated by pydantic models built from the registries.

A spec names an archive and stages; each stage entry is the stage kind's ``Params``
plus the common keys ``kind``, ``inputs`` and ``description`` (a discriminated union
on ``kind``). Errors read ``file:line: stages.sources.aperture.scale: message``.

Config precedence, in one place (:func:`load_spec` and :func:`lakepipe.config.resolve_lake`):
built-in defaults < spec file < ``LAKEPIPE_*`` environment (deployment knobs) < ``--set``.
"""

from __future__ import annotations

import functools
import graphlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lakepipe.archives.base import archives
from lakepipe.errors import InputNotFoundError, SpecError, UserError
from lakepipe.registry import did_you_mean
from lakepipe.resources import pipelines_dir
from lakepipe.stages.base import Stage, stages

COMMON_STAGE_KEYS = ("kind", "inputs", "description")


class ExpectRange(BaseModel):
    """A numeric expectation ``{min: …, max: …}`` (either bound optional)."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class Diagnostic(BaseModel):
    """A named SQL check: the query's single value must meet ``expect``."""

    model_config = ConfigDict(extra="forbid")
    sql: str = Field(description="SQL returning one value (first column of first row)")
    expect: float | ExpectRange = Field(0, description="Exact value, or {min, max}")
    description: str = ""


def _stage_model(kind: str, cls: type[Stage]) -> type[BaseModel]:
    doc = (cls.__doc__ or "").strip().splitlines()
    return create_model(
        f"{cls.__name__}Spec",
        __base__=cls.Params,
        __doc__=doc[0] if doc else None,
        kind=(Literal[kind], Field(description="Stage kind")),
        inputs=(list[str], Field(default_factory=list, description="Upstream stages")),
        description=(str | None, None),
    )


def _archive_model(kind: str, cls: type) -> type[BaseModel]:
    return create_model(
        f"{cls.__name__}Spec",
        __base__=cls.Params,
        kind=(Literal[kind], Field(description="Archive kind")),
    )


def _union(models: list[type[BaseModel]]) -> Any:
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="kind")]  # noqa: UP007


@functools.cache
def spec_model() -> type[BaseModel]:
    """The pydantic model of a whole pipeline file, from the registered kinds."""
    stage_models = [_stage_model(k, c) for k, c in stages.items()]
    archive_models = [_archive_model(k, c) for k, c in archives.items()]
    fields: dict[str, Any] = {
        "name": (str, Field(description="Pipeline name", pattern=r"^[A-Za-z0-9_.-]+$")),
        "description": (str, ""),
        "lake": (str | None, Field(None, description="Lake root (default lake/<name>)")),
        "stages": (
            dict[str, _union(stage_models)] if stage_models else dict[str, Any],
            Field(description="Stages by name"),
        ),
        "diagnostics": (dict[str, Diagnostic], Field(default_factory=dict)),
    }
    if archive_models:
        fields["archive"] = (_union(archive_models) | None, None)
    else:
        fields["archive"] = (dict[str, Any] | None, None)
    return create_model(
        "PipelineSpec",
        __config__=ConfigDict(extra="forbid", title="lakepipe pipeline"),
        __doc__="A lakepipe pipeline spec.",
        **fields,
    )


def json_schema() -> dict[str, Any]:
    """JSON schema of pipeline files (``schemas/pipeline.schema.json``)."""
    schema = spec_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# -- loading ------------------------------------------------------------------------------


@dataclass
class LoadedSpec:
    """A validated spec with where it came from."""

    model: Any
    raw: dict[str, Any]
    path: Path | None
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def spec_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def stage_order(self) -> list[str]:
        """Stage names in dependency order (validated acyclic at load)."""
        return _topo_order(self.model.stages)

    def resolved_yaml(self) -> str:
        """The spec after defaults and overrides, as recorded with every run."""
        return yaml.safe_dump(self.model.model_dump(mode="json"), sort_keys=False)


def find_spec(name_or_path: str | Path) -> Path:
    """A spec file path from a path or a named pipeline (``demo``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml"):
        raise InputNotFoundError(f"spec file {p} not found; check the path")
    named = pipelines_dir() / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    names = list_pipelines()
    raise InputNotFoundError(
        f"no pipeline named {str(name_or_path)!r} and no such file.{did_you_mean(str(p), names)} "
        f"Named pipelines: {', '.join(names) or '(none)'}; or pass a path to a .yaml file."
    )


def list_pipelines() -> list[str]:
    return sorted(p.stem for p in pipelines_dir().glob("*.yaml"))


def load_spec(
    name_or_path: str | Path | dict[str, Any], overrides: tuple[str, ...] | list[str] = ()
) -> LoadedSpec:
    """Parse, override (``--set a.b=c``) and validate a spec; errors are :class:`SpecError`."""
    if isinstance(name_or_path, dict):
        path, text, raw, lines = None, None, name_or_path, {}
    else:
        path = find_spec(name_or_path)
        text = path.read_text()
        raw, lines = _parse_yaml(text, path)
    label = str(path) if path else "<spec>"
    raw = _apply_overrides(raw, overrides, label)
    try:
        model = spec_model().model_validate(raw)
    except ValidationError as exc:
        # union members report the same problem once each: say it once
        errors = list(
            dict.fromkeys(_format_error(e, raw, lines, label, overrides) for e in exc.errors())
        )
        raise SpecError(f"{label}: invalid spec\n" + "\n".join(errors), errors) from None
    _check_graph(model, label, lines)
    return LoadedSpec(model=model, raw=raw, path=path, overrides=tuple(overrides))


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise SpecError(
            f"{path}:{line}: YAML syntax error: {exc.problem or exc.context}; "
            "fix the YAML (indentation, colons, quotes) at that line"
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}:1: a spec must be a YAML mapping with name, stages, …")
    lines: dict[tuple[str, ...], int] = {}
    duplicates: list[str] = []
    _collect_lines(node, (), lines, duplicates, str(path))
    if duplicates:
        raise SpecError(f"{path}: invalid spec\n" + "\n".join(duplicates), duplicates)
    return raw, lines


def _collect_lines(
    node: yaml.Node,
    path: tuple[str, ...],
    out: dict[tuple[str, ...], int],
    duplicates: list[str],
    label: str,
) -> None:
    """Line of every key path; a key given twice in one mapping is an error (YAML keeps
    the last one silently, so a second ``exposures:`` stage would replace the first)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, str(k.value))
            line = k.start_mark.line + 1
            if key in out and k.value != "<<":
                duplicates.append(
                    f"{label}:{line}: {'.'.join(key)}: duplicate key (first at line "
                    f"{out[key]}); rename or remove one"
                )
                continue
            out[key] = line
            _collect_lines(v, key, out, duplicates, label)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = (*path, str(i))
            out[key] = v.start_mark.line + 1
            _collect_lines(v, key, out, duplicates, label)


def parse_option_value(
    item: str, value: str, *, flag: str, example: str, error: type[UserError] = UserError
) -> Any:
    """A command-line ``KEY=VALUE``'s value as YAML (``5`` → 5, ``[a, b]`` → a list);
    invalid YAML is a user error naming the option and showing ``example``."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(
            f"{flag} {item!r}: the value is not valid YAML ({problem}); quote it or "
            f"complete it, e.g. {example}"
        ) from None


def _apply_overrides(raw: dict[str, Any], overrides: Any, label: str) -> dict[str, Any]:
    raw = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. stages.x.param=2.5")
        keypath, value = item.split("=", 1)
        parts = keypath.strip().split(".")
        node = raw
        for part in parts[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {item!r}: {part!r} is not a mapping in {label}")
            node = nxt
        parsed = (
            parse_option_value(
                item,
                value,
                flag="--set",
                example="--set 'stages.exposures.where.filters=[zg, zr]'",
                error=SpecError,
            )
            if value.strip()
            else ""
        )
        # the same treatment as values read from the file (dates become ISO strings)
        node[parts[-1]] = json.loads(json.dumps(parsed, default=str))
    return raw


def _format_error(
    err: Any, raw: dict[str, Any], lines: dict[tuple[str, ...], int], label: str, overrides: Any
) -> str:
    loc = _clean_loc(err["loc"], raw)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_for(loc, lines)
    where = f"{label}:{line}" if line else label
    overridden = _blamed_override(loc, dotted, lines, overrides)
    if overridden:
        where = f"--set {overridden}"
    etype = err["type"]
    if etype == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        hint = did_you_mean(str(loc[-1]), allowed)
        msg = f"unknown key {loc[-1]!r}.{hint} Allowed keys: {', '.join(allowed)}."
    elif etype == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag = str(ctx.get("tag", ""))
        names = _kinds_for(loc)
        msg = f"unknown kind {tag!r}.{did_you_mean(tag, names)} Available: {', '.join(names)}."
        dotted = f"{dotted}.kind" if dotted != "(top level)" else "kind"
        line = _line_for((*loc, "kind"), lines)
        where = f"{label}:{line}" if line else label
    elif etype == "union_tag_not_found":
        msg = f"missing 'kind'. Available kinds: {', '.join(_kinds_for(loc))}."
    elif etype == "literal_error":  # every closed choice of every kind: did-you-mean
        options = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        field = next((str(p) for p in reversed(loc) if isinstance(p, str)), "value")
        noun = field[:-1] if field.endswith("s") and len(field) > 3 else field
        got = err.get("input")
        msg = (
            f"unknown {noun} {got!r}.{did_you_mean(str(got), options)} "
            f"Available: {', '.join(options)}."
        )
    elif etype == "missing":
        msg = "required key is missing"
    elif etype in ("model_type", "model_attributes_type", "dict_type"):
        got = err.get("input")
        msg = f"expected a mapping of keys (got {got!r})"
    else:
        got = err.get("input")
        got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]}{got_s}"
    return f"{where}: {dotted}: {msg}"


def _blamed_override(
    loc: tuple[Any, ...], dotted: str, lines: dict[tuple[str, ...], int], overrides: Any
) -> str | None:
    """The ``--set`` item an error at ``loc`` comes from, if any: one that set this key
    or a mapping above it, or one that created this key (absent from the file)."""
    in_file = tuple(str(p) for p in loc) in lines
    for item in overrides:
        keypath = item.split("=", 1)[0].strip()
        if keypath == dotted or dotted.startswith(keypath + "."):
            return item
        if keypath.startswith(dotted + ".") and not in_file:
            return item
    return None


_ABSENT = object()
# how pydantic names union members in error locations: class names, and core-schema
# tags such as ``function-after[_check(), Model]``, ``list[str]``, ``literal['a']``
_MEMBER_TAG = re.compile(r"^[A-Z]|[\[\]()]|^[a-z]+(-[a-z]+)+$")


def _clean_loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[Any, ...]:
    """Drop what pydantic inserts into locations that is not a key of the YAML: the
    discriminator tags of kinds and the names of union members (``SkyPoint``,
    ``function-after[_check_region(), ExposureQuery]``, ``float``…)."""
    out: list[Any] = []
    node: Any = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part not in node:
            if node.get("kind") == part:
                continue
            if isinstance(part, str) and (
                part.endswith("Spec") or not last or _MEMBER_TAG.search(part)
            ):
                continue  # a missing key is always the last part; a member tag is not a key
        elif node is not _ABSENT and not isinstance(node, dict) and isinstance(part, str):
            continue  # a scalar or a list has no string keys: a union member's name
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part, _ABSENT)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = _ABSENT
    return tuple(out)


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[str, ...], int]) -> int:
    key = tuple(str(p) for p in loc)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return 0


def _kinds_for(loc: tuple[Any, ...]) -> list[str]:
    if loc and loc[0] == "archive":
        return archives.names()
    return stages.names()


def _allowed_keys(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """Field names of the model at ``loc`` (following kinds through unions)."""
    model: Any = spec_model()
    node: Any = raw
    for part in loc:
        model = _field_type(model, part, node)
        node = node.get(part) if isinstance(node, dict) else None
        if model is None:
            return []
        model = _pick_model(model, node)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _field_type(model: Any, part: Any, node: Any) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(str(part))
        return field.annotation if field else None
    origin = typing.get_origin(model)
    if origin is dict:
        return typing.get_args(model)[1]
    if origin is list:
        return typing.get_args(model)[0]
    return None


def _pick_model(tp: Any, node: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _pick_model(typing.get_args(tp)[0], node)
    if origin is Union or origin is types.UnionType:
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        kind = node.get("kind") if isinstance(node, dict) else None
        for m in members:
            inner = _pick_model(m, node)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                f = inner.model_fields.get("kind")
                if f is None or kind is None or kind in typing.get_args(f.annotation):
                    return inner
        return members[0] if members else None
    return tp


# -- graph --------------------------------------------------------------------------------


def _topo_order(stage_specs: dict[str, Any]) -> list[str]:
    graph = {name: set(s.inputs) for name, s in stage_specs.items()}
    return list(graphlib.TopologicalSorter(graph).static_order())


def stage_class(stage_spec: Any) -> type[Stage]:
    return stages.get(stage_spec.kind)


def writers(model: Any) -> dict[str, str]:
    """Table name → stage name that writes it."""
    out: dict[str, str] = {}
    for name, s in model.stages.items():
        for table in stage_class(s).writes:
            out[table] = name
    return out


def _check_graph(model: Any, label: str, lines: dict[tuple[str, ...], int]) -> None:
    errors = []
    names = list(model.stages)
    table_writer: dict[str, str] = {}
    for name, s in model.stages.items():
        for table in stage_class(s).writes:
            if table in table_writer:
                line = _line_for(("stages", name), lines)
                errors.append(
                    f"{label}:{line}: stages.{name}: table {table!r} is already written by stage "
                    f"{table_writer[table]!r}; a table has one writer per pipeline"
                )
            table_writer[table] = name
    for name, s in model.stages.items():
        for i, inp in enumerate(s.inputs):
            if inp not in model.stages:
                line = _line_for(("stages", name, "inputs", str(i)), lines)
                errors.append(
                    f"{label}:{line}: stages.{name}.inputs: unknown stage {inp!r}."
                    f"{did_you_mean(inp, names)} Stages in this spec: {', '.join(names)}."
                )
        provided = {
            t
            for inp in s.inputs
            if inp in model.stages
            for t in stage_class(model.stages[inp]).writes
        }
        for table in stage_class(s).reads:
            if table not in provided:
                line = _line_for(("stages", name), lines)
                hint = table_writer.get(table)
                fix = (
                    f"add `inputs: [{hint}]`"
                    if hint
                    else f"add a stage that writes {table!r} and list it in inputs"
                )
                errors.append(
                    f"{label}:{line}: stages.{name}: kind {s.kind!r} reads table {table!r}, "
                    f"which none of its inputs writes; {fix}"
                )
    if errors:
        raise SpecError(f"{label}: invalid spec\n" + "\n".join(errors), errors)
    try:
        _topo_order(model.stages)
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise SpecError(
            f"{label}: stages form a cycle: {cycle}; remove one of these inputs",
            [f"{label}: stages form a cycle: {cycle}"],
        ) from None
