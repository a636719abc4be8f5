"""Names of the metrics that more than one part of costlab reads: the worker writes them, the report and
the Hydra task read them back from MLflow. Written once here (torch-free, so the report needs no torch)."""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
EVAL_LOSS = "eval/loss"
EVAL_BITS_PER_BYTE = "eval/bits_per_byte"  # eval/loss in bits per byte of text: one scale for every vocabulary
PERF_TOKENS_PER_S = "perf/tokens_per_s"
MEM_PEAK = "mem/peak_bytes"
MEM_PARAMS = "mem/params_bytes_per_rank"
MEM_GRADS = "mem/grads_bytes_per_rank"
MEM_OPTIMIZER = "mem/optimizer_bytes_per_rank"
MODEL_SIZE = "model/size_bytes"
MODEL_TRAINABLE = "model/trainable_params"  # parameters the optimizer updates (LoRA: the adapters')
MODEL_ADAPTER_BYTES = "model/adapter_bytes"  # finetune.merge=false: the adapter shipped alone, bytes on disk
INFER_LATENCY = "infer/latency_ms_p50"
INFER_TOKENS_PER_S = "infer/tokens_per_s"
INFER_SPEEDUP = "infer/speedup"  # a compressed model against its own uncompressed one, interleaved in one process
# generation with a KV cache (trainer.gen_*): the prefill's time to first token and the decode loop's rate
INFER_TTFT = "infer/ttft_ms"
INFER_DECODE_TOKENS_PER_S = "infer/decode_tokens_per_s"
INFER_DECODE_SPEEDUP = "infer/decode_speedup"  # compressed over uncompressed decode rate, interleaved likewise

# a run tag: "true" when its pruning or quantization option acts during training (gradual pruning, QAT), as the
# option itself says (``acts_during_training``): such a run did not train as its uncompressed twin did
COMPRESSES_IN_TRAINING = "costlab.compresses_in_training"

# Families logged at every step (or every eval interval): curves, not summary figures.
STEP_FAMILIES = ("train/", "val/")
