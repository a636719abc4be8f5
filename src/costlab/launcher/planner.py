"""``mode=plan plan.search=true``: every layout of the run's devices, predicted and ranked by what it costs.

    python run.py mode=plan plan.search=true model=hf model.config=llama3_70b hardware=h100_sxm \\
        trainer.nnodes=8 trainer.nproc_per_node=8 plan.tokens=1e12

The candidates are every factorization of the devices into pp x dp_replicate x dp_shard x tp (tensor parallel inside
a node; degrees the model's heads, MLP width and layers allow), x activation checkpointing (none, selective, full) x
the micro-batch (:func:`_micro_choices`; the global ``trainer.batch_size`` kept: gradient accumulation or pipeline
micro-batches make up the rest) x the precisions the card has a peak for (bf16, and fp8 where it has one; fp32 and
bf16 on a CPU); ``plan.precisions`` and ``plan.checkpointing`` narrow the precisions and modes tried. Each one is
checked as a run would be (:func:`costlab.launcher.validate.validate`) and its memory predicted per rank
(:mod:`costlab.measure.memory`; the parameter, gradient and optimizer state once per sharding layout); those that do
not fit are dropped, and the step of the rest timed by the time model (:mod:`costlab.measure.steptime`). They are
ranked cheapest first ($ per 1M training tokens, or tokens/s without a price); one is *dominated* when another is at
least as fast with no more memory per device. Nothing is allocated: models are built on the meta device and traced
on fake tensors. Each row's overrides run as they are (``python run.py <overrides>``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from costlab.measure.names import PLAN_HOURS, PLAN_MARGIN, PLAN_MEMORY, PLAN_MFU, PLAN_TOKENS_PER_S, PLAN_USD_PER_1M
from costlab.schema import CHECKPOINTING_MODES, ConfigError

SEARCHED = ("mode", "plan.search", "parallelism", "precision", "trainer.activation_checkpointing",
            "trainer.grad_accum_steps")  # the keys a candidate sets: the user's values for them are replaced
# micro-batch sizes tried per layout: the powers of two up to the rank's share of the batch and the share itself;
# where there are more, the smallest (the ones that fit) and the whole share (no accumulation)
MAX_MICRO_CHOICES = 8


@dataclass
class Candidate:
    overrides: list[str]  # what the candidate sets, beside the user's other overrides
    cfg: DictConfig  # shared by the candidates of one layout and precision
    mode: str = "none"  # activation checkpointing
    accum: int = 1  # gradient accumulation steps
    chunks: int = 1  # pipeline micro-batches
    rows: int = 1  # sequences per micro-batch
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # what its time prediction rests on, or why it has none
    fits: bool = False
    dominated: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.metrics.get(PLAN_TOKENS_PER_S, 0.0)

    @property
    def memory(self) -> float:
        return self.metrics.get(PLAN_MEMORY, float("inf"))

    def settled(self) -> DictConfig:
        """The shared config with this candidate's checkpointing and micro-batching set."""
        self.cfg.trainer.activation_checkpointing = self.mode
        self.cfg.trainer.grad_accum_steps = self.accum
        if self.cfg.parallelism.pp_degree > 1:
            self.cfg.parallelism.microbatches = self.chunks
        return self.cfg


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _option_name(pp: int, replicate: int, shard: int, tp: int) -> str:
    if pp > 1:
        return "pp"
    if tp > 1:
        return "fsdp_tp" if shard * replicate > 1 else "tp"
    if shard > 1:
        return "hsdp" if replicate > 1 else "fsdp"
    return "ddp" if replicate > 1 else "single"


def precisions(cfg: DictConfig) -> list[str]:
    """The precision options searched: the card's (:func:`~costlab.launcher.validate.card_precisions`), or those
    of them ``plan.precisions`` names."""
    from costlab.launcher.validate import card_precisions

    chosen = cfg.plan.get("precisions")
    return card_precisions(cfg) if chosen is None else [p for p in card_precisions(cfg) if p in chosen]


