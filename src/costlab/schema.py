"""One typed schema for every key a run reads, and the one error a user sees for a bad config.

Each section of the config has a schema: ``trainer``, ``tracking``, ``plan``, ``report`` and the top-level
keys are dataclasses here, as are the options of the groups whose code takes plain values (``precision``,
``parallelism``, ``hardware``, ``data``, ``model``); the ``pruning`` and ``quantization`` options are the
signatures of their ``_target_`` classes, whose ``check`` methods hold their ranges. A field's type is
checked as written (``int`` takes no ``True``, ``float`` takes an int, ``X | None`` takes null) and its
range or choices by the check in its metadata, all in :func:`check_config`, before any rank starts.

No torch here: the launcher checks every job with it, and a sweep must start fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import stat
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from costlab import CONF_DIR
from costlab.files import is_text, pysource_files, text_files


class ConfigError(ValueError):
    """``key=value: why`` — printed as one line by ``run.py``, which then exits 2."""

    def __init__(self, key: str, value: Any, why: str):
        super().__init__(f"{key}={value}: {why}")
        self.key, self.value, self.why = key, value, why


# --- checks a field's metadata names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """``lo <= value`` (or ``<``, when ``lo_open``) and ``value <= hi`` (or ``<``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: float) -> str | None:
        low = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return None if low and high else f"must be {self}"

    def __str__(self) -> str:
        if self.lo == 0 and self.lo_open and self.hi is None:
            return "positive"
        if self.lo is not None and self.hi is None:
            return f"at least {self.lo:g}" if not self.lo_open else f"above {self.lo:g}"
        if self.lo is None and self.hi is not None:
            return f"at most {self.hi:g}" if not self.hi_open else f"below {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
AT_LEAST_0 = Range(0)
FRACTION = Range(0, 1)  # [0, 1]
UNIT_OPEN = Range(0, 1, lo_open=True)  # (0, 1]
BELOW_1 = Range(0, 1, hi_open=True)  # [0, 1)


