"""``trainer.init_from``: find a saved model, check it fits the configured model, load it.

Everything but :func:`load_init` runs in the launcher, so it never imports torch: the expected
parameter shapes come from the model config (:func:`expected_shapes` mirrors ``model.py``; a test keeps
the two in step), and the shapes in a checkpoint come from reading its pickle with stand-ins for
torch's classes, so no code from the file runs.
"""

from __future__ import annotations

import collections
import fnmatch
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

CHECKPOINT_TAG = "costlab.checkpoint"  # MLflow tag: the trained, uncompressed model file of a run
# the same file name in a subfolder: torch.save names its zip entries after the file, so equal names
# keep the two sizes comparable to the byte
UNCOMPRESSED = "uncompressed/model.pt"
FINAL = "model.pt"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _linear(shapes: dict, name: str, out: int, inp: int, bias: bool) -> None:
    shapes[f"{name}.weight"] = (out, inp)
    if bias:
        shapes[f"{name}.bias"] = (out,)


def expected_shapes(m: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
    """(state-dict key -> shape, Linear layer name -> (out, in)) of the model a ``model`` config builds."""
    shapes: dict[str, tuple[int, ...]] = {}
    if str(m["_target_"]).endswith("MLPLM"):
        v, c, h, ctx = m["vocab_size"], m["n_embd"], m["hidden"], m["context"]
        shapes["wte.weight"] = (v, c)
        _linear(shapes, "c_fc", h, ctx * c, True)
        _linear(shapes, "c_proj", c, h, True)
        _linear(shapes, "lm_head", v, c, True)
        return shapes, {"c_fc": (h, ctx * c), "c_proj": (c, h), "lm_head": (v, c)}
    v, c, bias = m["vocab_size"], m["n_embd"], bool(m.get("bias", False))
    hidden = int(m.get("mlp_ratio", 4.0) * c)
    swiglu = m.get("mlp", "gelu") == "swiglu"
    if swiglu:
        hidden = 2 * hidden // 3
    norm_bias = bias and m.get("norm", "layernorm") == "layernorm"
    linears: dict[str, tuple[int, int]] = {}

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (c,)
        if norm_bias:
            shapes[f"{name}.bias"] = (c,)

    shapes["wte.weight"] = (v, c)
    if m.get("pos", "learned") == "learned":
        shapes["wpe.weight"] = (m["block_size"], c)
    for i in range(m["n_layer"]):
        b = f"blocks.{i}"
        norm(f"{b}.ln_1")
        layers = {f"{b}.attn.{p}": (c, c) for p in ("c_q", "c_k", "c_v", "c_proj")}
        norm(f"{b}.ln_2")
        layers[f"{b}.mlp.c_fc"] = (hidden, c)
        if swiglu:
            layers[f"{b}.mlp.c_fc2"] = (hidden, c)
        layers[f"{b}.mlp.c_proj"] = (c, hidden)
        for name, (out, inp) in layers.items():
            _linear(shapes, name, out, inp, bias)
        linears.update(layers)
    norm("ln_f")
    shapes["lm_head.weight"] = (v, c)
    linears["lm_head"] = (v, c)
    return shapes, linears


def match_targets(names: list[str], targets: Any) -> list[str]:
    """The layer names matching any of the glob patterns in ``targets`` (a string or a list)."""
    patterns = [targets] if isinstance(targets, str) else list(targets or [])
    return [n for n in names if any(fnmatch.fnmatchcase(n, str(p)) for p in patterns)]


# --- reading a torch.save file without torch ---------------------------------------------------------


class _Tensor:
    def __init__(self, shape: tuple[int, ...] | None):
        self.shape = shape


class _Opaque:
    """Whatever a checkpoint builds that is not a plain tensor (a quantized tensor subclass, say)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_tensor(storage, offset, size, *rest) -> _Tensor:
    return _Tensor(tuple(int(s) for s in size))


def _rebuild_parameter(data, *rest) -> Any:
    return data


class _ShapeReader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        return _Opaque  # never import what the file names

    def persistent_load(self, pid: Any) -> None:
        return None


def read_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """Key -> shape of a state dict saved by ``torch.save`` (None for a non-plain tensor)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            state = _ShapeReader(z.open(pkl)).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"not a torch.save state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError("holds no state dict")
    return {k: v.shape if isinstance(v, _Tensor) else None for k, v in state.items()}


# --- trainer.init_from ------------------------------------------------------------------------------


def resolve_init_from(value: Any, tracking_uri: str) -> Path:
    """A checkpoint file, a run folder holding one, or an MLflow run id in ``tracking_uri``."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        found = [path / f for f in (UNCOMPRESSED, FINAL) if (path / f).is_file()]
        if not found:
            raise ValueError(f"the folder holds neither {UNCOMPRESSED} nor {FINAL}")
        return found[0]
    if path.is_file():
        return path
    if not RUN_ID.match(text):
        raise ValueError("no such file or folder, and not an MLflow run id")
    from costlab.tracking import client

    try:
        run = client(tracking_uri).get_run(text)
    except Exception:  # the store says "not found" in several ways across MLflow versions
        raise ValueError(f"no such file, and no MLflow run with this id in {tracking_uri}") from None
    saved = run.data.tags.get(CHECKPOINT_TAG)
    if not saved:
        raise ValueError(f"MLflow run {text} saved no model (status {run.info.status})")
    if not Path(saved).is_file():
        raise ValueError(f"the model MLflow run {text} saved, {saved}, is gone")
    return Path(saved)


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
    """Load ``trainer.init_from`` into a freshly built ``model`` (the worker's side); return the file."""
    import torch

    path = resolve_init_from(cfg.trainer.init_from, cfg.tracking.uri)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path
