"""Names of the metrics that more than one part of costlab reads: the worker writes them, the report and
the Hydra task read them back from MLflow. Written once here (torch-free, so the report needs no torch)."""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
# a plan's figures (mode=plan, costlab/launcher/plan.py): predicted for the card it names, never measured
PLAN = "plan/"
PLAN_MEMORY = PLAN + "memory_bytes_per_device"
PLAN_MARGIN = PLAN + "memory_margin_bytes"  # the card's memory less the predicted peak per device: < 0 does not fit
PLAN_TOKENS_PER_S = PLAN + "tokens_per_s"
PLAN_MFU = PLAN + "mfu"
PLAN_USD = PLAN + "usd"
PLAN_USD_PER_1M = PLAN + "usd_per_1m_train_tokens"
PLAN_HOURS = PLAN + "hours"
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

# serving (serve.*, costlab/measure/serving.py). Per rung, logged with the concurrency as the step (the MLflow UI
# draws them as curves against it):
SERVE_TOKENS_PER_S = "serve/output_tokens_per_s"
SERVE_TTFT_P50, SERVE_TTFT_P99 = "serve/ttft_ms_p50", "serve/ttft_ms_p99"
SERVE_TPOT_P50, SERVE_TPOT_P99 = "serve/tpot_ms_p50", "serve/tpot_ms_p99"
RUNG_METRICS = (SERVE_TOKENS_PER_S, SERVE_TTFT_P50, SERVE_TTFT_P99, SERVE_TPOT_P50, SERVE_TPOT_P99)
UNCOMPRESSED_SUFFIX = "_uncompressed"  # the same figure of the uncompressed model, served beside the final one
# once per run:
SERVE_KV_BYTES = "serve/kv_bytes_per_token"
SERVE_KV_BYTES_PREDICTED = "serve/predicted_kv_bytes_per_token"
# serve.kv_cache_dtype other than auto: the held-out loss through that cache, and its change from a cache in the
# model's own dtype (the same windows)
SERVE_KV_LOSS = "serve/kv_eval_loss"
SERVE_KV_LOSS_DELTA = "serve/kv_eval_loss_delta"
SERVE_MAX_CONCURRENCY = "serve/max_concurrency"  # the most sequences whose KV cache fits serve.memory_gb
SERVE_TARGET_TOKENS_PER_S = "serve/target_output_tokens_per_s"  # the best rung that meets the latency target
SERVE_TARGET_CONCURRENCY = "serve/target_concurrency"
SERVE_TARGET_SPEEDUP = "serve/target_speedup"  # over the uncompressed model at its own best rung on target
SERVE_USD = "serve/usd_per_1m_output_tokens"  # one device's price at serve/target_output_tokens_per_s
SERVE_TAG = "costlab.serve"  # what was served: engine, lengths, memory budget, and why a figure is missing
LADDER_FILE = "serve_ladder.json"  # the ladder a worker measured, which the launcher logs (metrics, table, figure)

# a run tag: "true" when its pruning or quantization option acts during training (gradual pruning, QAT), as the
# option itself says (``acts_during_training``): such a run did not train as its uncompressed twin did
COMPRESSES_IN_TRAINING = "costlab.compresses_in_training"

# Families logged at every step (or every eval interval, sample or rung): curves, not summary figures.
STEP_FAMILIES = ("train/", "val/", "system/", *RUNG_METRICS)
