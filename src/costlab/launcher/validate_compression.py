"""The launcher's checks for the ``pruning`` and ``quantization`` groups: ``trainer.init_from`` must fit the
configured model, and each group's option checks itself against the model's Linear layers, read from
the model built on the meta device (torch only when something is compressed; never CUDA)."""

from __future__ import annotations

from omegaconf import DictConfig

from costlab.pruning import build_pruning
from costlab.quantization import build_quantization
from costlab.schema import ConfigError


def check_compression(cfg: DictConfig) -> None:
    from costlab.models.saved import check_fits, expected_shapes
    from costlab.tracking.find import resolve_init_from

    init_from = cfg.trainer.get("init_from")
    if init_from:
        try:
            check_fits(resolve_init_from(init_from, cfg.tracking.uri), cfg.model)
        except ValueError as e:
            raise ConfigError("trainer.init_from", init_from, str(e)) from None
    options = [o for o in (build_pruning(cfg), build_quantization(cfg)) if o.active]
    if not options:
        return
    _, linears = expected_shapes(cfg.model)
    for option in options:
        option.check(cfg, linears)