def degree(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "must be a positive degree, or -1 for the rest of the world"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"choose one of {', '.join(map(str, choices))}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def key(default: Any, check: Callable[[Any], str | None] | None = None, why: str = "") -> Any:
    """A schema field: its default (the YAML's value is the one a run uses; this one is for readers of the
    schema), the check of its value, and why that check (said after the refusal)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: list(default), metadata={"check": check, "why": why})
    return field(default=default, metadata={"check": check, "why": why})


# --- the sections --------------------------------------------------------------------------------------------

PRECISION_OPTIONS = tuple(sorted(p.stem for p in (CONF_DIR / "precision").glob("*.yaml")))
CHECKPOINTING_MODES = ("none", "selective", "full")  # trainer.activation_checkpointing's


@dataclass
class Top:
    optimized_metric: str | list[str]  # a metric name, or a list of them (several objectives)
    mode: str = key("train", one_of("train", "plan"))


@dataclass
class Trainer:
    max_steps: int = key(250, AT_LEAST_0)
    seed: int = key(1337, AT_LEAST_0)
    device: str = key("auto", one_of("auto", "cpu", "cuda"))
    nproc_per_node: int = key(1, POSITIVE)
    nnodes: int = key(1, POSITIVE)
    node_rank: int = key(0, AT_LEAST_0)
    rdzv_endpoint: str | None = None
    rdzv_id: str = key("costlab", non_empty)
    batch_size: int = key(32, POSITIVE)
    grad_accum_steps: int = key(1, POSITIVE)
    init_from: str | None = None
    checkpoint_interval: int = key(0, AT_LEAST_0)
    checkpoint_keep: int = key(2, POSITIVE)
    checkpoint_async: bool = False
    max_restarts: int = key(0, AT_LEAST_0)
    resume: str | None = None
    activation_checkpointing: str = key("none", one_of(*CHECKPOINTING_MODES))
    compile: bool = False
    lr: float = key(3e-3, POSITIVE)
    min_lr_ratio: float = key(0.1, FRACTION)
    warmup_steps: int = key(20, AT_LEAST_0)
    weight_decay: float = key(0.1, AT_LEAST_0)
    betas: tuple[float, float] = key([0.9, 0.95], BELOW_1)
    grad_clip: float | None = key(1.0, POSITIVE)
    eval_interval: int = key(100, AT_LEAST_0)
    eval_batches: int = key(8, POSITIVE)
    eval_batch_size: int = key(32, POSITIVE)
    timing_warmup_steps: int = key(5, AT_LEAST_0)
    infer_batch_size: int = key(8, POSITIVE)
    infer_iters: int = key(10, POSITIVE)
    gen_prompt_len: int = key(32, POSITIVE)
    gen_tokens: int = key(16, Range(2), "the first token is the prefill's: decoding speed needs one more")
    gen_batch_size: int = key(1, POSITIVE)
    gen_iters: int = key(5, POSITIVE)
    log_every: int = key(1, POSITIVE)
    print_every: int = key(50, POSITIVE)


@dataclass
class Tracking:
    uri: str = key("sqlite:///outputs/mlflow.db", non_empty)
    experiment_name: str = key("costlab", non_empty)
    run_name: str | None = None
    log_model: bool = True
    system_metrics_s: float = key(10.0, AT_LEAST_0, "seconds between samples of MLflow's system metrics; 0: none")


@dataclass
class Plan:
    mfu: float | None = key(None, UNIT_OPEN, "an assumed model FLOPs utilisation instead of the time model")
    tokens: float | None = key(None, POSITIVE, "the training tokens to price (default: trainer.max_steps' tokens)")
    search: bool = key(False, None, "rank every layout of the devices by predicted cost")
    precisions: list[str] | None = key(None, one_of(*PRECISION_OPTIONS), "the precisions a search tries; null: every "
                                       "one the card has a peak for")
    checkpointing: list[str] | None = key(None, one_of(*CHECKPOINTING_MODES), "the activation checkpointing "
                                          "modes a search tries; null: all three")


@dataclass
class Report:
    baseline: str | None = None


@dataclass
class Serve:
    enabled: bool = True
    max_concurrency: int = key(32, POSITIVE, "the ladder 1, 2, 4, … ends here, or at what fits serve.memory_gb")
    requests: int = key(16, POSITIVE)
    prompt_len: tuple[int, int] = key([8, 48], POSITIVE, "[shortest, longest] prompt tokens")
    output_len: tuple[int, int] = key([8, 32], Range(2), "[shortest, longest] output tokens: a time per output "
                                      "token needs two")
    seed: int = key(0, AT_LEAST_0)
    tpot_ms_p99: float = key(50.0, POSITIVE, "the latency target's p99 time per output token")
    ttft_ms_p99: float = key(1000.0, POSITIVE, "the latency target's p99 time to first token")
    memory_gb: float | None = key(None, POSITIVE, "what weights and KV cache may take; null: the device's memory")
    kv_cache_dtype: str = key("auto", one_of("auto", "bf16", "fp8", "int8"))

    def check(self) -> None:
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"serve.{name}", [lo, hi], "[shortest, longest]: the shortest exceeds the longest")


@dataclass
class Precision:
    name: str
    autocast_dtype: str | None = key(None, one_of(None, "float16", "bfloat16"))
    grad_scaler: bool = False
    float8: bool = False
    recipe: str = key("tensorwise", one_of("tensorwise", "rowwise", "rowwise_with_gw_hp"))


@dataclass
class Parallelism:
    name: str
    nproc_per_node: int = key(1, POSITIVE)
    pp_degree: int = key(1, degree)
    dp_replicate: int = key(1, degree)
    dp_shard: int = key(1, degree)
    tp_degree: int = key(1, degree)
    reshard_after_forward: bool = True
    offload: str = key("none", one_of("none", "cpu"))
    bucket_cap_mb: float = key(25, POSITIVE)
    schedule: str = key("1f1b", one_of("gpipe", "1f1b", "interleaved_1f1b"))
    microbatches: int = key(4, POSITIVE)
    stages_per_rank: int = key(2, POSITIVE)


@dataclass
class Hardware:
    name: str
    peak_tflops: dict[str, float] | None = key(None, POSITIVE)
    memory_gb: float | None = key(None, POSITIVE)
    memory_bandwidth_gbps: float | None = key(None, POSITIVE)
    attainable_tflops: dict[str, float] | None = key(None, POSITIVE, "published maximum achievable matmul TFLOP/s")
    attention_tflops: float | None = key(None, POSITIVE, "published fused attention TFLOP/s, forward and backward")
    nvlink_gbps: float | None = key(None, POSITIVE, "GB/s one way between two GPUs of a node")
    network_gbps: float | None = key(None, POSITIVE, "GB/s one way per GPU between nodes")
    usd_per_hour: float | None = key(None, AT_LEAST_0, "US dollars per device hour")
    usd_per_core_hour: float | None = key(None, AT_LEAST_0, "US dollars per core hour")
    match: list[str] = key([])
    probe_cache: str | None = None


# --- the models and the data: options named by their _target_ ------------------------------------------------


@dataclass
class ByteLM:
    """What costlab's own models share: a byte vocabulary (at least) and a context length."""

    name: str
    vocab_size: int = key(256, Range(256), "byte-level data needs at least 256")
    block_size: int = key(128, POSITIVE)


@dataclass
class GPT(ByteLM):
    """``costlab.models.gpt.GPT``: costlab's GPT family (``GPTConfig``'s fields)."""

    n_layer: int = key(4, POSITIVE)
    n_head: int = key(4, POSITIVE)
    n_embd: int = key(128, POSITIVE)
    mlp_ratio: float = key(4.0, POSITIVE)
    mlp_multiple_of: int = key(1, POSITIVE)
    bias: bool = False
    dropout: float = key(0.0, BELOW_1)
    norm: str = key("layernorm", one_of("layernorm", "rmsnorm"))
    pos: str = key("learned", one_of("learned", "rope"))
    mlp: str = key("gelu", one_of("gelu", "swiglu"))
    tie_weights: bool = True


@dataclass
class MLPLM(ByteLM):
    """``costlab.models.gpt.MLPLM``: the no-attention baseline."""

    context: int = key(8, POSITIVE)
    n_embd: int = key(64, POSITIVE)
    hidden: int = key(512, POSITIVE)


@dataclass
class HFCausalLM:
    """``costlab.models.hf.HFCausalLM``: any Hugging Face causal LM."""

    name: str
    pretrained: str | None = None
    config: str | None = None
    block_size: int = key(128, POSITIVE)
    attn_implementation: str = key("sdpa", one_of("sdpa", "eager", "flex_attention", "flash_attention_2",
                                                  "flash_attention_3"))
    tokenizer: str = key("auto", one_of("auto", "bytes"))


class DataOption:
    """What every ``data`` option says of itself: where its text comes from, and what it checks beyond the
    types of its keys."""

    def corpus_files(self) -> tuple[str, list[Path]]:
        """Where the text is read (a path or a description) and its files, if any."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse what the keys' types and ranges cannot say (a path that holds no text)."""


@dataclass
class Pysource(DataOption):
    """``costlab.data.pysource``: the installed Python standard library's ``.py`` files."""

    name: str
    pattern: str = key("*.py", non_empty)

    def corpus_files(self) -> tuple[str, list[Path]]:
        root, files = pysource_files(self.pattern)
        return f"{root}/{self.pattern}", files


@dataclass
class Textfile(DataOption):
    """``costlab.data.textfile``: any local UTF-8 file or folder of them."""

    name: str
    path: str = key("???", non_empty, "data=textfile reads data.path=/path/to/text (a file or a folder of UTF-8 text)")

    def corpus_files(self) -> tuple[str, list[Path]]:
        root = Path(self.path).expanduser()
        return str(root.resolve()), text_files(root)

    def check(self) -> None:
        check_text_path("data.path", self.path)


@dataclass
class Synthetic(DataOption):
    """``costlab.data.synthetic``: a Markov language with a known entropy floor."""

    name: str
    n_bytes: int = key(1_000_000, POSITIVE)
    alphabet: int = key(16, Range(2, 256))
    concentration: float = key(0.2, POSITIVE)
    seed: int = key(1234, AT_LEAST_0)

    def corpus_files(self) -> tuple[str, list[Path]]:
        # generated text: the source is the generator and its settings
        target = "costlab.data.synthetic"
        settings = {"_target_": target, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        del settings["name"]
        return f"{target}({json.dumps(settings, sort_keys=True, default=str)})", []


# --- the optimizers: options named by the constructor they call -------------------------------------------------


FP32_BYTES = 4


@dataclass
class OptimizerOption:
    """What every ``optimizer`` option says of itself. Its keys are its constructor's arguments beyond those
    the trainer gives every optimizer: the parameters (matrices decay, vectors do not), ``lr`` (the trainer's
    warm-up and cosine schedule moves it) and, to the optimizers that take them, ``betas`` and
    ``weight_decay``."""

    name: str

    needs: ClassVar[str | None] = None  # the package its constructor comes from, beyond torch
    # whether its step runs PyTorch's foreach implementation on a GPU, which makes a temporary of one fp32 value per
    # trained parameter beside the gradients (costlab.measure.memory.optimizer_step_bytes); torchao's update tensor
    # by tensor
    foreach_step: ClassVar[bool] = False

    def state_bytes(self, numel: int) -> int:
        """Bytes of optimizer state this option keeps for a parameter (or a rank's shard of one) of ``numel``
        elements: the memory model's term, checked against the state tensors a run holds."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse what the keys' types and ranges cannot say."""
        if self.needs and importlib.util.find_spec(self.needs) is None:
            raise ConfigError("optimizer", self.name, f"needs {self.needs}: pip install 'costlab[quant]'")


@dataclass
class AdamW(OptimizerOption):
    """``torch.optim.AdamW``: fp32 ``exp_avg`` and ``exp_avg_sq``, and a float32 step counter per parameter."""

    eps: float = key(1e-8, POSITIVE)

    foreach_step: ClassVar[bool] = True

    def state_bytes(self, numel: int) -> int:
        return 2 * FP32_BYTES * numel + FP32_BYTES


@dataclass
class QuantizedAdamW(OptimizerOption):
    """torchao's AdamW whose two states are held in ``bits`` per value with one fp32 scale per ``block_size``
    values and a lookup table of 2^bits fp32 codes per state tensor; the update is computed in fp32
    (``torch.compile``'d). As bitsandbytes does, only a tensor of at least 4096 values that ``block_size``
    divides is quantized: smaller ones keep fp32 states."""

    eps: float = key(1e-8, POSITIVE)
    block_size: int = key(256, POSITIVE)
    bf16_stochastic_round: bool = False

    needs: ClassVar[str | None] = "torchao"
    bits: ClassVar[int] = 8
    MIN_NUMEL: ClassVar[int] = 4096

    def quantized(self, numel: int) -> bool:
        return numel >= self.MIN_NUMEL and numel % self.block_size == 0

    def state_bytes(self, numel: int) -> int:
        if not self.quantized(numel):
            return 2 * FP32_BYTES * numel + FP32_BYTES
        one = numel * self.bits // 8 + FP32_BYTES * (numel // self.block_size) + FP32_BYTES * 2**self.bits
        return 2 * one + FP32_BYTES


@dataclass
class AdamW8bit(QuantizedAdamW):
    """``torchao.optim.AdamW8bit``: 8-bit dynamic-tree codes, 256 values per scale."""


@dataclass
class AdamW4bit(QuantizedAdamW):
    """``torchao.optim.AdamW4bit``: 4-bit codes (two per byte), 128 values per scale."""

    block_size: int = key(128, POSITIVE)

    bits: ClassVar[int] = 4


@dataclass
class AdamWBf16(OptimizerOption):
    """``costlab.training.adamw_bf16.AdamWBf16``: torchao's AdamW update (computed in fp32, ``torch.compile``'d)
    with both states stored in bf16; a tensor under 4096 values keeps fp32 states, as the low-bit options do."""

    eps: float = key(1e-8, POSITIVE)
    bf16_stochastic_round: bool = False

    needs: ClassVar[str | None] = "torchao"

    def state_bytes(self, numel: int) -> int:
        per_value = 2 if numel >= QuantizedAdamW.MIN_NUMEL else FP32_BYTES
        return 2 * per_value * numel + FP32_BYTES


@dataclass
class SGD(OptimizerOption):
    """``torch.optim.SGD`` with (heavy-ball or Nesterov) momentum: one fp32 buffer per parameter, none
    without momentum. ``trainer.weight_decay`` is added to the gradient (L2), as SGD does; ``trainer.betas``
    is not used."""

    momentum: float = key(0.9, BELOW_1)
    dampening: float = key(0.0, BELOW_1)
    nesterov: bool = False

    foreach_step: ClassVar[bool] = True

    def state_bytes(self, numel: int) -> int:
        return FP32_BYTES * numel if self.momentum else 0

    def check(self) -> None:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ConfigError("optimizer.nesterov", True, f"Nesterov momentum needs optimizer.momentum > 0 and "
                              f"optimizer.dampening=0 (they are {self.momentum:g} and {self.dampening:g})")


# --- fine-tuning: which parameters train ------------------------------------------------------------------------


@dataclass
class FullFinetune:
    """``costlab.models.adapters.full``: every parameter trains (the default)."""

    name: str

    def check(self) -> None:
        """Nothing beyond its keys."""


LORA_TARGETS = ["c_q", "c_k", "c_v", "c_proj", "c_fc", "c_fc2", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj", "c_attn", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class LoraFinetune:
    """``costlab.models.adapters.lora``: PEFT's LoRA adapters (``peft.LoraConfig``: ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``) on the Linear layers named by ``targets``; every other parameter is
    frozen. ``merge``: the shipped model has the adapters merged into its weights; false: the adapter also ships
    alone, in PEFT's format (``adapter/`` in the run folder)."""

    name: str
    rank: int = key(8, POSITIVE)
    alpha: float = key(16.0, POSITIVE)
    dropout: float = key(0.0, BELOW_1)
    targets: list[str] = key(LORA_TARGETS, non_empty)
    merge: bool = True

    def check(self) -> None:
        if not self.targets:
            raise ConfigError("finetune.targets", [], "must not be empty: name the Linear layers the adapters go on")
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("finetune", self.name, "needs PEFT: pip install 'costlab[finetune]'")


NF4_BACKENDS = ("torchao", "bitsandbytes")


@dataclass
class QloraFinetune(LoraFinetune):
    """``costlab.models.adapters.qlora``: LoRA's adapters on a frozen base whose adapted Linear weights are held
    in 4-bit NF4 (64-value blocks, their scales quantized again), by torchao's ``NF4Tensor`` or bitsandbytes'
    ``Linear4bit``. ``backend=auto``: the faster of the two on this machine, measured before the ranks start
    (torchao's under FSDP, the one FSDP2 shards)."""

    backend: str = key("auto", one_of("auto", *NF4_BACKENDS))
    probe_ms: dict[str, float] | None = None  # written by the launcher when it resolves backend=auto


    def check(self) -> None:
        super().check()
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("finetune", self.name, "needs torchao (NF4): pip install 'costlab[finetune]'")
        if self.backend == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("finetune.backend", self.backend, "needs bitsandbytes: pip install bitsandbytes")


def check_text_path(key: str, value: str) -> None:
    """Refuse, naming ``key``, a path that is not a UTF-8 text file or a folder holding some."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(key, value, "no such file or folder")
    if not path.is_file() and not path.is_dir():
        raise ConfigError(key, value, f"not a regular file or folder but a {_file_kind(path)}; give a text file or "
                          "a folder of them")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(key, value, "the file is empty")
        if not is_text(path):
            raise ConfigError(key, value, "not a UTF-8 text file")
        return
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        raise ConfigError(key, value, "the folder holds no files")
    if not any(is_text(f) for f in files):
        raise ConfigError(key, value, "the folder holds no UTF-8 text files")


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"),
             (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


SECTIONS: dict[str, type] = {"trainer": Trainer, "tracking": Tracking, "plan": Plan, "report": Report,
                             "serve": Serve}
GROUPS: dict[str, type] = {"precision": Precision, "parallelism": Parallelism, "hardware": Hardware}
OPTIMIZERS: dict[str, type] = {
    "torch.optim.AdamW": AdamW,
    "torchao.optim.AdamW8bit": AdamW8bit,
    "torchao.optim.AdamW4bit": AdamW4bit,
    "costlab.training.adamw_bf16.AdamWBf16": AdamWBf16,
    "torch.optim.SGD": SGD,
}
TARGETS: dict[str, type] = {
    "costlab.models.gpt.GPT": GPT,
    "costlab.models.gpt.MLPLM": MLPLM,
    "costlab.models.hf.HFCausalLM": HFCausalLM,
    "costlab.data.pysource": Pysource,
    "costlab.data.textfile": Textfile,
    "costlab.data.synthetic": Synthetic,
    **OPTIMIZERS,
    "costlab.models.adapters.full": FullFinetune,
    "costlab.models.adapters.lora": LoraFinetune,
    "costlab.models.adapters.qlora": QloraFinetune,
}
SECTION_TARGETS = {  # which targets each section's options may name
    "model": ("costlab.models.gpt.", "costlab.models.hf."),
    "data": ("costlab.data.",),
    "optimizer": tuple(OPTIMIZERS),
    "finetune": ("costlab.models.adapters.",),
}
# what a config (or a run's tags) written before the optimizer and finetune groups existed used
BEFORE_GROUPS: dict[str, dict[str, str]] = {
    "optimizer": {"_target_": "torch.optim.AdamW", "name": "adamw"},
    "finetune": {"_target_": "costlab.models.adapters.full", "name": "full"},
}


def group_node(cfg: Any, group: str) -> Any:
    """``cfg``'s option for ``group``, or the one a config written before the group existed implies."""
    return cfg.get(group) or BEFORE_GROUPS[group]


LEVERS = ("pruning", "quantization")  # their _target_ classes' signatures are their schema
NOT_USER_KEYS = ("runtime", "hydra")  # what the launcher writes for the ranks, and Hydra's own


# --- checking ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One key of a section: its type, the check of its value (None: its type says everything) and why."""

    type: Any
    check: Callable[[Any], str | None] | None = None
    why: str = ""


def schema_of(section: str, node: Any) -> dict[str, Key]:
    """The keys ``node`` (the config's ``section``) may hold, with their types and checks."""
    if section in SECTIONS or section in GROUPS:
        return _dataclass_keys(SECTIONS.get(section) or GROUPS[section])
    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    prefixes = SECTION_TARGETS.get(section, ("",))
    if target in TARGETS and str(target).startswith(prefixes):
        return {"_target_": Key(str), **_dataclass_keys(TARGETS[target])}
    if target and section in LEVERS:
        return {"_target_": Key(str), **_signature_keys(target)}
    known = ", ".join(t for t in TARGETS if t.startswith(prefixes)) if section in SECTION_TARGETS else \
        "a class of costlab's"
    raise ConfigError(f"{section}._target_", target, f"names no option costlab knows ({known})")


def _dataclass_keys(cls: type) -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    return {f.name: Key(hints[f.name], f.metadata.get("check"), f.metadata.get("why", ""))
            for f in dataclasses.fields(cls)}


def _signature_keys(target: str) -> dict[str, Key]:
    from hydra.utils import get_class

    cls = get_class(target)
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls).parameters
    return {n: Key(hints.get(n, Any)) for n, p in params.items() if p.kind is not p.VAR_KEYWORD}


def option(section: str, node: Any) -> Any:
    """The dataclass instance a section or a ``data``/``model`` option is (its values checked first)."""
    check_section(section, node)
    cls = SECTIONS.get(section) or GROUPS.get(section) or TARGETS[node["_target_"]]
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return cls(**{k: v for k, v in values.items() if k != "_target_"})


def check_section(section: str, node: Any) -> None:
    """Refuse the first key of ``node`` that its schema does not have, or whose value has the wrong type
    or is out of range, naming ``section.key``."""
    keys = schema_of(section, node)
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for name, value in values.items():
        where = f"{section}.{name}"
        if name not in keys:
            what = f"{section}={values['name']}" if "name" in values else section
            raise ConfigError(where, value, f"no such key in {what} (it has "
                              f"{', '.join(k for k in keys if k != '_target_')})")
        _check_value(where, value, keys[name])


def _check_value(where: str, value: Any, k: Key) -> None:
    if value == "???":
        raise ConfigError(where, value, f"required: {k.why}" if k.why else "required")
    why = type_error(value, k.type) or _range_error(value, k)
    if why:
        raise ConfigError(where, value, f"{why} ({k.why})" if k.why else why)


def check_config(cfg: DictConfig) -> None:
    """Every key of the composed config against its schema: the first wrong one is refused in one line."""
    keys = _dataclass_keys(Top)
    top = {k: cfg[k] for k in keys if k in cfg}
    for name, value in top.items():
        _check_value(name, OmegaConf.to_container(value) if isinstance(value, ListConfig) else value, keys[name])
    for section in cfg:
        if section in NOT_USER_KEYS or section in top:
            continue
        node = cfg[section]
        if not isinstance(node, DictConfig):
            raise ConfigError(section, node, "not a key costlab reads")
        check_section(str(section), node)


def type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` is not of type ``hint``, or None."""
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = [type_error(value, a) for a in args]
        return None if any(e is None for e in errors) else " or ".join(e.removeprefix("must be ") for e in errors
                                                                          if e).join(("must be ", ""))
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is Literal:
        return None if value in args else f"choose one of {', '.join(map(str, args))}"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple):
        if not isinstance(value, list | tuple | ListConfig):
            return "must be a list"
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return f"must be a list of {len(args)}"
        item = args[0] if args else Any
        return next((f"each item {e.removeprefix('must be ')}" for e in (type_error(v, item) for v in value) if e),
                    None)
    if origin is dict:
        if not isinstance(value, dict | Mapping):
            return "must be a mapping"
        return next((e for e in (type_error(v, args[1]) for v in value.values()) if e), None) if args else None
    raise TypeError(f"the schema uses a type costlab cannot check: {hint}")


def _range_error(value: Any, k: Key) -> str | None:
    if k.check is None or value is None:
        return None
    if isinstance(value, list | tuple):
        return next((why for why in map(k.check, value) if why), None)
    if isinstance(value, dict):
        return next((why for why in map(k.check, value.values()) if why), None)
    return k.check(value)


# --- the levers' own checks (their ``check`` methods) read values with these --------------------------------------


def value_at(cfg: Any, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def positive_int(cfg: Any, key: str) -> int:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "must be a positive integer")
    return value


def non_negative_int(cfg: Any, key: str) -> int:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "must be a non-negative integer")
    return value


def positive_float(cfg: Any, key: str) -> float:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(key, value, "must be a positive number")
    return float(value)
