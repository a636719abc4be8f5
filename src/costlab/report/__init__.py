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
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from costlab import ROOT, tracking
from costlab.measure.names import (
    EVAL_LOSS,
    INFER_LATENCY,
    MEM_GRADS,
    MEM_OPTIMIZER,
    MEM_PARAMS,
    MEM_PEAK,
    MODEL_SIZE,
    PERF_TOKENS_PER_S,
    SERVE_TARGET_TOKENS_PER_S,
    TRAIN_LOSS,
)
from costlab.report.deploy import register_front
from costlab.report.table import (
    BaselineNotFound,
    Report,
    RunRecord,
    build_table,
    choose_baseline,  # noqa: F401  (the report's API, used by the tests and notebooks)
    load_runs,
    pareto_front,
    swept_keys,
    trains_like,  # noqa: F401
)
from costlab.report.text import markdown, summarize, write_csv

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

REPORT_TABLE = "report/comparison.json"
FIGURES = {  # file stem: (x metric, x label, bigger x is better)
    "pareto_throughput": (PERF_TOKENS_PER_S, "training throughput (tokens/s, higher is better)", True),
    "pareto_size": (MODEL_SIZE, "shipped model size (MiB, lower is better)", False),
    "pareto_latency": (INFER_LATENCY, "inference latency p50 (ms, lower is better)", False),
    "pareto_serving": (SERVE_TARGET_TOKENS_PER_S, "output tokens/s served at the latency target (higher is better)",
                       True),
}


def build_report(rows: list[RunRecord], baseline: str | None = None, swept: Sequence[str] = ()) -> Report:
    """The comparison of ``rows`` against their baseline (see :func:`choose_baseline`), with its summary;
    ``swept``: the keys a sweep varied, shown in the runs' labels."""
    rep = build_table(rows, baseline, swept)
    rep.summary = summarize(rep)
    return rep


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
        c.log_table(parent_id, _columns(rep), _fresh_table(c, parent_id))
        c.log_artifact(parent_id, str(out / "report.md"), "report")
        c.log_artifact(parent_id, str(out / "report.csv"), "report")
    return out / "report.md"


def _figures(rep: Report, histories: dict[str, tuple[list[int], list[float]]]) -> dict[str, Any]:
    from costlab.report import plots

    figures = {stem: plots.pareto(rep.rows, metric, xlabel, bigger, EVAL_LOSS, pareto_front)
               for stem, (metric, xlabel, bigger) in FIGURES.items()}
    figures["loss_curves"] = plots.loss_curves(histories, TRAIN_LOSS)
    figures["memory"] = plots.memory_bars(rep.rows, (MEM_PARAMS, MEM_GRADS, MEM_OPTIMIZER), MEM_PEAK)
    return figures


def _fresh_table(c: MlflowClient, run_id: str) -> str:
    """Where the table goes: ``log_table`` appends to an existing table, so a rebuilt report first removes
    the old one (or, where the artifact store cannot delete, takes a new name)."""
    if not any(a.path == REPORT_TABLE for a in c.list_artifacts(run_id, "report")):
        return REPORT_TABLE
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(c.get_run(run_id).info.artifact_uri).delete_artifacts(REPORT_TABLE)
        return REPORT_TABLE
    except Exception:  # a store that cannot delete: keep the old table, write a new one
        return REPORT_TABLE.replace(".json", f"-{int(time.time())}.json")


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
    rows, swept = load_runs(c, parent=parent_id), swept_keys(c, parent_id)
    try:
        rep = build_report(rows, baseline, swept)
    except BaselineNotFound as e:
        print(f"costlab: warning: {e}; using the default baseline", file=sys.stderr)
        rep = build_report(rows, swept=swept)
    path = write_report(rep, out, c, parent_id)
    fronts = {stem.removeprefix("pareto_"): (metric, bigger) for stem, (metric, _, bigger) in FIGURES.items()}
    for model in register_front(c, rep, parent_id, fronts):
        print(f"costlab: registered {model}", file=sys.stderr)
    return path


class SweepReport(Callback):
    """At the end of a multirun, builds the report of its parent run into ``<sweep dir>/report`` and logs
    it on the parent. Listed after :class:`costlab.tracking.sweep.SweepParentRun`, so it runs before the
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
        rep = build_report(rows, args.baseline, swept_keys(c, args.parent) if args.parent else ())
    except ValueError as e:
        print(f"costlab: error: {e}", file=sys.stderr)
        return 2
    path = write_report(rep, args.out or default_out(c, args), c, args.parent)
    print(rep.summary)
    print(f"costlab: report: {path}")
    return 0

