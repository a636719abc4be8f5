"""The answer of a sweep: a comparison table, Pareto plots and a plain-language summary, from MLflow alone.

    python -m costlab.report --parent RUN_ID                   # a sweep's parent run (logged on it)
    python -m costlab.report --experiment NAME                 # every job run of an experiment
    python -m costlab.report --runs ID ID ... --out DIR        # any runs
    python -m costlab.report --parent RUN_ID --baseline "precision=fp32,pruning=none"

Nothing here needs the workers or their files: runs on a cluster are reported from their tracking store.
Every ratio is a ratio of two logged measurements, never an assumption about what a lever should buy.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from costlab import ROOT, status, tracking
from costlab.names import (
    EVAL_LOSS,
    INFER_LATENCY,
    INFER_SPEEDUP,
    MEM_GRADS,
    MEM_OPTIMIZER,
    MEM_PARAMS,
    MEM_PEAK,
    MODEL_SIZE,
    PERF_TOKENS_PER_S,
    STEP_FAMILIES,
    TRAIN_LOSS,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

LEVERS = ("model", "parallelism", "precision", "pruning", "quantization", "world_size", "device")
COMPRESSION = ("pruning", "quantization")
DEFAULT_BASELINE = {"parallelism": "single", "precision": "fp32", "pruning": "none", "quantization": "none"}
STATE = "state_bytes_per_rank"  # parameters + gradients + optimizer state held by one rank
SPEED_TOLERANCE = 0.03  # timings within 3 % of the baseline count as unchanged (run-to-run noise)
BYTES_TOLERANCE = 0.01
REPORT_TABLE = "report/comparison.json"
FIGURES = {  # file stem: (x metric, x label, bigger x is better)
    "pareto_throughput": (PERF_TOKENS_PER_S, "training throughput (tokens/s, higher is better)", True),
    "pareto_size": (MODEL_SIZE, "shipped model size (MiB, lower is better)", False),
    "pareto_latency": (INFER_LATENCY, "inference latency p50 (ms, lower is better)", False),
}


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


# --------------------------------------------------------------------------- reading MLflow


def record(run: Any) -> RunRecord:
    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        levers={k: tags.get(k, "") for k in LEVERS},
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        start_time=run.info.start_time or 0,
    )


def load_runs(c: MlflowClient, *, parent: str | None = None, experiment: str | None = None,
              run_ids: list[str] | None = None) -> list[RunRecord]:
    """The job runs to compare, oldest first: a sweep parent's children, an experiment's job runs
    (sweep parents left out), or the runs named."""
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


def _all_runs(c: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# --------------------------------------------------------------------------- the comparison


class BaselineNotFound(ValueError):
    pass


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
    first finished run with no pruning, no quantization, ``single`` and ``fp32``, else the first run."""
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


def _varying_params(rows: list[RunRecord]) -> list[str]:
    """Config keys that tell apart runs whose levers are the same (``pruning.amount``, ``trainer.lr``):
    keys that only follow from the levers (``trainer.nproc_per_node``) are left out."""
    keys = sorted({k for r in rows for k in r.params if not k.startswith(("runtime.", "tracking.", "hydra."))})
    varying = []
    for key in keys:
        seen: dict[tuple, set] = {}
        for r in rows:
            if key in r.params:
                seen.setdefault(tuple(r.levers.values()), set()).add(r.params[key])
        if any(len(v) > 1 for v in seen.values()):
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


def label_runs(rows: list[RunRecord], base: RunRecord) -> None:
    """A short label per run: for the baseline, the levers and keys that vary in the set ("single fp32 x1");
    for every other run, only where it differs from the baseline ("bf16", "ddp x2")."""
    levers = [k for k in LEVERS if len({r.levers.get(k) for r in rows}) > 1]
    params = _varying_params(rows)
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
)
COMPARE_SUFFIX = {"delta": "delta", "ratio": "ratio", "speedup": "speed-up"}
MAIN_TABLE = [x for col, _, how in MAIN_COLUMNS for x in (col, f"{col} {COMPARE_SUFFIX[how]}")]
SHOWN = {MEM_PARAMS, MEM_GRADS, MEM_OPTIMIZER} | {m for _, m, _ in MAIN_COLUMNS}


