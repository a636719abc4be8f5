"""Use what a run produced: load its model and its tokenizer, generate text, score text.

    from costlab.use import load_run, generate, score
    loaded = load_run("outputs/runs/2026-01-31/12-00-00-000000")   # a run folder, or an MLflow run id
    print(generate(loaded, "def main(", max_new_tokens=64))
    print(score(loaded, open("some_file.py").read()))   # {"loss": ..., "bits_per_byte": ..., "tokens": ...}
    print(serve(loaded, max_concurrency=64).rungs)   # the serving ladder measured again, on this machine

    python -m costlab.use RUN --prompt "def main(" [--max-new-tokens N] [--temperature T] [--uncompressed]
    python -m costlab.use RUN --score FILE [--uncompressed]
    python -m costlab.use RUN --serve [--max-concurrency N] [--memory-gb G] [--device cuda] [--uncompressed]

The model is the one the run saved, as it was saved: ``model.pt`` (pruned and/or quantized when the run
compressed) or, with ``which="uncompressed"``, ``uncompressed/model.pt`` (the trained model before
compression; ``model.pt`` itself when the run compressed nothing). Text becomes token ids as in training:
bytes, or the tokenizer of a Hugging Face model's folder (:mod:`costlab.data.tokens`). The forward passes run under
the run's precision (autocast), as its evaluation did.

Neither generation nor scoring goes beyond ``model.block_size`` positions, the longest sequence the run
trained on (a learned position table ends there):

- :func:`generate` stops there: a prompt of P tokens gets at most ``block_size - P`` new tokens (none when
  the prompt fills the block), and a prompt longer than the block is refused. No sliding window: every
  token it yields saw the whole text before it, as in training.
- :func:`score` cuts the text's tokens into non-overlapping windows of ``block_size`` predicted tokens
  (consecutive windows share one token: the last target of one is the first input of the next), so every
  token but the first is predicted exactly once, from the context since its window's start; the last
  window may be shorter. The windows are scored with costlab's own :func:`costlab.models.loss.evaluate`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from costlab.data.tokens import Codec, load_codec
from costlab.models.saved import FINAL, RUN_ID, UNCOMPRESSED
from costlab.schema import ConfigError

if TYPE_CHECKING:
    from costlab.measure.serving import Ladder

WHICH = ("final", "uncompressed")
SCORE_BATCH = 16  # full windows per forward pass in score()


@dataclass
class Loaded:
    """A run's model (in eval mode, on ``device``), the codec of its text, its resolved config and the file
    the model came from."""

    model: nn.Module
    codec: Codec
    config: DictConfig
    path: Path
    device: torch.device

    @property
    def block_size(self) -> int:
        """``model.block_size``: the longest sequence the run trained on; no pass here goes beyond it."""
        return int(self.config.model.block_size)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
        """:func:`generate` with this model."""
        return generate(self, prompt, max_new_tokens, temperature, seed)

    def score(self, text: str) -> dict[str, float]:
        """:func:`score` with this model."""
        return score(self, text)


def _short(value: object, limit: int = 40) -> str:
    """A value on one line, cut to ``limit`` characters: for error messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_folder(run: str | Path, tracking_uri: str | None = None) -> Path:
    """The folder of ``run``: a run folder, or an MLflow run id looked up in ``tracking_uri`` (default: the
    store ``tracking.uri`` names by default, ``outputs/mlflow.db``) through its ``costlab.run_dir`` tag."""
    from costlab.tracking.find import find_run
    from costlab.tracking.store import default_uri, sqlite_path

    text = str(run)
    if (Path(text).expanduser() / "config.yaml").is_file():  # a run folder: no store needed
        return Path(text).expanduser().resolve()
    uri = tracking_uri or default_uri()
    db = sqlite_path(uri)
    if RUN_ID.match(text) and not Path(text).expanduser().is_dir() and db is not None and not db.is_file():
        raise ConfigError("run", text, f"no such folder, and no MLflow store at {db} (give tracking_uri)")
    try:
        folder, _ = find_run(text, uri)
    except ValueError as e:
        raise ConfigError("run", text, str(e)) from None
    if not folder.is_dir():
        raise ConfigError("run", text, f"the run's folder, {folder}, is gone")
    if not (folder / "config.yaml").is_file():
        raise ConfigError("run", text, f"{folder} holds no config.yaml: it is not a run folder")
    return folder


