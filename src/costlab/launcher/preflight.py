"""Checks on the command line that Hydra would otherwise report as a multi-line traceback."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from costlab import CONF_DIR
from costlab.schema import ConfigError


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/ as run.py does, without launching anything (tests, benchmarks, notebooks), or, inside run.py
    (Hydra initialized), with its config search path."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides or [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def values(o: Override) -> list[str]:
    """The values an override names: one, each of a choice or range sweep, the lower end of an interval
    (a search sweeper's ``interval(a, b)``, which cannot be enumerated)."""
    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    if o.value_type == ValueType.INTERVAL_SWEEP:
        return [str(o.value().start)]
    return list(o.sweep_string_iterator())


GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
SWEEP_FUNCTIONS = ("choice(", "range(", "interval(", "glob(", "tag(", "sort(", "shuffle(", "int(", "float(", "str(",
                   "bool(")


def quoted(key: str, value: str) -> str | None:
    """``key="value"`` (or single quotes), as Hydra's grammar reads a string holding any character; None
    when no quoting gives ``value`` back."""
    for q in ('"', "'"):
        if q in value:
            continue
        text = f"{key}={q}{value}{q}"
        try:
            if OverridesParser.create().parse_overrides([text])[0].value() == value:
                return text
        except OverrideParseException:
            continue
    return None


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse, refusing the one override it cannot read (Hydra's own error names the whole list)."""
    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException as e:
        for text in overrides:
            try:
                parser.parse_overrides([text])
            except OverrideParseException as alone:
                key, _, value = text.partition("=")
                hint = None if value.startswith(('"', "'", *SWEEP_FUNCTIONS)) else quoted(key, value)
                if hint is not None:
                    why = f"Hydra cannot parse this value; quote it: {shlex.quote(hint)}"
                else:
                    why = f"Hydra cannot parse this value ({str(alone).splitlines()[0]}; see {GRAMMAR})"
                raise ConfigError(key, value, why) from None
        raise ConfigError("override", " ".join(overrides), str(e).splitlines()[0]) from None


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse ``group=option`` for an option that does not exist (sweeps included)."""
    parsed = parse_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    for o in parsed:
        group = o.key_or_group.lstrip("+~")
        if o.package is not None or not (conf_dir / group).is_dir() or o.is_delete():
            continue
        known = options(group, conf_dir)
        for value in values(o):
            if value not in known:
                raise ConfigError(group, value, f"unknown option; choose one of {', '.join(known)}")


def first_values(argv: list[str]) -> list[tuple[Override, str]]:
    """Each override of the command line (not Hydra's own) with the first value it names: a sweep's first job."""
    parsed = parse_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    return [(o, f"{o.get_key_element()}={values(o)[0]}") for o in parsed
            if not o.key_or_group.startswith("hydra") and o.package is None]


def tracking_uri(argv: list[str]) -> str:
    """The MLflow store the command line's (first) job logs to."""
    return str(compose_config([text for _, text in first_values(argv)]).tracking.uri)


def check_keys(argv: list[str]) -> None:
    """Refuse ``section.key=value`` for a key the composed config does not have (Hydra's own refusal is
    several lines). A sweep is checked with the first value of each swept key."""
    first = first_values(argv)
    if not any(o.type == OverrideType.CHANGE and "." in o.key_or_group for o, _ in first):
        return  # only a plain dotted override can name a missing key: spare every other start a compose
    try:
        compose_config([text for _, text in first])
    except ConfigCompositionException as e:
        for o, _ in first:  # the one Hydra could not apply
            if o.type != OverrideType.CHANGE or "." not in o.key_or_group:
                continue
            section, _, key = o.key_or_group.rpartition(".")
            others = [t for p, t in first if p is not o]
            try:
                node = compose_config(others)
                node = OmegaConf.select(node, section)
            except ConfigCompositionException:
                continue
            if isinstance(node, DictConfig) and key not in node:
                choice = f"{section}={node.name}" if "name" in node else section
                raise ConfigError(o.key_or_group, values(o)[0], f"no such key in {choice} (it has "
                                  f"{', '.join(str(k) for k in node if k != '_target_')})") from None
        raise ConfigError("override", " ".join(t for _, t in first), str(e).strip().splitlines()[0]) from None


# a launcher besides Hydra's own that runs a sweep's jobs on this machine, where this process can check them
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def grid_jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of the jobs a grid sweep will run (Hydra's basic sweeper: its ``params``, a preset's
    included, then the command line's overrides, split as the sweeper splits them), when its launcher runs
    them on this machine; [] for a single run, a search (Optuna's trials are proposed as it goes) or a
    launcher that runs the jobs elsewhere (submitit: each job is checked where it runs)."""
    task = [a for a in argv if not a.startswith("-") and "=" in a]
    parsed = list(zip(parse_overrides(task), task, strict=True))
    own = [text for o, text in parsed if o.key_or_group.startswith("hydra")]
    mine = [text for o, text in parsed if not o.key_or_group.startswith("hydra")]
    # a sweep is asked for by -m, or set by a preset (only the experiment group's options set hydra's keys) or by
    # hydra.mode itself: a single run spares itself the composition
    keys = {o.key_or_group.lstrip("+~") for o, _ in parsed}
    if not ({"-m", "--multirun"} & set(argv) or {"experiment", "hydra.mode"} & keys):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.types import RunMode

    from costlab.launcher.objective import BASIC_SWEEPER
    from costlab.launcher.torchrun import BASIC_LAUNCHER

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hc = compose(config_name="config", overrides=[text for _, text in first_values(argv)] + own,
                         return_hydra_config=True).hydra
    except ConfigCompositionException as e:  # one of Hydra's own overrides (its sweeper, its launcher)
        raise ConfigError("override", " ".join(own), str(e).strip().splitlines()[0]) from None
    multirun = {"-m", "--multirun"} & set(argv) or hc.mode == RunMode.MULTIRUN
    local = hc.launcher.get("_target_") in (BASIC_LAUNCHER, JOBLIB_LAUNCHER)
    if not multirun or hc.sweeper.get("_target_") != BASIC_SWEEPER or not local:
        return []
    params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items()]
    swept = parse_overrides(params + mine)
    for o, text in zip(swept, params + mine, strict=True):
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ConfigError(o.get_key_element(), text.partition("=")[2], "a grid sweep (Hydra's basic sweeper) runs "
                              "a list, range or choice of values; an interval needs a search: hydra/sweeper=optuna")
    return BasicSweeper.split_arguments(swept, None)[0]


def check_grid(argv: list[str], check_job: Callable[[DictConfig, bool], object]) -> None:
    """Every job of a grid sweep checked as the job itself will check it (``check_job``:
    ``costlab.launcher.job.check_job``), before the first starts: a combination this machine cannot run is
    refused in one line, not after the jobs before it have run. (The first job's keys: :func:`check_keys`.)"""
    jobs = grid_jobs(argv)
    for i, job in enumerate(jobs if len(jobs) > 1 else [], 1):
        try:
            cfg = compose_config(job)
        except ConfigCompositionException as e:
            raise ConfigError("override", " ".join(job), str(e).strip().splitlines()[0]) from None
        try:
            check_job(cfg, cfg.get("mode", "train") == "plan")
        except ConfigError as e:
            raise ConfigError(e.key, e.value, f"{e.why} (job {i} of the sweep's {len(jobs)}; none was started)") \
                from None


def preflight(argv: list[str] | None = None, check_job: Callable[[DictConfig, bool], object] | None = None) -> None:
    """The command line's checks, one line and exit 2 for a refusal; with ``check_job``, a grid sweep's jobs
    too (:func:`check_grid`)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_group_choices(argv)
        check_keys(argv)
        if check_job is not None:
            check_grid(argv, check_job)
    except ConfigError as e:
        print(f"costlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
