"""Saved-model files: the model a run ships (``model.pt``) and its uncompressed twin, their shapes, whether one
fits a configured model (``trainer.init_from``), and loading them back.

The launcher's checks import torch but never initialise CUDA: the expected shapes come from the model
built on the meta device, and a checkpoint's shapes from ``torch.load(mmap=True, weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


CHECKPOINT_TAG = "costlab.checkpoint"  # MLflow tag: the trained, uncompressed model file of a run


# the same file name in a subfolder: torch.save names its zip entries after the file, so equal names
# keep the two sizes comparable to the byte
UNCOMPRESSED = "uncompressed/model.pt"


FINAL = "model.pt"


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def expected_shapes(model_cfg: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
    """(state-dict key -> shape, Linear layer name -> (out, in)) of the model a ``model`` config builds,
    read from the model itself built on the meta device: no memory, no compute, no mirror to keep in step."""
    from torch import nn

    from costlab.models.gpt import build_model
    from costlab.models.meta import on_meta

    with on_meta():
        model = build_model(model_cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return shapes, linears


def match_targets(names: list[str], targets: Any) -> list[str]:
    """The layer names matching any of the glob patterns in ``targets`` (a string or a list)."""
    patterns = [targets] if isinstance(targets, str) else list(targets or [])
    return [n for n in names if any(fnmatch.fnmatchcase(n, str(p)) for p in patterns)]


def read_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """Key -> shape of a state dict saved by ``torch.save`` (None for a non-plain tensor such as a
    quantized one). Memory-mapped and ``weights_only``: no tensor data is read and no code from the file runs."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # not a zip, not a pickle, or a tensor type weights_only does not allow
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in why or "Unsupported global" in why:
            raise ValueError("holds compressed (quantized) weights; start from the run's "
                             f"{UNCOMPRESSED}") from None
        raise ValueError(f"not a torch.save state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError("holds no state dict")
    return {k: tuple(v.shape) if type(v) in (torch.Tensor, torch.nn.Parameter) else None for k, v in state.items()}


def trained_model_file(run_dir: Path) -> Path | None:
    """The trained, uncompressed model a run folder holds: what ``trainer.init_from=<run>`` starts from."""
    found = [run_dir / f for f in (UNCOMPRESSED, FINAL) if (run_dir / f).is_file()]
    return found[0] if found else None


def check_fits(path: Path, model_cfg: Any) -> None:
    """Raise ``ValueError`` naming the first key whose presence or shape differs from the model's."""
    found = read_shapes(path)
    want, _ = expected_shapes(model_cfg)
    name = model_cfg.get("name", "the model")
    for key, shape in want.items():
        if key not in found:
            raise ValueError(f"{path.name} lacks {key}: it is not a {name} model")
        if found[key] is None:
            raise ValueError(f"{path.name} holds a compressed {key}; start from the run's {UNCOMPRESSED}")
        if found[key] != shape:
            raise ValueError(f"{key} is {found[key]} in {path.name} but {shape} in model={name}")
    extra = sorted(set(found) - set(want))
    if extra:
        raise ValueError(f"{path.name} has {extra[0]}, which model={name} does not")


def load_init(model: Any, cfg: Any) -> Path:
    """Load ``trainer.init_from`` into a freshly built ``model`` (the worker's side); return the file. The
    launcher has resolved a run id or folder into the file (``runtime.init_from``): ranks never ask MLflow."""
    import torch

    path = Path(cfg.runtime.init_from)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path


def load_model(model_cfg: Any, path: Path, device: str | torch.device = "cpu", engine: str | None = None) -> nn.Module:
    """Rebuild a saved (possibly pruned and quantized) model: layers a structured prune shrank are
    resized to the file's shapes, torchao tensors are loaded as they were saved, and layers saved as
    PyTorch dynamic int8 Linears become such layers again, packed for ``engine`` (default: the current
    quantized engine)."""
    import torch
    from torch import nn

    from costlab.models.gpt import build_model
    from costlab.quantization.pytorch_int8 import rebuild as rebuild_int8

    try:
        import torchao.quantization  # noqa: F401  (allow-lists torchao's tensor types for weights_only)
    except ImportError:
        pass
    # read on the CPU and moved whole afterwards: a float8 model (torchao 0.17, torch 2.11) mapped straight to
    # 'cuda' was refused by assign=True ("set the storage of a tensor on device cuda:0 to a storage on cuda")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(model_cfg)
    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if isinstance(m, nn.Linear) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            parent, _, attr = name.rpartition(".")
            small = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, attr, small)
    rebuild_int8(model, state, engine)
    model.load_state_dict(state, assign=True)
    model.to(device)
    head, emb = state.get("lm_head.weight"), state.get("wte.weight")
    if head is not None and emb is not None and type(head) is torch.Tensor and type(emb) is torch.Tensor:
        if head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr():
            model.lm_head.weight = model.wte.weight  # torch.save kept the tie; assign=True broke it
    return model.eval()
