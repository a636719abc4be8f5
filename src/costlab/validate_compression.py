"""The launcher's checks for the ``pruning`` and ``quantization`` groups (no torch import here either)."""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.errors import ConfigError, non_negative_int, positive_float, positive_int, value_at
from costlab.hardware import require_gpu

TRAIN_TIME_PARALLELISM = ("single", "ddp")  # train-time compression needs every rank to hold whole weights
GRADUAL_PRUNING = ("l1_unstructured", "random_unstructured", "ln_structured")
GPU_QUANTIZATION = {"int4_weight_only": ((8, 0), "tinygemm int4 kernels"), "fp8": ((8, 9), "float8 tensor cores")}


def check_compression(cfg: DictConfig) -> None:
    from costlab.checkpoint import check_fits, expected_shapes, resolve_init_from

    init_from = cfg.trainer.get("init_from")
    if init_from:
        try:
            check_fits(resolve_init_from(init_from, cfg.tracking.uri), cfg.model)
        except ValueError as e:
            raise ConfigError("trainer.init_from", init_from, str(e)) from None
    if cfg.pruning.name == "none" and cfg.quantization.name == "none":
        return
    _, linears = expected_shapes(cfg.model)
    if cfg.pruning.name != "none":
        _check_pruning(cfg, linears)
    if cfg.quantization.name != "none":
        _check_quantization(cfg, linears)


