"""The comparison behind a report: runs read from MLflow, the baseline, ratios, labels and Pareto fronts.
Plain data, no drawing and no writing (``costlab.report`` does those)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from costlab import status, tracking
from costlab.measure.names import (
    COMPRESSES_IN_TRAINING,
    EVAL_LOSS,
    INFER_LATENCY,
    MEM_GRADS,
    MEM_OPTIMIZER,
    MEM_PARAMS,
    MEM_PEAK,
    MODEL_SIZE,
    PERF_TOKENS_PER_S,
    PLAN_HOURS,
    PLAN_MARGIN,
    PLAN_MEMORY,
    PLAN_MFU,
    PLAN_TOKENS_PER_S,
    PLAN_USD,
    SERVE_TARGET_TOKENS_PER_S,
    SERVE_USD,
    STEP_FAMILIES,
)
from costlab.schema import BEFORE_GROUPS

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

LEVERS = ("model", "parallelism", "precision", "finetune", "optimizer", "pruning", "quantization", "world_size",
          "device")
UNTAGGED = {group: node["name"] for group, node in BEFORE_GROUPS.items()}  # runs made before these groups
COMPRESSION = ("pruning", "quantization")
DEFAULT_BASELINE = {"parallelism": "single", "precision": "fp32", "finetune": "full", "optimizer": "adamw",
                    "pruning": "none", "quantization": "none"}
STATE = "state_bytes_per_rank"  # parameters + gradients + optimizer state held by one rank
SPEED_TOLERANCE = 0.03  # timings within 3 % of the baseline count as unchanged (run-to-run noise)
BYTES_TOLERANCE = 0.01


@dataclass
class RunRecord:
    """One MLflow run as the report sees it."""

    run_id: str
    name: str
    status: str
    levers: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int = 0
    label: str = ""
    compresses_in_training: bool = False  # its compression option acted during training (the run's tag)
    plan: bool = False  # a ``mode=plan`` run: predicted figures for the card it names, nothing trained

    @property
    def finished(self) -> bool:
        return self.status == status.FINISHED

    def get(self, key: str) -> float | None:
        if key == STATE:
            parts = [self.metrics[k] for k in (MEM_PARAMS, MEM_GRADS, MEM_OPTIMIZER) if k in self.metrics]
            return sum(parts) if parts else None
        return self.metrics.get(key)


@dataclass
class Report:
    rows: list[RunRecord]
    baseline: RunRecord
    columns: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)  # one dict per row, keys = columns
    others: list[str] = field(default_factory=list)  # the extra summary metrics of the table
    summary: str = ""
    main: list[str] = field(default_factory=lambda: list(MAIN_TABLE))  # the main table's columns


# --------------------------------------------------------------------------- reading MLflow


def record(run: Any) -> RunRecord:
    tags = run.data.tags
    plan = tags.get("mode") == "plan"
    levers = {k: tags.get(k, UNTAGGED.get(k, "")) for k in LEVERS}
    if plan:  # a plan ran on this machine's CPU, for the card it names
        levers["device"] = tags.get("hardware", levers["device"])
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        plan=plan,
        levers=levers,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        start_time=run.info.start_time or 0,
        compresses_in_training=tags.get(COMPRESSES_IN_TRAINING) == "true",
    )


def load_runs(c: MlflowClient, *, parent: str | None = None, experiment: str | None = None,
              run_ids: list[str] | None = None) -> list[RunRecord]:
    """The job runs to compare, oldest first: a sweep parent's children, an experiment's job runs
    (sweep parents left out), or the runs named. A run id the store does not hold is a ValueError naming it."""
    for key, ids in (("--parent", [parent] if parent else []), ("--runs", run_ids or [])):
        missing = [i for i in ids if not _exists(c, i)]
        if missing:
            raise ValueError(f"{key} {' '.join(missing)}: no such run in this store")
    if parent:
        runs = tracking.child_runs(c, parent)
    elif experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no experiment named {experiment!r}")
        runs = [r for r in _all_runs(c, exp.experiment_id) if r.data.tags.get(tracking.ROLE_TAG) != tracking.SWEEP_ROLE]
    else:
        runs = [c.get_run(i) for i in run_ids or []]
    if not runs:
        raise ValueError("no runs to report")
    return sorted(map(record, runs), key=lambda r: r.start_time)


def swept_keys(c: MlflowClient, parent: str) -> list[str]:
    """The keys a sweep varied, as its parent run recorded them."""
    return [k for k in c.get_run(parent).data.tags.get(tracking.SWEPT_TAG, "").split(",") if k]


def _exists(c: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _all_runs(c: MlflowClient, experiment_id: str) -> list:
    return list(tracking.pages(c.search_runs, [experiment_id]))


# --------------------------------------------------------------------------- the comparison


class BaselineNotFound(ValueError):
    """``report.baseline`` names overrides that no run matches."""


def parse_baseline(spec: str) -> dict[str, str]:
    """``precision=fp32,pruning=none`` (commas or spaces) -> ``{"precision": "fp32", "pruning": "none"}``."""
    pairs = [p for p in re.split(r"[,\s]+", spec.strip()) if p]
    if not all("=" in p for p in pairs):
        raise ValueError(f"report.baseline={spec}: give a run name or overrides like precision=fp32,pruning=none")
    return dict(p.split("=", 1) for p in pairs)


def _matches(run: RunRecord, key: str, value: str) -> bool:
    have = run.levers.get(key) if key in LEVERS else run.params.get(key)
    if have is None:
        return False
    try:
        return have == value or float(have) == float(value)
    except ValueError:
        return False


def choose_baseline(rows: list[RunRecord], spec: str | None = None) -> RunRecord:
    """The run named ``spec``, or the first whose levers/params match its overrides; by default the
    first finished run with no pruning, no quantization, ``single``, ``fp32``, ``full`` and ``adamw``, else the
    first run."""
    candidates = [r for r in rows if r.finished] or rows
    if spec:
        named = [r for r in rows if r.name == spec]
        if named:
            return named[0]
        wanted = parse_baseline(spec)
        found = [r for r in candidates if all(_matches(r, k, v) for k, v in wanted.items())]
        if not found:
            raise BaselineNotFound(f"report.baseline={spec}: no run matches (runs: {', '.join(r.name for r in rows)})")
        return found[0]
    default = [r for r in candidates if all(r.levers.get(k) == v for k, v in DEFAULT_BASELINE.items())]
    return (default or candidates)[0]


TRAINING_KEYS = ("trainer.", "model.", "data.", "parallelism.", "precision.", "optimizer.", "finetune.")


def trains_like(run: RunRecord, base: RunRecord) -> bool:
    """Whether ``run`` trained exactly as ``base`` did (it differs only in what happens after training), so
    a difference in their training figures is run-to-run noise, not something a lever did."""
    if any(run.levers.get(k) != base.levers.get(k) for k in LEVERS if k not in COMPRESSION):
        return False
    keys = {k for k in (*run.params, *base.params) if k.startswith(TRAINING_KEYS)}
    if any(run.params.get(k) != base.params.get(k) for k in keys):
        return False
    return not (run.compresses_in_training or base.compresses_in_training)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def pareto_front(points: list[tuple[float, float]], maximize_x: bool = False) -> list[int]:
    """Indices of the points no other point beats: y is minimised, x minimised (or maximised)."""
    sign = -1.0 if maximize_x else 1.0
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            sign * xj <= sign * xi and yj <= yi and (sign * xj < sign * xi or yj < yi)
            for j, (xj, yj) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: sign * points[i][0])


def _varying_params(rows: list[RunRecord], swept: Sequence[str] = ()) -> list[str]:
    """Config keys that tell runs apart beyond their levers: those a sweep varied (``swept``) and took more
    than one value, and any key that differs between runs whose levers are the same (``trainer.lr``);
    keys that only follow from the levers (``trainer.nproc_per_node``) are left out."""
    keys = sorted({k for r in rows for k in r.params if not k.startswith(("runtime.", "tracking.", "hydra."))})
    varying = []
    for key in keys:
        seen: dict[tuple, set] = {}
        for r in rows:
            if key in r.params:
                seen.setdefault(tuple(r.levers.values()), set()).add(r.params[key])
        if any(len(v) > 1 for v in seen.values()) or (key in swept and len(set().union(*seen.values())) > 1):
            varying.append(key)
    return varying


def _lever_text(key: str, value: str) -> str:
    if key == "world_size":
        return f"x{value}"
    return f"no {key}" if value == "none" and key in COMPRESSION else value


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.4g}"


def label_runs(rows: list[RunRecord], base: RunRecord, swept: Sequence[str] = ()) -> None:
    """A short label per run: for the baseline, the levers and keys that vary in the set ("single fp32 x1");
    for every other run, only where it differs from the baseline ("bf16", "ddp x2")."""
    levers = [k for k in LEVERS if len({r.levers.get(k) for r in rows}) > 1]
    params = _varying_params(rows, swept)
    for r in rows:
        keep = (lambda k, v: v != "none") if r is base else (lambda k, v: v != base.levers.get(k))  # noqa: E731
        parts = [_lever_text(k, r.levers[k]) for k in levers if keep(k, r.levers[k])]
        parts += [f"{k.rsplit('.', 1)[-1]}={_short(r.params[k])}" for k in params
                  if k in r.params and (r is base or r.params[k] != base.params.get(k))]
        r.label = " ".join(parts) or ("baseline" if r is base else r.name)


MAIN_COLUMNS = (  # (column, metric, how it compares to the baseline)
    (EVAL_LOSS, EVAL_LOSS, "delta"),
    (PERF_TOKENS_PER_S, PERF_TOKENS_PER_S, "ratio"),
    (STATE, STATE, "ratio"),
    (MEM_PEAK, MEM_PEAK, "ratio"),
    (MODEL_SIZE, MODEL_SIZE, "ratio"),
    (INFER_LATENCY, INFER_LATENCY, "speedup"),
    (SERVE_TARGET_TOKENS_PER_S, SERVE_TARGET_TOKENS_PER_S, "ratio"),  # served at the latency target
    (SERVE_USD, SERVE_USD, "ratio"),
)
PLAN_COLUMNS = (  # a report of plans (mode=plan, a plan search's candidates): what each predicts on its card
    (PLAN_MEMORY, PLAN_MEMORY, "ratio"),
    (PLAN_MARGIN, PLAN_MARGIN, ""),  # below 0: it does not fit
    (PLAN_TOKENS_PER_S, PLAN_TOKENS_PER_S, "ratio"),
    (PLAN_MFU, PLAN_MFU, "ratio"),
    (PLAN_USD, PLAN_USD, "ratio"),
    (PLAN_HOURS, PLAN_HOURS, "ratio"),
)
COMPARE_SUFFIX = {"delta": "delta", "ratio": "ratio", "speedup": "speed-up"}


def _flat(columns: Sequence[tuple[str, str, str]]) -> list[str]:
    return [x for col, _, how in columns for x in ((col, f"{col} {COMPARE_SUFFIX[how]}") if how else (col,))]


MAIN_TABLE = _flat(MAIN_COLUMNS)
PLAN_TABLE = _flat(PLAN_COLUMNS)
SHOWN = {MEM_PARAMS, MEM_GRADS, MEM_OPTIMIZER} | {m for _, m, _ in MAIN_COLUMNS} | {m for _, m, _ in PLAN_COLUMNS}


def compare(value: float | None, base: float | None, how: str) -> float | None:
    if how == "delta":
        r = ratio(value, base)
        return None if r is None else r - 1
    if how == "speedup":
        return ratio(base, value)
    return ratio(value, base)


def build_table(rows: list[RunRecord], baseline: str | None = None, swept: Sequence[str] = ()) -> Report:
    """The comparison of ``rows`` against their baseline; the summary is left to :mod:`costlab.report.text`."""
    base = choose_baseline(rows, baseline)
    label_runs(rows, base, swept)
    others = sorted(
        k for k in base.metrics
        if k not in SHOWN and not k.startswith(STEP_FAMILIES) and any(k in r.metrics for r in rows if r is not base)
    )
    plans = all(r.plan for r in rows)
    columns = PLAN_COLUMNS if plans else MAIN_COLUMNS
    rep = Report(rows, base, others=others, main=PLAN_TABLE if plans else MAIN_TABLE)
    rep.columns = ["run", "label", "status", "baseline", *LEVERS]
    rep.columns += rep.main
    for k in others:
        rep.columns += [k, f"{k} ratio"]
    for r in rows:
        row: dict[str, Any] = {"run": r.name, "label": r.label, "status": r.status, "baseline": r is base, **r.levers}
        for col, metric, how in columns:
            row[col] = r.get(metric)
            if how:
                row[f"{col} {COMPARE_SUFFIX[how]}"] = compare(r.get(metric), base.get(metric), how)
        for k in others:
            row[k] = r.metrics.get(k)
            row[f"{k} ratio"] = ratio(r.metrics.get(k), base.metrics.get(k))
        rep.table.append(row)
    return rep