def compare(value: float | None, base: float | None, how: str) -> float | None:
    if how == "delta":
        r = ratio(value, base)
        return None if r is None else r - 1
    if how == "speedup":
        return ratio(base, value)
    return ratio(value, base)


def build_report(rows: list[RunRecord], baseline: str | None = None) -> Report:
    base = choose_baseline(rows, baseline)
    label_runs(rows, base)
    others = sorted(
        k for k in base.metrics
        if k not in SHOWN and not k.startswith(STEP_FAMILIES) and any(k in r.metrics for r in rows if r is not base)
    )
    rep = Report(rows, base, others=others)
    rep.columns = ["run", "label", "status", "baseline", *LEVERS]
    rep.columns += MAIN_TABLE
    for k in others:
        rep.columns += [k, f"{k} ratio"]
    for r in rows:
        row: dict[str, Any] = {"run": r.name, "label": r.label, "status": r.status, "baseline": r is base, **r.levers}
        for col, metric, how in MAIN_COLUMNS:
            row[col] = r.get(metric)
            row[f"{col} {COMPARE_SUFFIX[how]}"] = compare(r.get(metric), base.get(metric), how)
        for k in others:
            row[k] = r.metrics.get(k)
            row[f"{k} ratio"] = ratio(r.metrics.get(k), base.metrics.get(k))
        rep.table.append(row)
    rep.summary = summarize(rep)
    return rep


# --------------------------------------------------------------------------- the words


def _times(r: float) -> str:
    return f"{r:.2f}x"


def _sentence(r: RunRecord, base: RunRecord) -> str:
    if not r.finished:
        return f"{r.label} {r.status}, so it has no figures"
    said, saved = [], False
    speed = ratio(r.get(PERF_TOKENS_PER_S), base.get(PERF_TOKENS_PER_S))
    if speed is not None:
        if speed > 1 + SPEED_TOLERANCE:
            said.append(f"trains {_times(speed)} faster")
            saved = True
        elif speed < 1 - SPEED_TOLERANCE:
            said.append(f"trains {_times(1 / speed)} slower")
        else:
            said.append(f"trains no faster ({_times(speed)})")
    state = ratio(r.get(STATE), base.get(STATE))
    if state is not None and abs(state - 1) > BYTES_TOLERANCE:
        said.append(f"holds {_times(state)} the training state per rank")
        saved |= state < 1
    compressed = any(r.levers.get(k, "none") != "none" for k in COMPRESSION)
    size = ratio(r.get(MODEL_SIZE), base.get(MODEL_SIZE))
    if size is not None and (compressed or abs(size - 1) > BYTES_TOLERANCE):
        if size < 1 - BYTES_TOLERANCE:
            said.append(f"ships {_times(1 / size)} smaller")
            saved = True
        else:
            said.append(f"ships no smaller ({_times(1 / size)})")
    # a compressed model's own speed-up was timed interleaved with its uncompressed model in one process:
    # fairer than two latencies from two jobs, so it speaks for compression
    own = r.get(INFER_SPEEDUP) if compressed else None
    speedup = own if own is not None else compare(r.get(INFER_LATENCY), base.get(INFER_LATENCY), "speedup")
    if speedup is not None and (compressed or abs(speedup - 1) > SPEED_TOLERANCE):
        than = " than uncompressed" if own is not None else ""
        if speedup > 1 + SPEED_TOLERANCE:
            said.append(f"infers {_times(speedup)} faster{than}")
            saved = True
        elif speedup < 1 - SPEED_TOLERANCE:
            said.append(f"infers {_times(1 / speedup)} slower{than}")
        else:
            said.append(f"infers no faster{than} ({_times(speedup)})")
    delta = compare(r.get(EVAL_LOSS), base.get(EVAL_LOSS), "delta")
    text = f"{r.label} " + (", ".join(said) if said else "has none of the baseline's cost figures")
    if delta is not None:
        text += f" at {100 * delta:+.2f} % loss"
    if not saved:
        text += f": it saved nothing on this hardware ({r.levers.get('device') or 'unknown device'})"
    return text