def model_file(folder: Path, config: DictConfig, which: str = "final") -> Path:
    """The model file of the run in ``folder``: ``model.pt``, or for ``which="uncompressed"`` the trained
    model before compression (``uncompressed/model.pt``; ``model.pt`` when the run compressed nothing)."""
    if which not in WHICH:
        raise ConfigError("which", which, f"must be one of {', '.join(WHICH)}")
    final = folder / FINAL
    if which == "uncompressed":
        if (folder / UNCOMPRESSED).is_file():
            return folder / UNCOMPRESSED
        if _compressed(config):
            raise ConfigError("which", which, f"{folder} has no {UNCOMPRESSED}, and its {FINAL} is compressed "
                              f"(pruning={config.pruning.get('name')}, quantization={config.quantization.get('name')})")
    if not final.is_file():
        raise ConfigError("run", str(folder), f"the folder holds no {FINAL} (the run did not get to save its model)")
    return final


def _compressed(config: DictConfig) -> bool:
    """Whether the run compressed its trained model (as :func:`costlab.training.evaluation.evaluate_final` decides)."""
    from costlab.pruning import build_pruning
    from costlab.quantization import build_quantization

    return bool(build_pruning(config).active or build_quantization(config).active)


def load_run(run: str | Path, which: str = "final", device: str = "cpu", tracking_uri: str | None = None) -> Loaded:
    """Load the model a run saved, with its codec and config.

    ``run``: a run folder (it holds ``config.yaml`` and ``model.pt``) or an MLflow run id, found in
    ``tracking_uri`` (default: the project's default store, ``tracking.uri`` in ``conf/config.yaml``).
    ``which``: ``final`` (``model.pt``: the model as shipped, compressed if the run compressed) or
    ``uncompressed`` (the trained model before compression; ``model.pt`` when there was none).
    Raises ``ValueError`` (``argument=value: why``, one line) for a run or file that is not there.
    """
    from costlab.models.saved import load_model

    folder = run_folder(run, tracking_uri)
    config = OmegaConf.load(folder / "config.yaml")
    assert isinstance(config, DictConfig)
    path = model_file(folder, config, which)
    model = load_model(config.model, path, device, _engine(config))
    return Loaded(model=model.eval(), codec=load_codec(config.model), config=config, path=path,
                  device=torch.device(device))


def _engine(config: DictConfig) -> str | None:
    """The quantized engine the run packed PyTorch int8 layers for, where this machine has it (else the
    current one): the same kernels, the same numbers."""
    from costlab.quantization.pytorch_int8 import supported_engines

    engine = config.quantization.get("engine")
    return str(engine) if engine and str(engine) in supported_engines() else None


def _autocast(loaded: Loaded):
    from costlab.precision import autocast

    return autocast(loaded.config, loaded.device)


