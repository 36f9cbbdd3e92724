"""A run file of the user's own: `orchestrator train run.yaml [key=value ...]` (or `--config run.yaml`).

The file is an experiment in our schema (the keys of hydra_conf/experiment/*.yaml; `# @package _global_` is not
needed), composed over our defaults. It is read here, checked against the schema (an unknown key or a section
given a value is refused with file:line) and turned into Hydra overrides placed before the command line's, so that
the command line wins, and so that everything downstream sees one plain list of overrides: a sweep's trials (child
processes that run `python -m orchestrator <overrides>`), launcher=rayjob's entrypoint (the pods do not have the
file: they get its keys) and .hydra/overrides.yaml of the run directory (the run can be repeated without the file).

    defaults:                      # config choices, as in an experiment file
      - override /model: tiny_llama
    model: {path: ..., task: causal_lm}
    data: {path: my.jsonl}         # relative paths: to the directory orchestrator runs in, as on the command line
    trainer: {epochs: 2}
    hydra: {sweeper: {params: {optim.lr: 1e-5,3e-5}}}   # a sweep, as in hydra_conf/sweep/*.yaml

Composition errors that name a key set in the file are reported with the file's line (locate()).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from orchestrator.errors import UserError

# the file in use in this process and where each of its keys is: key → line (set by expand())
ACTIVE: Dict[str, Any] = {"file": None, "lines": {}}


def quote(text: str) -> str:
    """A string as Hydra's override grammar reads it back unchanged, and as a string (never a number or null):
    single-quoted; quotes escaped, and the backslashes before a quote or at the end doubled."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def render(value: Any) -> str:
    """A YAML value as an override's value: null, true/false, numbers, quoted strings, [lists], {mappings}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)  # inf, -inf, nan
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z_/.][\w\-./:@%+~]*", value) and _reads_back(value) else quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    return quote(str(value))


def _reads_back(text: str) -> bool:
    """Whether `key=<text>` unquoted gives the string back (not a bool, null, number or interpolation)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"k={text}").value() == text
    except Exception:  # noqa: BLE001 - any parse error: quote it
        return False


def _yaml_loader():
    """OmegaConf's YAML loader (1e-5 is a float, as in our config files; duplicate keys are refused)."""
    try:
        from omegaconf._utils import get_yaml_loader

        return get_yaml_loader()
    except ImportError:  # pragma: no cover - another OmegaConf
        return yaml.SafeLoader


def read(path: Path) -> Tuple[dict, Dict[str, int]]:
    """The file's mapping and the line of every key (dotted, 'defaults.<group>' for config choices)."""
    if not path.is_file():
        raise UserError(f"run file {path} does not exist" if not path.exists() else f"run file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    loader = _yaml_loader()
    try:
        data = yaml.load(text, Loader=loader)
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        data, root = {}, None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run file is a mapping of keys (model:, data:, trainer: ...), not a "
                        f"{type(data).__name__}")
    lines: Dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            if key == "defaults" and isinstance(value_node, yaml.SequenceNode):
                for item in value_node.value:
                    if isinstance(item, yaml.MappingNode):
                        for group_node, _ in item.value:
                            group = _group(str(group_node.value))[0]
                            lines[f"defaults.{group}"] = group_node.start_mark.line + 1
            else:
                walk(value_node, key + ".")

    walk(root, "")
    return data, lines


def _group(key: str) -> Tuple[str, bool]:
    """'override /model' → ('model', True)."""
    override = key.startswith("override ")
    return key.removeprefix("override ").strip().lstrip("/"), override


def primary_groups() -> List[str]:
    """Groups that config.yaml's defaults list already chooses (model, data, logger): set with group=choice; any
    other (experiment, sweep) is added with +group=choice."""
    from orchestrator.package_files import package_dir

    config = yaml.safe_load((package_dir("hydra_conf") / "config.yaml").read_text(encoding="utf-8")) or {}
    groups = []
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            groups += [_group(k)[0] for k in entry]
    return groups