def summarize(rep: Report) -> str:
    b = rep.baseline
    head = f"Against the baseline {b.label} ({b.name}"
    if b.get(EVAL_LOSS) is not None:
        head += f", eval/loss {b.get(EVAL_LOSS):.4f}"
    if b.get(PERF_TOKENS_PER_S) is not None:
        head += f", {b.get(PERF_TOKENS_PER_S):,.0f} training tokens/s"
    head += f" on {b.levers.get('device') or 'an unknown device'})"
    sentences = [_sentence(r, b) for r in rep.rows if r is not b]
    if not sentences:
        return head + ": it is the only run."
    return head + ": " + "; ".join(sentences) + "."


# --------------------------------------------------------------------------- writing


def _fmt(col: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if not isinstance(value, float | int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if col.endswith(" delta"):
        return f"{100 * value:+.2f} %"
    if col.endswith((" ratio", " speed-up")):
        return f"{value:.2f}x"
    if "loss" in col:
        return f"{value:.4f}"
    if col.endswith("bytes") or col.endswith(STATE):
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown(rep: Report, figures: list[str] = ()) -> str:
    varying = [k for k in LEVERS if len({r.levers.get(k) for r in rep.rows}) > 1]
    same = ", ".join(f"{k} {rep.baseline.levers[k]}" for k in LEVERS if k not in varying)
    main = ["label", "status", *varying, *MAIN_TABLE]
    lines = ["# Comparison report", "", rep.summary, ""]
    if same:
        lines += [f"Every run: {same}.", ""]
    lines += [f"Baseline: **{rep.baseline.label}** (`{rep.baseline.name}`, run `{rep.baseline.run_id}`); "
              "ratios are run / baseline, speed-up is baseline latency / run latency, delta is relative.", ""]
    lines += _md_table(main, rep.table, bold_status=True)
    if rep.others:
        lines += ["", "Other summary metrics (value, and ratio to the baseline):", ""]
        header = ["metric", *[row["label"] for row in rep.table]]
        body = [{"metric": k, **{row["label"]: _other(k, row) for row in rep.table}} for k in rep.others]
        lines += _md_table(header, body)
    lines += [""] + [f"![{stem}]({stem}.png)" for stem in figures]
    return "\n".join(lines) + "\n"


def _other(metric: str, row: dict[str, Any]) -> str:
    value, r = _fmt(metric, row[metric]), _fmt(" ratio", row[f"{metric} ratio"])
    return f"{value} ({r})" if value and r else value


def _md_table(columns: list[str], rows: list[dict[str, Any]], bold_status: bool = False) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(c, row.get(c)).replace("|", "\\|") for c in columns]
        if bold_status and row.get("status") != status.FINISHED:
            cells[columns.index("status")] = f"**{row.get('status')}**"
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_csv(rep: Report, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run_id", *rep.columns])
        w.writeheader()
        for r, row in zip(rep.rows, rep.table, strict=True):
            w.writerow({"run_id": r.run_id, **{k: "" if v is None else v for k, v in row.items()}})


def write_report(rep: Report, out: Path, c: MlflowClient | None = None, parent_id: str | None = None) -> Path:
    """Table (CSV, Markdown), figures (PNG) into ``out``; with a parent run, the same logged on it."""
    out.mkdir(parents=True, exist_ok=True)
    histories = {}
    if c is not None:
        for r in rep.rows:
            points = sorted(c.get_metric_history(r.run_id, TRAIN_LOSS), key=lambda m: m.step)
            histories[r.label] = ([m.step for m in points], [m.value for m in points])
    if importlib.util.find_spec("matplotlib") is None:
        print("costlab: warning: the report has no figures without matplotlib (pip install 'costlab[report]')",
              file=sys.stderr)
        figures = {}
    else:
        figures = _figures(rep, histories)
    drawn = [stem for stem, fig in figures.items() if fig is not None]
    for stem in drawn:
        figures[stem].savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
        if parent_id:
            c.log_figure(parent_id, figures[stem], f"report/{stem}.png")
        figures[stem].clear()
    (out / "report.md").write_text(markdown(rep, drawn))
    write_csv(rep, out / "report.csv")
    if parent_id:
        c.log_table(parent_id, _columns(rep), REPORT_TABLE)
        c.log_artifact(parent_id, str(out / "report.md"), "report")
        c.log_artifact(parent_id, str(out / "report.csv"), "report")
    return out / "report.md"


def _figures(rep: Report, histories: dict[str, tuple[list[int], list[float]]]) -> dict[str, Any]:
    from costlab import report_plots

    figures = {stem: report_plots.pareto(rep.rows, metric, xlabel, bigger, EVAL_LOSS, pareto_front)
               for stem, (metric, xlabel, bigger) in FIGURES.items()}
    figures["loss_curves"] = report_plots.loss_curves(histories, TRAIN_LOSS)
    figures["memory"] = report_plots.memory_bars(rep.rows, (MEM_PARAMS, MEM_GRADS, MEM_OPTIMIZER), MEM_PEAK)
    return figures


def _columns(rep: Report) -> dict[str, list]:
    cols: dict[str, list] = {"run_id": [r.run_id for r in rep.rows]}
    for col in rep.columns:
        cols[col] = [row[col] for row in rep.table]
    return cols


# --------------------------------------------------------------------------- entry points


def report_sweep(uri: str, parent_id: str, out: Path, baseline: str | None = None) -> Path:
    """The report of a sweep; a configured baseline that no job matches (a search may never try it) falls
    back to the default one, with a warning."""
    c = tracking.client(uri)
    rows = load_runs(c, parent=parent_id)
    try:
        rep = build_report(rows, baseline)
    except BaselineNotFound as e:
        print(f"costlab: warning: {e}; using the default baseline", file=sys.stderr)
        rep = build_report(rows)
    return write_report(rep, out, c, parent_id)


class SweepReport(Callback):
    """At the end of a multirun, builds the report of its parent run into ``<sweep dir>/report`` and logs
    it on the parent. Listed after :class:`costlab.tracking.SweepParentRun`, so it runs before the
    parent is closed. A report that cannot be built is one warning line; the sweep's verdict and exit
    code stay those of its jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = tracking.parent_run_id(str(sweep_dir))
        if parent_id is None:
            return
        try:
            path = report_sweep(config.tracking.uri, parent_id, sweep_dir / "report", config.report.baseline)
            print(f"costlab: report: {path}", file=sys.stderr)
        except Exception as e:  # a report must never hide or change how the sweep went
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"costlab: warning: no report for this sweep ({type(e).__name__}: {why})", file=sys.stderr)


def default_out(c: MlflowClient, args: argparse.Namespace) -> Path:
    if args.parent:
        sweep_dir = c.get_run(args.parent).data.tags.get(tracking.SWEEP_DIR_TAG)
        if sweep_dir and Path(sweep_dir).is_dir():
            return Path(sweep_dir) / "report"
        return ROOT / "outputs" / "reports" / args.parent
    return ROOT / "outputs" / "reports" / (args.experiment or args.runs[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m costlab.report", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent", metavar="RUN_ID", help="a sweep's parent run: its children, logged on it")
    which.add_argument("--experiment", metavar="NAME", help="every job run of an MLflow experiment")
    which.add_argument("--runs", metavar="ID", nargs="+", help="these runs")
    p.add_argument("--tracking-uri", default=f"sqlite:///{ROOT}/outputs/mlflow.db", help="the MLflow store")
    p.add_argument("--baseline", help="a run name, or overrides like precision=fp32,pruning=none")
    p.add_argument("--out", type=Path, help="folder for report.md, report.csv and the PNGs")
    args = p.parse_args(argv)
    c = tracking.client(args.tracking_uri)
    try:
        rows = load_runs(c, parent=args.parent, experiment=args.experiment, run_ids=args.runs)
        rep = build_report(rows, args.baseline)
    except ValueError as e:
        print(f"costlab: error: {e}", file=sys.stderr)
        return 2
    path = write_report(rep, args.out or default_out(c, args), c, args.parent)
    print(rep.summary)
    print(f"costlab: report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