def checkpointing(cfg: DictConfig) -> list[str]:
    """The activation checkpointing modes searched: all three, or those ``plan.checkpointing`` names."""
    chosen = cfg.plan.get("checkpointing")
    return list(CHECKPOINTING_MODES) if chosen is None else [m for m in CHECKPOINTING_MODES if m in chosen]


def layouts(world: int, per_node: int) -> list[tuple[int, int, int, int]]:
    """(pp, dp_replicate, dp_shard, tp) for every factorization of ``world``, tensor parallel inside a node."""
    out = []
    for tp in _divisors(min(world, per_node)):
        if per_node % tp:
            continue
        for pp in _divisors(world // tp):
            dp = world // tp // pp
            out += [(pp, dp // shard, shard, tp) for shard in _divisors(dp)]
    return out


def _micro_choices(per_rank: int, pp: int) -> list[tuple[int, int, int]]:
    """(micro-batch rows, gradient accumulation steps, pipeline micro-batches) that cut a rank's ``per_rank``
    sequences: powers of two (and the whole share), the pipeline's micro-batches at least its degree. Past
    :data:`MAX_MICRO_CHOICES` sizes, the smallest and the whole share: a large model fits only in small
    micro-batches, and a small one runs fastest in the largest."""
    sizes = sorted({s for s in (2**i for i in range(per_rank.bit_length())) if per_rank % s == 0} | {per_rank})
    if len(sizes) > MAX_MICRO_CHOICES:
        sizes = sizes[:MAX_MICRO_CHOICES - 1] + [per_rank]
    out = []
    for rows in sizes:
        chunks = per_rank // rows
        if pp > 1:
            if chunks < pp:
                continue
            out.append((rows, 1, chunks))
        else:
            out.append((rows, chunks, 1))
    return out


def candidates(cfg: DictConfig, compose: Any, refused: dict[str, str] | None = None) -> list[Candidate]:
    """Every candidate of ``cfg``'s devices and global batch that passes a run's checks. ``compose(overrides)``
    composes the user's config with more overrides (each parallelism and precision option once); ``refused``, if
    given, gets each layout and precision left out (``"pp x rep x shard x tp precision"``) and why."""
    from costlab.launcher.validate import validate

    t = cfg.trainer
    world, per_node = int(t.nnodes * t.nproc_per_node), int(t.nproc_per_node)
    options: dict[tuple[str, str], DictConfig] = {}
    modes = checkpointing(cfg)
    out = []
    refused = {} if refused is None else refused
    for (pp, replicate, shard, tp), precision in itertools.product(layouts(world, per_node), precisions(cfg)):
        dp = replicate * shard
        which = f"{pp} x {replicate} x {shard} x {tp} {precision}"
        if t.batch_size % dp:
            refused[which] = (f"trainer.batch_size={t.batch_size}: not a multiple of the data-parallel degree "
                              f"{dp}")
            continue
        name = _option_name(pp, replicate, shard, tp)
        if (name, precision) not in options:
            options[name, precision] = compose([f"parallelism={name}", f"precision={precision}"])
        c = OmegaConf.create(OmegaConf.to_container(options[name, precision], resolve=False))
        with open_dict(c):
            c.parallelism.update(pp_degree=pp, dp_replicate=replicate, dp_shard=shard, tp_degree=tp)
            c.trainer.update(nnodes=int(t.nnodes), nproc_per_node=per_node, device=t.device)
            c.hardware = cfg.hardware  # as the launcher resolved them (hardware=auto, trainer.device=auto)
            if pp > 1:
                c.parallelism.update(schedule="1f1b", microbatches=pp)
        group: list[Candidate] = []
        for mode, (rows, accum, chunks) in itertools.product(modes, _micro_choices(int(t.batch_size) // dp, pp)):
            sets = [f"parallelism={name}", f"parallelism.pp_degree={pp}", f"parallelism.dp_replicate={replicate}",
                    f"parallelism.dp_shard={shard}", f"parallelism.tp_degree={tp}", f"precision={precision}",
                    f"trainer.activation_checkpointing={mode}", f"trainer.grad_accum_steps={accum}"]
            if pp > 1:
                sets += ["parallelism.schedule=1f1b", f"parallelism.microbatches={chunks}"]
            group.append(Candidate(sets, c, mode, accum, chunks, rows))
        # one check per layout and precision: its first cut has the most pipeline micro-batches (the others pass
        # where it does) and full checkpointing where it is searched (the one mode with a check of its own: the
        # model has blocks)
        first = next((g for g in group if g.mode == "full"), group[0] if group else None)
        if first is None:
            refused[which] = (f"trainer.batch_size={t.batch_size}: {int(t.batch_size) // dp} sequences a rank, "
                              f"fewer than the pipeline's {pp} stages need (a micro-batch each)")
            continue
        try:
            validate(first.settled())
        except (ConfigError, ValueError) as e:
            refused[which] = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        out += group
    return out


def evaluate(candidate: Candidate, states: dict[tuple, dict[str, float]]) -> None:
    """Predict ``candidate``'s memory and, where it fits, its time (:func:`costlab.launcher.plan.plan_figures`), the
    state once per sharding layout (``states``)."""
    from costlab.launcher.plan import plan_figures

    cfg = candidate.settled()
    p = cfg.parallelism
    key = (int(p.pp_degree), int(p.dp_shard), int(p.tp_degree))
    candidate.metrics, _, candidate.tags = plan_figures(cfg, states, key, timed_unless_over=True)
    candidate.fits = candidate.metrics.get(PLAN_MARGIN, 0.0) >= 0


def rank(found: list[Candidate]) -> list[Candidate]:
    """The fitting candidates, cheapest first (fastest where there is no price), the dominated ones marked."""
    fitting = [c for c in found if c.fits and c.tokens_per_s > 0]
    fitting.sort(key=lambda c: (c.metrics.get(PLAN_USD_PER_1M, 0.0), -c.tokens_per_s, c.memory))
    for c in fitting:
        c.dominated = any(o is not c and o.tokens_per_s >= c.tokens_per_s and o.memory <= c.memory
                          and (o.tokens_per_s > c.tokens_per_s or o.memory < c.memory) for o in fitting)
    return fitting


GB = 1e9


def table(ranked: list[Candidate], found: int, seconds: float, shown: int = 20) -> list[str]:
    """The ranked table's lines (the first ``shown`` rows): per row its layout, checkpointing, sequences per
    micro-batch, gradient accumulation steps, pipeline micro-batches (a pipeline's) and precision, then its
    predicted figures."""
    lines = [f"costlab plan search: {found} candidates, {len(ranked)} fit ({seconds:.1f} s); cheapest first, every "
             "figure PREDICTED"]
    if ranked:
        lines.append(f"  {'#':>3} {'pp x rep x shard x tp':>21} {'ckpt':9} {'micro':>5} {'accum':>5} {'pp mb':>5} "
                     f"{'prec':4} {'GB/dev':>7} {'tokens/s':>12} {'MFU':>6} {'$/1M tok':>9} {'days':>8}  dominated")
    for i, c in enumerate(ranked[:shown], 1):
        p, m = c.cfg.parallelism, c.metrics
        usd = m.get(PLAN_USD_PER_1M)
        lines.append(f"  {i:>3} {f'{p.pp_degree} x {p.dp_replicate} x {p.dp_shard} x {p.tp_degree}':>21} "
                     f"{c.mode:9} {c.rows:>5} {c.accum:>5} {c.chunks if p.pp_degree > 1 else '':>5} "
                     f"{c.cfg.precision.name:4} "
                     f"{c.memory / GB:>7.3g} {c.tokens_per_s:>12,.0f} {m.get(PLAN_MFU, 0):>6.1%} "
                     f"{'' if usd is None else f'{usd:.4f}':>9} {m.get(PLAN_HOURS, 0) / 24:>8.3g}  "
                     f"{'yes' if c.dominated else ''}")
    if len(ranked) > shown:
        lines.append(f"  ... {len(ranked) - shown} more (every candidate is a child run)")
    return lines


LOW_BIT = ("adamw_8bit", "adamw_4bit")  # the optimizer options that keep less than AdamW's 8 bytes a parameter


def nothing_fits(found: list[Candidate]) -> list[str]:
    """Why no candidate fits: the one that needs the least memory a device, by part, and what would bring it down.
    Its parameters, gradients and optimizer state alone (with a GPU's allowance for them) over the card's memory
    mean no cut of the batch fits; otherwise what grows with a micro-batch's tokens is over."""
    from costlab.launcher.plan import allowance
    from costlab.measure.memory import PREDICTED
    from costlab.measure.names import PLAN

    least = min(found, key=lambda c: c.memory)
    if PLAN_MARGIN not in least.metrics:
        return [f"  nothing fits: hardware={least.cfg.hardware.name} names no memory capacity to fit into"]
    m, p = least.metrics, least.cfg.parallelism
    need, capacity = m[PLAN_MEMORY], m[PLAN_MEMORY] + m[PLAN_MARGIN]
    parts = ", ".join(f"{k[len(PREDICTED):].split('_bytes')[0].replace('_', ' ')} {v / GB:.3g}"
                      for k, v in m.items() if k.startswith(PREDICTED) and k.endswith("_bytes_per_rank") and v)
    lines = [f"  nothing fits: the least memory a device needs is {need / GB:.3g} GB of "
             f"{capacity / GB:.3g} GB, at {p.pp_degree} x {p.dp_replicate} x {p.dp_shard} x {p.tp_degree} "
             f"(pp x rep x shard x tp), {least.mode} checkpointing, micro-batch {least.rows}, "
             f"{least.cfg.precision.name}: {parts} GB"]
    state = m[f"{PLAN}state_bytes_per_device"]  # parameters, gradients and optimizer state
    alone = state + (allowance(state) if f"{PREDICTED}allowance_bytes_per_rank" in m else 0.0)
    if alone > capacity:
        optimizer, finetune = (str(least.cfg.get(g, {}).get("name", "")) for g in ("optimizer", "finetune"))
        lighter = ([] if optimizer in LOW_BIT else ["optimizer=adamw_8bit"]) + \
            {"full": ["finetune=lora"], "lora": ["finetune=qlora"]}.get(finetune or "full", [])
        lines.append(f"  its parameters, gradients and optimizer state alone need {alone / GB:.3g} GB"
                     f"{' with the allowance' if alone > state else ''}: more devices to shard them over, a card "
                     "with more memory" + (f", or less state per parameter ({' or '.join(lighter)})" if lighter
                                           else ""))
    else:
        lines.append("  what grows with a micro-batch's tokens (activations, the loss's backward) is over: shorter "
                     "sequences (model.block_size), a card with more memory, or more devices to split the layers over")
    return lines


def not_one(refused: dict[str, str], shown: int = 4) -> list[str]:
    """Why no layout was a candidate: each reason once (the most common first), with the layouts it refused."""
    reasons: dict[str, list[str]] = {}
    for which, why in refused.items():
        reasons.setdefault(why, []).append(which)
    lines = [f"  no candidate: none of the {len(refused)} layouts and precisions (pp x rep x shard x tp) passes a "
             "run's checks"]
    for why, which in sorted(reasons.items(), key=lambda r: -len(r[1]))[:shown]:
        more = f" and {len(which) - 2} more" if len(which) > 2 else ""
        lines.append(f"    {', '.join(which[:2])}{more}: {why}")
    return lines


def search(cfg: DictConfig, compose: Any,
           refused: dict[str, str] | None = None) -> tuple[list[Candidate], list[Candidate], float]:
    """(every candidate, the fitting ones ranked, seconds taken); ``refused``: as :func:`candidates`."""
    t0 = time.perf_counter()
    found = candidates(cfg, compose, refused)
    states: dict[tuple, dict[str, float]] = {}
    for c in found:
        evaluate(c, states)
    return found, rank(found), time.perf_counter() - t0


def _searched(override: str) -> bool:
    """Whether ``override`` sets what the search chooses (a key of :data:`SEARCHED`, or one inside it)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in (*SEARCHED, "plan"))


def _runnable(user: list[str], sets: list[str]) -> list[str]:
    """The user's overrides without what the search chose (and without plan mode), then the candidate's."""
    return [o for o in user if not _searched(o)] + sets


def run_search(cfg: DictConfig, run_id: str, run_dir: Any, user: list[str]) -> list[Candidate]:
    """``plan.search=true``: search, print the ranked table, and log it: the plan's run (``run_id``) holds the
    best candidate's figures and the table as ``plan.txt``; each fitting candidate is a child run with its
    predicted metrics, its overrides as params, the tag of what its time prediction rests on and
    ``costlab.run_command``, the command that runs it."""
    import sys
    from pathlib import Path

    from mlflow.entities import Metric, Param, RunTag

    from costlab import tracking
    from costlab.launcher.preflight import compose_config

    base = [o for o in user if not _searched(o)] + ["mode=plan"]
    refused: dict[str, str] = {}
    found, ranked, seconds = search(cfg, lambda extra: compose_config(base + extra), refused)
    lines = table(ranked, len(found), seconds)
    if ranked:
        command = "python run.py " + " ".join(_runnable(user, ranked[0].overrides))
        lines.append(f"  the cheapest runs as: {command}")
    elif found:
        lines += nothing_fits(found)
    else:
        lines += not_one(refused)
    print("\n".join(lines), file=sys.stderr, flush=True)
    client = tracking.client(cfg.tracking.uri)
    now = int(time.time() * 1000)
    summary = {"plan/candidates": float(len(found)), "plan/fitting": float(len(ranked)), "plan/search_s": seconds}
    if ranked:
        summary.update(ranked[0].metrics)
        client.set_tag(run_id, "costlab.run_command", command)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
    Path(run_dir, "plan.txt").write_text("\n".join(lines) + "\n")
    client.log_artifact(run_id, str(Path(run_dir, "plan.txt")))
    experiment = client.get_run(run_id).info.experiment_id
    world = int(cfg.trainer.nnodes) * int(cfg.trainer.nproc_per_node)
    for i, c in enumerate(ranked, 1):
        p = c.cfg.parallelism
        name = (f"plan #{i} pp{p.pp_degree} rep{p.dp_replicate} shard{p.dp_shard} tp{p.tp_degree} "
                f"{c.mode} micro{c.rows} accum{c.accum}{f' mb{c.chunks}' if p.pp_degree > 1 else ''} "
                f"{c.cfg.precision.name}")
        tags = {"mlflow.parentRunId": run_id, tracking.SWEEP_ID_TAG: run_id, "mode": "plan",
                "hardware": str(cfg.hardware.name), "world_size": str(world), "device": str(cfg.trainer.device),
                **{group: str(c.cfg[group].get("name", "")) for group in tracking.CONTRACT_TAGS if group in c.cfg},
                "costlab.plan_rank": str(i), "costlab.dominated": str(c.dominated).lower(),
                "costlab.run_command": "python run.py " + " ".join(_runnable(user, c.overrides)), **c.tags}
        child = client.create_run(experiment, run_name=name, tags=tags).info.run_id
        params = [Param(s.split("=", 1)[0], s.split("=", 1)[1]) for s in c.overrides]
        client.log_batch(child, metrics=[Metric(k, float(v), now, 0) for k, v in c.metrics.items()], params=params,
                         tags=[RunTag("mlflow.runName", name)])
        client.set_terminated(child, "FINISHED")
    return ranked