def to_overrides(path: Path, data: dict, lines: Dict[str, int]) -> List[Tuple[str, str]]:
    """(key, override) for every setting of the file, config choices first; refuses keys the schema lacks."""
    from omegaconf import DictConfig, OmegaConf

    from orchestrator.config import RunConfig

    def at(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    out: List[Tuple[str, str]] = []
    primary = primary_groups()
    defaults = data.get("defaults", [])
    if not isinstance(defaults, list):
        raise UserError(f"{at('defaults')}: defaults: expected a list, e.g. [override /model: tiny_llama]")
    for entry in defaults:
        if entry == "_self_":
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{at('defaults')}: defaults: {entry!r} is not a config choice; write one "
                            "'- override /GROUP: OPTION' per line, e.g. '- override /model: tiny_llama'")
        (key, choice), = entry.items()
        group, _ = _group(str(key))
        if "@" in group:
            raise UserError(f"{at('defaults.' + group)}: defaults: {key}: packages (@) are not supported here")
        prefix = "" if group in primary else "+"
        out.append((group, f"{prefix}{group}={'null' if choice is None else choice}"))

    schema = OmegaConf.structured(RunConfig)

    def structured(node: Any, key: str) -> bool:
        return dataclasses.is_dataclass(OmegaConf.get_type(node, key))

    def walk(node: DictConfig, values: dict, prefix: str) -> None:
        for key, value in values.items():
            full = f"{prefix}{key}"
            if not isinstance(key, str) or key not in node:
                allowed = ", ".join(sorted(node.keys()))
                raise UserError(f"{at(full)}: {full}: no such key; allowed keys here: {allowed}")
            if structured(node, key):
                if isinstance(value, dict):
                    walk(node[key], value, full + ".")
                    continue
                raise UserError(f"{at(full)}: {full}: expected a mapping of {full}.* keys, got {value!r}"
                                + (f" (a config name goes in the defaults list: '- override /{full}: {value}')"
                                   if isinstance(value, str) and full in primary else ""))
            if isinstance(value, dict) and value and OmegaConf.get_type(node, key) is dict:
                free(value, full)  # a Dict field (k8s.env, model.config_overrides): merged key by key, as YAML
                continue
            out.append((full, f"{full}={render(value)}"))

    def free(values: dict, prefix: str) -> None:
        for key, value in values.items():
            full = f"{prefix}.{key}"
            if isinstance(value, dict) and value:
                free(value, full)
            else:
                out.append((full, f"++{full}={render(value)}"))

    body = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
    walk(schema, body, "")
    hydra = data.get("hydra") or {}
    if not isinstance(hydra, dict):
        raise UserError(f"{at('hydra')}: hydra: expected a mapping (e.g. sweeper: params: ...)")
    flat: List[Tuple[str, Any]] = []

    def flatten(values: dict, prefix: str) -> None:
        for key, value in values.items():
            full = f"{prefix}.{key}"
            if full == "hydra.mode" and str(value) == "MULTIRUN":
                out.append(("-m", "-m"))  # a sweep: Hydra reads -m before it parses the swept values below
            elif full == "hydra.sweeper.params" and isinstance(value, dict):
                for swept, choices in value.items():  # `key: 1e-5,3e-5`: the sweep's own syntax, as on the command line
                    text = ",".join(map(_plain, choices)) if isinstance(choices, list) else _plain(choices)
                    out.append((str(swept), f"{swept}={text}"))
                if ("-m", "-m") not in out:
                    out.append(("-m", "-m"))
            elif isinstance(value, dict) and value:
                flatten(value, full)
            else:
                flat.append((full, value))

    flatten(hydra, "hydra")
    out += [(key, f"{key}={render(value)}") for key, value in flat]
    return out


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else render(value)


def swept_keys(choices: Sequence[str]) -> List[str]:
    """The keys the sweeps chosen (+sweep=NAME) sweep: the file's value for one of them would win over the sweep."""
    from orchestrator.package_files import package_dir

    keys: List[str] = []
    for choice in choices:
        sweep = package_dir("hydra_conf") / "sweep" / f"{choice}.yaml"
        if sweep.is_file():
            params = ((yaml.safe_load(sweep.read_text(encoding="utf-8")) or {}).get("hydra") or {})
            keys += list(((params.get("sweeper") or {}).get("params") or {}).keys())
    return keys


def expand(file: str, args: Sequence[str]) -> List[str]:
    """The run file's overrides (those the command line does not set), then the command line's arguments."""
    from launch.sweep_summary import override_key

    path = Path(file)
    data, lines = read(path)
    settings = to_overrides(path, data, lines)
    if not any(key == "name" for key, _ in settings):
        settings.append(("name", f"name={render(path.stem)}"))  # runs/<the file's name>/<date_time>/
    given = {override_key(a) for a in args if not a.startswith("-")}
    sweeps = [o.split("=", 1)[1] for k, o in settings if k == "sweep"]
    sweeps += [a.split("=", 1)[1] for a in args if override_key(a) == "sweep" and "=" in a]
    dropped = given | set(swept_keys(sweeps))
    if any(a in ("-m", "--multirun") for a in args):
        dropped.add("-m")
    kept = [(key, override) for key, override in settings if key not in dropped or key == "sweep"]
    ACTIVE.update(file=str(path), lines={key: lines.get(key, lines.get(f"defaults.{key}")) for key, _ in kept})
    flags = [override for key, override in kept if key == "-m"]  # first: Hydra's parser wants flags before overrides
    return flags + [override for key, override in kept if key != "-m"] + list(args)


def locate(message: str) -> str:
    """An error message that starts with a key the run file set, prefixed with the file and that key's line."""
    if not ACTIVE["file"]:
        return message
    match = re.match(r"\+*([A-Za-z_][\w.]*)(?=[=: ])", message)
    if not match or match.group(1) not in ACTIVE["lines"] or message.startswith(ACTIVE["file"]):
        return message
    line = ACTIVE["lines"][match.group(1)]
    return f"{ACTIVE['file']}{f':{line}' if line else ''}: {message}"


def source_of(key: str) -> Optional[str]:
    """'in run.yaml' where the run file set `key`, else None."""
    return f"in {ACTIVE['file']}" if ACTIVE["file"] and key in ACTIVE["lines"] else None
