"""trainer.resume: the config and MLflow run of the run to continue."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf, open_dict

from costlab import status
from costlab.schema import ConfigError
from costlab.tracking.find import find_run, get_run
from costlab.training.checkpoint import latest

# the only overrides a resumed run takes: the rest is the run's own config
RESUME_KEEPS = ("trainer.resume", "trainer.max_restarts", "trainer.checkpoint_interval", "trainer.checkpoint_keep",
                "trainer.checkpoint_async", "tracking.uri")


def resume_target(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, str]:
    """``trainer.resume=<run id or run folder>``: the config of the run to continue (its own, resolved,
    with the overrides :data:`RESUME_KEEPS` allows) and its MLflow run id. Refuses, with one line, a run
    that finished, still runs, or has no checkpoint. No torch: it runs in the launcher."""
    value = str(cfg.trainer.resume)
    key = "trainer.resume"
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    extra = [o for k, o in given.items() if k not in RESUME_KEEPS]
    if extra:
        raise ConfigError(key, value, f"continues the run with its own config; drop {extra[0]} (a resume takes only "
                          f"{', '.join(RESUME_KEEPS[1:])})")
    uri = str(cfg.tracking.uri)
    try:
        run_dir, found_id = find_run(value, uri)
    except ValueError as e:
        raise ConfigError(key, value, str(e)) from None
    if found_id is None:
        raise ConfigError(key, value, "the folder's config.yaml names no MLflow run: the run was not tracked")
    run_id = found_id
    run = get_run(uri, run_id)
    if run is None:
        raise ConfigError(key, value, f"MLflow run {run_id} is not in {uri}")
    if run.info.status == status.FINISHED:
        raise ConfigError(key, value, "the run FINISHED: there is nothing to resume")
    if run.info.status == status.RUNNING:
        raise ConfigError(key, value, "the run is still RUNNING (its launcher is alive)")
    found = latest(run_dir, run_id)
    if found is None:
        raise ConfigError(key, value, f"{run_dir} holds no checkpoint (the run had trainer.checkpoint_interval=0)")
    old = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(old):
        for k in RESUME_KEEPS:
            section, _, name = k.partition(".")
            if k in given or k == key:
                old[section][name] = cfg[section][name]
        old.runtime.ended_at = (run.info.end_time or 0) / 1000 or None
    print(f"costlab: resuming run {run_id} ({run.info.status}) from {found[1].name} in {run_dir}", file=sys.stderr,
          flush=True)
    return old, run_id