def _targets(cfg: DictConfig, key: str, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    from costlab.checkpoint import match_targets

    value = value_at(cfg, key)
    if not (isinstance(value, str) or OmegaConf.is_list(value)) or not value:
        raise ConfigError(key, value, "must be a glob pattern over Linear layer names, or a list of them")
    found = match_targets(list(linears), value)
    if not found:
        some = ", ".join(list(linears)[:3])
        raise ConfigError(key, value, f"matches no Linear layer of model={cfg.model.name} (it has {some}, ...)")
    return {n: linears[n] for n in found}


def _train_time(cfg: DictConfig, key: str, value: Any, what: str) -> None:
    if cfg.parallelism.name not in TRAIN_TIME_PARALLELISM:
        raise ConfigError(key, value, f"{what} runs during training, on whole weights; it supports parallelism="
                          f"{' or '.join(TRAIN_TIME_PARALLELISM)}, not {cfg.parallelism.name}")


def _check_pruning(cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
    p, t = cfg.pruning, cfg.trainer
    amount = p.amount
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ConfigError("pruning.amount", amount, "must be a fraction in [0, 1)")
    layers = _targets(cfg, "pruning.targets", linears)
    scope = p.get("scope", "local")
    if scope not in ("local", "global"):
        raise ConfigError("pruning.scope", scope, "choose local or global")
    if scope == "global" and p.name not in ("l1_unstructured", "random_unstructured"):
        raise ConfigError("pruning.scope", scope, f"only l1_unstructured and random_unstructured rank weights "
                          f"across layers; pruning={p.name} is local")
    schedule = p.get("schedule", "oneshot")
    if schedule not in ("oneshot", "gradual"):
        raise ConfigError("pruning.schedule", schedule, "choose oneshot or gradual")
    if schedule == "gradual":
        if p.name not in GRADUAL_PRUNING:
            raise ConfigError("pruning.schedule", schedule, f"gradual works with {', '.join(GRADUAL_PRUNING)}")
        if t.max_steps == 0:
            raise ConfigError("pruning.schedule", schedule, "prunes during training, and trainer.max_steps=0")
        _train_time(cfg, "pruning.schedule", schedule, "gradual pruning")
        start = non_negative_int(cfg, "pruning.start_step")
        end = t.max_steps if p.end_step is None else non_negative_int(cfg, "pruning.end_step")
        if not start < end <= t.max_steps:
            raise ConfigError("pruning.end_step", p.end_step, f"need pruning.start_step={start} < end_step <= "
                              f"trainer.max_steps={t.max_steps}")
        positive_int(cfg, "pruning.frequency")
    non_negative_int(cfg, "pruning.recovery_steps")
    if p.get("recovery_lr") is not None:
        positive_float(cfg, "pruning.recovery_lr")
    if p.name == "ln_structured":
        positive_float(cfg, "pruning.n")
        if p.dim not in (0, 1):
            raise ConfigError("pruning.dim", p.dim, "0 prunes output rows, 1 input columns")
    elif p.name == "structured":
        parts = list(p.parts) if OmegaConf.is_list(p.parts) else [p.parts]
        if not parts or set(parts) - {"mlp", "attn"}:
            raise ConfigError("pruning.parts", p.parts, "a list of mlp and/or attn")
        mlp = any(".mlp." in n or n in ("c_fc", "c_proj") for n in layers)
        attn = any(".attn." in n for n in layers)
        if not (("mlp" in parts and mlp) or ("attn" in parts and attn)):
            raise ConfigError("pruning.parts", p.parts, "none of these parts is among pruning.targets")
    elif p.name == "semi_structured":
        _check_two_four(cfg, layers)
    elif p.name == "wanda":
        n = p.get("calibration_batches")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError("pruning.calibration_batches", n, "wanda weighs weights by activations and needs "
                              "calibration data: a positive number of training batches")


def _check_two_four(cfg: DictConfig, layers: dict[str, tuple[int, int]]) -> None:
    p = cfg.pruning
    if p.amount != 0.5:
        raise ConfigError("pruning.amount", p.amount, "semi_structured is the 2:4 pattern, so exactly 0.5")
    for name, (_, inp) in layers.items():
        if inp % 4:
            raise ConfigError("pruning.targets", p.targets, f"2:4 needs input widths divisible by 4; {name} has {inp}")
    if not isinstance(p.allow_mask_only, bool):
        raise ConfigError("pruning.allow_mask_only", p.allow_mask_only, "must be true or false")
    if p.allow_mask_only:
        return
    require_gpu("pruning", "semi_structured", cfg, (8, 0),
                "2:4 sparse kernels; pruning.allow_mask_only=true keeps the masks without a speed-up")
    if cfg.precision.get("autocast_dtype") not in ("float16", "bfloat16"):
        raise ConfigError("precision", cfg.precision.name, "the 2:4 sparse kernels take fp16/bf16; use "
                          "precision=bf16 or fp16 with pruning=semi_structured")
    for name, (out, inp) in layers.items():
        if out % 32 or inp % 64:
            raise ConfigError("pruning.targets", p.targets, f"2:4 kernels need (out, in) multiples of (32, 64); "
                              f"{name} is ({out}, {inp})")
    if cfg.quantization.name != "none":
        raise ConfigError("quantization", cfg.quantization.name, "does not combine with the 2:4 sparse kernels; "
                          "use pruning.allow_mask_only=true to quantize a 2:4-masked model")


def _check_quantization(cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:

    q, t = cfg.quantization, cfg.trainer
    layers = _targets(cfg, "quantization.targets", linears)
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("quantization", q.name, "needs torchao: pip install 'costlab[quant]'")
    if q.name in GPU_QUANTIZATION:
        capability, what = GPU_QUANTIZATION[q.name]
        require_gpu("quantization", q.name, cfg, capability, what)
        if cfg.precision.get("autocast_dtype") != "bfloat16":
            raise ConfigError("precision", cfg.precision.name, f"quantization={q.name} runs bf16 kernels; "
                              "use precision=bf16")
    if q.name == "int4_weight_only":
        group = q.group_size
        if group not in (32, 64, 128, 256):
            raise ConfigError("quantization.group_size", group, "choose 32, 64, 128 or 256")
        for name, (_, inp) in layers.items():
            if inp % group:
                raise ConfigError("quantization.group_size", group, f"must divide every targeted input width; "
                                  f"{name} has {inp}")
    if q.name == "fp8":
        for name, (out, inp) in layers.items():
            if out % 16 or inp % 16:
                raise ConfigError("quantization.targets", q.targets, f"float8 matmuls need widths divisible by 16; "
                                  f"{name} is ({out}, {inp})")
    if q.name == "qat_int8":
        steps = positive_int(cfg, "quantization.qat_steps")
        if steps > t.max_steps:
            raise ConfigError("quantization.qat_steps", steps, f"exceeds trainer.max_steps={t.max_steps}: QAT "
                              "fake-quantizes the last qat_steps training steps")
        _train_time(cfg, "quantization", q.name, "quantization-aware training")