@torch.inference_mode()
def generate_ids(loaded: Loaded, ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[int]:
    """The token ids that follow ``ids``: greedy (``temperature=0``) or sampled from the softmax of the logits
    over ``temperature`` (a generator seeded with ``seed``, so a seed repeats its text). One prefill pass,
    then one token at a time through the KV cache (``forward_with_cache``). At most ``max_new_tokens``, and
    never beyond ``model.block_size`` positions in all: generation stops there."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be a non-negative integer")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError("temperature", temperature, "must be a number >= 0 (0: greedy)")
    block = loaded.block_size
    if not ids:
        raise ConfigError("prompt", "''", "empty: give at least one token of text to continue")
    if len(ids) > block:
        raise ConfigError("prompt", f"<{len(ids)} tokens>", f"longer than model.block_size={block}, the longest "
                          "sequence the model was trained on")
    steps = min(max_new_tokens, block - len(ids))
    if steps == 0:
        return []
    generator = torch.Generator(device=loaded.device).manual_seed(seed) if temperature > 0 else None

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (1, V) -> (1, 1)
        if generator is None:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)

    model, out = loaded.model, []
    with _autocast(loaded):
        logits, cache = model.forward_with_cache(torch.tensor([ids], device=loaded.device), None)
        for i in range(steps):
            token = pick(logits[:, -1])
            out.append(int(token))
            if i + 1 < steps:
                logits, cache = model.forward_with_cache(token, cache)
    return out


def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """The text the model writes after ``prompt`` (the continuation alone, without the prompt): see
    :func:`generate_ids` for the decoding, and the module's notes for the ``model.block_size`` limit."""
    if not isinstance(prompt, str):
        raise ConfigError("prompt", _short(prompt), "must be a str")
    if not prompt:
        raise ConfigError("prompt", "''", "empty: give at least one token of text to continue")
    ids = loaded.codec.encode(prompt)
    new = generate_ids(loaded, ids, max_new_tokens, temperature, seed)
    # decoded with the prompt, then cut: a token may only make sense after the ones before it (a byte of a
    # UTF-8 character, a word piece without its space)
    whole, head = loaded.codec.decode(ids + new), loaded.codec.decode(ids)
    return whole[len(head):] if whole.startswith(head) else loaded.codec.decode(new)


def windows(ids: list[int], block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches over ``ids``: non-overlapping windows of ``block_size`` predicted tokens
    (full windows stacked by :data:`SCORE_BATCH`, the shorter last one alone)."""
    data = torch.tensor(ids, dtype=torch.long)
    cuts = [data[s : s + block_size + 1] for s in range(0, len(ids) - 1, block_size)]
    full = [w for w in cuts if w.numel() == block_size + 1]
    batches = []
    for i in range(0, len(full), SCORE_BATCH):
        w = torch.stack(full[i : i + SCORE_BATCH])
        batches.append((w[:, :-1], w[:, 1:]))
    if cuts and cuts[-1].numel() < block_size + 1:
        w = cuts[-1][None]
        batches.append((w[:, :-1], w[:, 1:]))
    return batches


@torch.inference_mode()
def score(loaded: Loaded, text: str) -> dict[str, float]:
    """How well the model predicts ``text``: ``loss``, mean nats per predicted token; ``tokens``, how many
    tokens were predicted (all but the first); ``bits_per_byte``, the total nats / ln 2 / the UTF-8 bytes
    of ``text`` (one scale for every vocabulary). The windows are described in the module's notes."""
    from costlab.models.loss import evaluate

    if not isinstance(text, str):
        raise ConfigError("text", _short(text), "must be a str")
    ids = loaded.codec.encode(text)
    if len(ids) < 2:
        raise ConfigError("text", _short(text), f"{len(ids)} token(s): at least 2 are needed (the first is "
                          "only context)")
    batches = windows(ids, loaded.block_size)
    tokens = len(ids) - 1
    loss = evaluate(loaded.model, batches, loaded.config, loaded.device)
    return {"loss": loss, "bits_per_byte": loss * tokens / math.log(2) / len(text.encode("utf-8")),
            "tokens": tokens}


def serve(loaded: Loaded, max_concurrency: int | None = None, memory_gb: float | None = None) -> Ladder:
    """The run's serving ladder measured again, here, on ``loaded.device``: the model serves requests drawn
    from the run's held-out text as the run drew them, at its ``serve.*`` settings (the defaults for a run made
    before they existed), with ``max_concurrency`` and ``memory_gb`` overridden when given. A model family
    without a batched KV-cache path (the MLP baseline) is refused (``ConfigError``)."""
    from costlab.data import build_corpus
    from costlab.data.tokens import tokenize_corpus
    from costlab.measure.serving import serve_ladder
    from costlab.precision import autocast_dtype
    from costlab.schema import Serve, option

    config = loaded.config.copy()
    with open_dict(config):
        config.serve = OmegaConf.merge(OmegaConf.structured(Serve), config.get("serve") or {})
        if max_concurrency is not None:
            config.serve.max_concurrency = max_concurrency
        if memory_gb is not None:
            config.serve.memory_gb = memory_gb
    option("serve", config.serve).check()
    corpus = tokenize_corpus(build_corpus(config.data), loaded.codec)
    ladder = serve_ladder({"final": loaded.model}, corpus.val, config, loaded.device, lambda: _autocast(loaded),
                          autocast_dtype(config))
    if ladder is None:
        raise ConfigError("run", loaded.path.parent, f"{type(loaded.model).__name__} has no batched KV-cache path")
    return ladder


# --- python -m costlab.use ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"costlab: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m costlab.use",
        description="Use the model a run saved: continue a prompt, or score a text file (loss per token, bits\n"
                    "per byte). The model is the run's model.pt as shipped (pruned and/or quantized if the run\n"
                    "compressed), on its own tokenizer (bytes, or a Hugging Face model folder's).",
        epilog="examples:\n"
               "  python -m costlab.use outputs/runs/2026-01-31/12-00-00-000000 --prompt 'def main('\n"
               "  python -m costlab.use RUN_ID --score some_file.py --uncompressed\n\n"
               "Neither goes beyond the run's model.block_size positions: generation stops there, and a "
               "file is\nscored in non-overlapping windows of that many tokens. Errors: one line, exit 2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder (it holds config.yaml and model.pt) or an MLflow run id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="print the text the model writes after TEXT")
    what.add_argument("--score", metavar="FILE", type=Path,
                      help="print the model's loss (nats/token), bits per byte and scored tokens on FILE (UTF-8)")
    what.add_argument("--serve", action="store_true",
                      help="measure the serving ladder again here (the run's serve.* settings): output tokens/s, "
                           "TTFT and TPOT per concurrency, and the best rung that meets the latency target")
    p.add_argument("--max-concurrency", type=int, metavar="N",
                   help="--serve: the top of the ladder (default: the run's)")
    p.add_argument("--memory-gb", type=float, metavar="G",
                   help="--serve: what weights and KV cache may take (default: the run's, else the device's "
                        "memory)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate at most (default: 64; fewer where model.block_size ends)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): greedy; above 0: sample from softmax(logits / T)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    p.add_argument("--uncompressed", action="store_true",
                   help="use the trained model before compression (uncompressed/model.pt; model.pt when the run "
                        "compressed nothing)")
    p.add_argument("--device", default="cpu", help="where to run the model (default: cpu)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="the MLflow store a run id is looked up in (default: the project's, outputs/mlflow.db)")
    return p


def _print_ladder(ladder: Ladder, config: DictConfig) -> None:
    from costlab.measure.names import SERVE_TARGET_CONCURRENCY, SERVE_TARGET_TOKENS_PER_S

    print(ladder.tag)
    print(f"{'concurrency':>11} {'tokens/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
    for c, f in ladder.rungs["final"].items():
        print(f"{c:>11} {f['serve/output_tokens_per_s']:>10.1f} {f['serve/ttft_ms_p50']:>9.2f} "
              f"{f['serve/ttft_ms_p99']:>9.2f} {f['serve/tpot_ms_p50']:>9.2f} {f['serve/tpot_ms_p99']:>9.2f}")
    s = ladder.summary
    if SERVE_TARGET_CONCURRENCY in s:
        print(f"at the target: {s[SERVE_TARGET_TOKENS_PER_S]:.1f} output tokens/s at concurrency "
              f"{s[SERVE_TARGET_CONCURRENCY]:g}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text = None
        if args.score is not None:
            try:
                text = args.score.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__)
                raise ConfigError("--score", args.score, why) from None
        loaded = load_run(args.run, "uncompressed" if args.uncompressed else "final", args.device, args.tracking_uri)
        if args.serve:
            _print_ladder(serve(loaded, args.max_concurrency, args.memory_gb), loaded.config)
        elif text is not None:
            result = score(loaded, text)
            print(f"loss           {result['loss']:.6f} nats/token")
            print(f"bits_per_byte  {result['bits_per_byte']:.6f}")
            print(f"tokens         {result['tokens']}")
        else:
            print(generate(loaded, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    except ValueError as e:
        print(f"costlab: error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
