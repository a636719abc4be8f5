"""The report in words: the plain-language summary, the Markdown tables and the CSV, all from the numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from costlab import status
from costlab.measure.names import (
    EVAL_LOSS,
    INFER_LATENCY,
    INFER_SPEEDUP,
    MODEL_SIZE,
    MODEL_TRAINABLE,
    PERF_TOKENS_PER_S,
    PLAN_MARGIN,
    PLAN_MEMORY,
    PLAN_TOKENS_PER_S,
    PLAN_USD,
    SERVE_KV_LOSS_DELTA,
    SERVE_MAX_CONCURRENCY,
    SERVE_TARGET_SPEEDUP,
    SERVE_TARGET_TOKENS_PER_S,
    SERVE_USD,
)
from costlab.report.table import (
    BYTES_TOLERANCE,
    COMPRESSION,
    LEVERS,
    SPEED_TOLERANCE,
    STATE,
    Report,
    RunRecord,
    compare,
    ratio,
    trains_like,
)


def _times(r: float) -> str:
    return f"{r:.2f}x"


def _sentence(r: RunRecord, base: RunRecord) -> str:
    if not r.finished:
        return f"{r.label} {r.status}, so it has no figures"
    said, saved = [], False
    trains = ratio(r.get(MODEL_TRAINABLE), base.get(MODEL_TRAINABLE))
    if trains is not None and r.levers.get("finetune") != base.levers.get("finetune"):
        said.append(f"trains {100 * trains:.2g} % of the parameters the baseline trains")
    # a run that trained as the baseline did has the same training cost: its timings differ only by noise
    speed = None if trains_like(r, base) else ratio(r.get(PERF_TOKENS_PER_S), base.get(PERF_TOKENS_PER_S))
    if speed is not None:
        said.append(_speed("trains", speed))
        saved |= speed > 1 + SPEED_TOLERANCE
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
    # an uncompressed model of the baseline's architecture, precision and size infers as the baseline's does:
    # a difference between two jobs' latencies is noise (the fine-tuning and optimizer levers ship such models)
    same_model = not compressed and not any(base.levers.get(k, "none") != "none" for k in COMPRESSION) and all(
        r.levers.get(k) == base.levers.get(k) for k in ("model", "precision")) and size is not None and \
        abs(size - 1) <= BYTES_TOLERANCE
    if speedup is not None and not same_model and (compressed or abs(speedup - 1) > SPEED_TOLERANCE):
        said.append(_speed("infers", speedup, " than uncompressed" if own is not None else ""))
        saved |= speedup > 1 + SPEED_TOLERANCE
    serving, serves_more = _serving(r, base, compressed, same_model)
    said += serving
    saved |= serves_more
    delta = compare(r.get(EVAL_LOSS), base.get(EVAL_LOSS), "delta")
    text = f"{r.label} " + (", ".join(said) if said else "has none of the baseline's cost figures")
    if delta is not None:
        text += f" at {100 * delta:+.2f} % loss"
    if not saved:
        text += f": it saved nothing on this hardware ({r.levers.get('device') or 'unknown device'})"
    return text


def _target(r: RunRecord) -> str:
    tpot, ttft = r.params.get("serve.tpot_ms_p99"), r.params.get("serve.ttft_ms_p99")
    return f"p99 TPOT <= {float(tpot):g} ms" + (f", p99 TTFT <= {float(ttft):g} ms" if ttft else "") if tpot \
        else "the latency target"


def _serving(r: RunRecord, base: RunRecord, compressed: bool, same_model: bool) -> tuple[list[str], bool]:
    """What serving the run's model buys: output tokens/s at the latency target against the baseline's (a
    compressed model's own ratio to its uncompressed model, served interleaved in one process, where it has
    one), the price per million output tokens beside the baseline's, and what a smaller KV cache cost in
    loss. The same model served the same way as the baseline differs from it only by noise."""
    kv, base_kv = r.params.get("serve.kv_cache_dtype", "auto"), base.params.get("serve.kv_cache_dtype", "auto")
    mine, theirs = r.get(SERVE_TARGET_TOKENS_PER_S), base.get(SERVE_TARGET_TOKENS_PER_S)
    if mine is None:
        return ([f"misses {_target(r)} at every concurrency"] if theirs is not None and r.get(SERVE_MAX_CONCURRENCY)
                else []), False
    own = r.get(SERVE_TARGET_SPEEDUP) if compressed else None
    served = own if own is not None else ratio(mine, theirs)
    lever = compressed or kv != base_kv  # a lever that changes how the model serves
    if served is None or not (lever or (not same_model and abs(served - 1) > SPEED_TOLERANCE)):
        return [], False
    than = " than uncompressed" if own is not None else ""
    text = f"serves {_times(served)} the output tokens/s{than} at {_target(r)}"
    usd, base_usd = r.get(SERVE_USD), base.get(SERVE_USD)
    if usd is not None and base_usd is not None:
        text += f", ${usd:.3g} vs ${base_usd:.3g} per 1M output tokens"
    if r.get(SERVE_KV_LOSS_DELTA) is not None:
        text += f" (its {kv} KV cache: {100 * r.get(SERVE_KV_LOSS_DELTA):+.2f} % loss)"
    return [text], served > 1 + SPEED_TOLERANCE


def served_ranking(rep: Report) -> str:
    """The runs ranked by the output tokens/s they served at the latency target ("" when none served)."""
    runs = sorted((r for r in rep.rows if r.finished and r.get(SERVE_TARGET_TOKENS_PER_S) is not None),
                  key=lambda r: -r.get(SERVE_TARGET_TOKENS_PER_S))
    if not runs:
        return ""
    ranked = ", ".join(f"{r.label} {r.get(SERVE_TARGET_TOKENS_PER_S):,.0f}" + (
        f" (${r.get(SERVE_USD):.3g}/1M)" if r.get(SERVE_USD) is not None else "") for r in runs)
    return f"Served at {_target(runs[0])}, fastest first (output tokens/s): {ranked}."


def _fits(r: RunRecord) -> str:
    margin = r.get(PLAN_MARGIN)
    if margin is None:
        return "has no memory verdict"
    return f"fits ({margin / 1e9:.3g} GB to spare)" if margin >= 0 else f"does not fit (by {-margin / 1e9:.3g} GB)"


def _plan_sentence(r: RunRecord, base: RunRecord) -> str:
    if not r.finished:
        return f"{r.label} {r.status}, so it has no figures"
    said = [_fits(r)]
    memory = ratio(r.get(PLAN_MEMORY), base.get(PLAN_MEMORY))
    if memory is not None:
        said.append(f"needs {_times(memory)} the memory per device")
    speed = ratio(r.get(PLAN_TOKENS_PER_S), base.get(PLAN_TOKENS_PER_S))
    if speed is not None:
        said.append(_speed("trains", speed))
    usd = ratio(r.get(PLAN_USD), base.get(PLAN_USD))
    if usd is not None:
        said.append(f"costs {_times(usd)} the baseline's ${base.get(PLAN_USD):,.4g}")
    return f"{r.label} " + ", ".join(said)


def summarize_plans(rep: Report) -> str:
    """A report of plans: what each predicts on the card it names against the baseline's plan, and the ones that
    fit, cheapest first. Every figure is a prediction; nothing was trained."""
    b = rep.baseline
    head = (f"Predicted on {b.levers.get('device') or 'an unknown card'} (plans: nothing was trained), against the "
            f"baseline" + ("" if b.label == "baseline" else f" {b.label}") + f" ({b.name}, which {_fits(b)}")
    if b.get(PLAN_TOKENS_PER_S) is not None:
        head += f", {b.get(PLAN_TOKENS_PER_S):,.0f} tokens/s"
    head += ")"
    sentences = [_plan_sentence(r, b) for r in rep.rows if r is not b]
    fitting = sorted((r for r in rep.rows if r.finished and (r.get(PLAN_MARGIN) or 0.0) >= 0
                      and r.get(PLAN_USD) is not None), key=lambda r: r.get(PLAN_USD))
    ranking = (f"{len(fitting)} of {len(rep.rows)} fit; cheapest first: "
               + ", ".join(f"{r.label} ${r.get(PLAN_USD):,.4g}" for r in fitting) + "."
               if fitting else f"None of the {len(rep.rows)} fits, or none is priced.")
    return head + (": " + "; ".join(sentences) + ". " if sentences else ": it is the only plan. ") + ranking


def summarize(rep: Report) -> str:
    if all(r.plan for r in rep.rows):
        return summarize_plans(rep)
    b = rep.baseline
    head = "Against the baseline" + ("" if b.label == "baseline" else f" {b.label}") + f" ({b.name}"
    if b.get(EVAL_LOSS) is not None:
        head += f", eval/loss {b.get(EVAL_LOSS):.4f}"
    if b.get(PERF_TOKENS_PER_S) is not None:
        head += f", {b.get(PERF_TOKENS_PER_S):,.0f} training tokens/s"
    head += f" on {b.levers.get('device') or 'an unknown device'})"
    sentences = [_sentence(r, b) for r in rep.rows if r is not b]
    ranking = served_ranking(rep)
    if not sentences:
        return head + ": it is the only run." + (f" {ranking}" if ranking else "")
    return head + ": " + "; ".join(sentences) + "." + (f" {ranking}" if ranking else "")


# --------------------------------------------------------------------------- writing


def _is_loss(col: str) -> bool:
    """A loss (``eval/loss``, ``train/final_loss``, ``serve/kv_eval_loss``), not a figure named after one
    (``train/loss_scale``, ``mem/predicted_loss_backward_bytes_per_rank``)."""
    words = col.split(" ")[0].rsplit("/", 1)[-1].split("_")
    return "loss" in words and not {"scale", "bytes"} & set(words)


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
    if _is_loss(col):
        return f"{value:.4f}"
    if col in (PLAN_MEMORY, PLAN_MARGIN):  # a plan's figures for a card, in the GB its datasheet gives
        return f"{value / 1e9:,.3g} GB"
    if col.endswith("bytes") or col.endswith(STATE):
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown(rep: Report, figures: list[str] = ()) -> str:
    varying = [k for k in LEVERS if len({r.levers.get(k) for r in rep.rows}) > 1]
    same = ", ".join(f"{k} {rep.baseline.levers[k]}" for k in LEVERS if k not in varying)
    main = ["label", "status", *varying, *rep.main]
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


def _speed(verb: str, ratio_: float, than: str = "") -> str:
    """"trains 1.28x faster", "infers 2.00x slower than uncompressed", or "... no faster (1.02x)"."""
    if ratio_ > 1 + SPEED_TOLERANCE:
        return f"{verb} {_times(ratio_)} faster{than}"
    if ratio_ < 1 - SPEED_TOLERANCE:
        return f"{verb} {_times(1 / ratio_)} slower{than}"
    return f"{verb} no faster{than} ({_times(ratio_)})"
