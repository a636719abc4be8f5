"""The time model: a training step's seconds predicted from its parts and this machine's measured rates, logged
as ``perf/predicted_tokens_per_s`` beside the measured ``perf/tokens_per_s``.

The work comes from the run's own code run on fake tensors (shapes, no data: :mod:`costlab.measure.traced`): one
micro-batch's forward, loss and backward with one and with two layers (so a pipeline stage or a 70B model costs
the same to trace), under the run's checkpointing mode and precision, counted three ways:

    flops  the matmuls' and attention's FLOPs (PyTorch's FlopCounterMode: recomputed blocks included)
    ops    every aten op dispatched (each one pays the framework's fixed cost: dispatch, autograd, a kernel launch)
    bytes  what the other ops write (pointwise work, norms, softmax, casts: bound by memory bandwidth)

and the optimizer's step once, traced with the run's own optimizer. A rank's step is then

    compute(w) = w.flops / matmul rate + w.bytes / memory bandwidth + w.ops x seconds per op
    step       = micro-batches x compute(one micro-batch on this rank) + compute(optimizer step; its ops run
                 without autograd, at the seconds per op of such a chain where one was probed)
                 + the pipeline's bubble: (pp - 1) micro-batch slots (/ stages per rank when interleaved)
                 + each collective: latency + bytes / bandwidth, both probed per kind of collective (all-reduce
                   moves 2 (n-1)/n of its bytes, all-gather and reduce-scatter (n-1)/n): DDP's gradient all-reduce
                   once per step, FSDP's all-gathers (forward and backward) per layer and micro-batch and its
                   reduce-scatters per accumulated micro-batch, tensor parallel's two all-reduces per layer forward
                   and two backward, the pipeline's sends and receives (on a GPU, FSDP's and DDP's run beside the
                   compute: what exceeds it is added, and a calibrated share of what it hides)
                 + the loss's reduction every ``trainer.log_every`` steps: a pipeline's broadcast of it, the
                   data-parallel ranks' all-reduce, each its fixed cost (:func:`loss_reduction`)

Tensor parallel divides a layer's FLOPs and bytes by its degree (not its ops: every rank runs every op). Nothing
overlaps on CPU: gloo's collectives run on the same cores as the compute. On a CPU run, what a micro-batch costs
beyond its matmuls is taken from the run's own model probed plain on the run's micro-batch (:class:`ModelProbe`):
less the ops' fixed costs, its remainder gives the rate its ops write their bytes at (a small model's pointwise
work is in cache and bound by arithmetic, not by the memory's bandwidth). FSDP, tensor parallel and DDP add what
the run's own wrapping costs, probed on the run's model (:func:`layout_seconds`: per layer and micro-batch, outside
the layers, and per step; DDP's for the one micro-batch a step it syncs, its all-reduces in it); a pipeline adds
what the run's own schedule costs beyond its stages' compute and bubble, probed on the run's stages
(:func:`schedule_seconds`: per schedule step, the sends' fixed costs and a stage's wrapping in it).

The rates are measured by probes at the end of the run, on every rank at once (:func:`probe_ranks`): the run's own
matmul shapes in its dtype, the bytes an elementwise add on large buffers writes per second, the seconds per op of
a chain of small autograd ops (and of views), each collective at two sizes, the run's model plain, and the
layout's wrapping or schedule. A plan predicts a card that is not here from its ``hardware`` option's published
figures times the efficiencies calibrated on published A100 runs (:func:`gpu_rates`). A run on a GPU probes its
own card at the end of the run (:func:`card_probes`: the run's matmul shapes, the host's dispatch per op, a large
add, the run's model plain on its micro-batch) and predicts with those in place of the calibrated shares
(:func:`card_rates`; attention's rate, the network and, across nodes, the links stay the option's), and logs its
plan's figure beside (``perf/planned_tokens_per_s``).

The parts live beside this module, each below the one that uses it:

    timemodel    the work (traced on fake tensors), the rates, and a step's seconds from them (:func:`predict_step`)
    stepprobes   the probes a run's ranks time at the end of the run, on a CPU or on its card (:func:`probe_ranks`)
    cardrates    a card's rates from its ``hardware`` option and the calibrated efficiencies (:func:`gpu_rates`)
    companions   the processes a CPU plan times its rates beside, as the node's other ranks would
    planprobes   a CPU plan's probes, in one process under a fake process group (:func:`plan_cpu_rates`)

and this one logs the prediction of a run (:func:`predicted_metrics`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from costlab.measure.cardrates import card_rates, gpu_rates
from costlab.measure.stepprobes import RankProbes, cpu_rates
from costlab.measure.timemodel import predict_step

PREDICTED_TOKENS_PER_S = "perf/predicted_tokens_per_s"
PREDICTED_STEP_MS = "perf/predicted_step_time_ms"
PLANNED_TOKENS_PER_S = "perf/planned_tokens_per_s"  # a GPU run's: its plan's prediction, from calibrated rates alone
PREDICTED_USD_TRAIN = "cost/predicted_usd_per_1m_train_tokens"
TIME_MODEL_TAG = "costlab.time_model"  # the rates and parts behind the prediction, or why there is none


def predicted_metrics(cfg: DictConfig, world: int, probes: RankProbes | None, build_optimizer: Any,
                      dtype: str = "fp32") -> tuple[dict[str, float], dict[str, str]]:
    """``perf/predicted_tokens_per_s`` and ``perf/predicted_step_time_ms`` with the tag that says what they rest
    on, or only the tag saying why there are none. ``probes``: the run's (:func:`probe_ranks`). A GPU run's rates
    are its ``hardware`` option's (:func:`gpu_rates`, in the run's matmul ``dtype``) with what its card measured in
    place of the calibrated shares (:func:`card_rates`; without probes, the option's alone); it also logs
    ``perf/planned_tokens_per_s``, what a plan of the run predicts from the option's calibrated rates alone."""
    hw = cfg.hardware
    cpu = cfg.trainer.device == "cpu"
    if not cpu and not (hw.get("memory_bandwidth_gbps") and dtype in (hw.get("peak_tflops") or {})):
        return {}, {TIME_MODEL_TAG: f"no prediction: hardware={hw.name} names no memory bandwidth or {dtype} peak"}
    if cpu and probes is None:
        return {}, {TIME_MODEL_TAG: "no prediction: no probes ran on this CPU"}
    out: dict[str, float] = {}
    try:
        if cpu:
            rates = cpu_rates(cfg, probes)
        else:
            plan = predict_step(cfg, world, gpu_rates(cfg, dtype), build_optimizer)
            out[PLANNED_TOKENS_PER_S] = plan.tokens_per_s
            rates = card_rates(cfg, dtype, probes) if probes is not None else gpu_rates(cfg, dtype)
        prediction = predict_step(cfg, world, rates, build_optimizer)
        if not cpu and probes is None:
            prediction.notes.append("the card's probes failed on a rank (its log says why): the plan's rates")
    except Exception as e:  # a model or optimizer the fake trace cannot run costs the run its prediction only
        return {}, {TIME_MODEL_TAG: f"no prediction: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    from costlab.measure.hardware import usd_per_hour

    out.update({PREDICTED_TOKENS_PER_S: prediction.tokens_per_s, PREDICTED_STEP_MS: 1000 * prediction.step_s})
    price = usd_per_hour(cfg)
    if price is not None:  # beside the measured cost/usd_per_1m_train_tokens, at the same price
        out[PREDICTED_USD_TRAIN] = price / (prediction.tokens_per_s * 3600) * 1e6
    return out, {TIME_MODEL_TAG: prediction.tag(rates)}
