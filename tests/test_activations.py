"""The activation bytes a run measures (``SavedActivations``) against the memory model's prediction for Hugging
Face models, which runs each family's own code on fake tensors (``costlab.measure.traced``): one real training
step per family, checkpointing mode and precision, in process."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from costlab.measure.activations import SavedActivations  # noqa: E402
from costlab.measure.memory import PREDICTED, RECOMPUTE, predict_state  # noqa: E402
from costlab.models.gpt import build_model  # noqa: E402
from costlab.models.loss import loss_fn  # noqa: E402
from costlab.parallelism.techniques import apply_ac  # noqa: E402
from costlab.precision import autocast  # noqa: E402

from .conftest import compose_config  # noqa: E402

NEOX = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256, "rotary_pct": 0.25,
        "max_position_embeddings": 128, "use_parallel_residual": True, "bos_token_id": None, "eos_token_id": None}
CASES = {
    "llama": ("llama_tiny", []),
    "llama-bf16-selective": ("llama_tiny", ["precision=bf16", "trainer.activation_checkpointing=selective"]),
    "qwen2-full": ("qwen2_tiny", ["trainer.activation_checkpointing=full"]),
    "mistral-bf16": ("mistral_tiny", ["precision=bf16"]),
    "gpt2": ("gpt2_tiny", []),  # gelu_new, Conv1D, tied head, dropout in training
    "gpt2-accum-bf16": ("gpt2_tiny", ["precision=bf16", "trainer.grad_accum_steps=2"]),
    "neox": ("neox", []),  # parallel residual, partial rotary
    "llama-one-row": ("llama_tiny", ["trainer.batch_size=1"]),  # its targets' view is contiguous: not copied
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_traced_prediction_matches_a_real_step_for_every_family(name, tmp_path):
    family, extra = CASES[name]
    if family == "neox":
        (tmp_path / "config.json").write_text(json.dumps(NEOX))
        family = str(tmp_path / "config.json")
    cfg = compose_config(["model=hf", f"model.config={family}", "model.block_size=32", "trainer.batch_size=4",
                          "trainer.device=cpu", *extra])
    predicted = predict_state(cfg, 1)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    mode = cfg.trainer.activation_checkpointing
    if mode != "none":
        apply_ac(model, mode)
    accum = cfg.trainer.grad_accum_steps
    with SavedActivations(model) as meter:
        window = torch.randint(0, 256, (cfg.trainer.batch_size, 33))  # ids and targets its views, as the trainer's
        for rows in window.chunk(accum):
            with autocast(cfg, torch.device("cpu")):
                logits = model(rows[:, :-1])
            loss = loss_fn(logits, rows[:, 1:])
            del logits  # as the trainer frees them before backward: nothing saves them
            loss.backward()
    held = predicted[f"{PREDICTED}activations_bytes_per_rank"]
    assert held == pytest.approx(meter.held, abs=16), (held, meter.held)
    assert (RECOMPUTE in predicted) == (mode != "none")  # checkpointing's transient: one layer rebuilt at a time


@pytest.mark.parametrize("family, mode", [("gpt_nano", "none"), ("gpt_nano", "full"), ("llama_nano", "none"),
                                          ("llama_nano", "full")])
def test_a_gpt_under_fsdp_mixed_precision_is_traced_as_it_runs(family, mode, tmp_path):
    """FSDP's bf16 mixed precision runs the residual stream in bf16 and autocast casts each norm's input back to
    fp32, and it casts each block's inputs, a Llama-style block's fp32 rotary tables among them, to bf16 once (its
    queries and keys share the copy; a checkpointed block keeps it): the prediction traces that on fake tensors;
    the truth is one real FSDP step (one rank, gloo) holding the rows each of the two planned ranks would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from costlab.parallelism.fsdp import apply_fsdp

    cfg = compose_config([f"model={family}", "model.n_layer=3", "model.n_embd=32", "model.n_head=2",
                          "model.block_size=32", "trainer.batch_size=8", "trainer.device=cpu", "parallelism=fsdp",
                          "precision=bf16",
                          f"trainer.activation_checkpointing={mode}"])
    predicted = predict_state(cfg, 2)[f"{PREDICTED}activations_bytes_per_rank"]
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model)
        if mode != "none":
            apply_ac(model, mode)
        apply_fsdp(model, init_device_mesh("cpu", (1,)), torch.bfloat16, torch.float32, True, "none")
        with SavedActivations(model) as meter:
            window = torch.randint(0, 256, (4, 33))  # the rank's rows, ids and targets its views, as the trainer's
            with autocast(cfg, torch.device("cpu")):
                logits = model(window[:, :-1])
            loss = loss_fn(logits, window[:, 1:])
            del logits  # as the trainer frees them before backward: nothing saves them
            loss.backward()
    finally:
        dist.destroy_process_group()
    assert predicted == pytest.approx(meter.held, abs=16), (predicted, meter.held)


GPT_SMALL = ["model.n_layer=3", "model.n_embd=64", "model.n_head=2"]


@pytest.mark.parametrize("finetune, model", [
    ("lora", GPT_SMALL), ("qlora", [*GPT_SMALL, "finetune.backend=torchao", "precision=bf16"]),
    ("lora", ["model=hf", "model.config=llama_tiny"]),
])
def test_adapters_are_traced_as_they_train(finetune, model):
    """LoRA's adapters save their own inputs and outputs, and the frozen base saves less than a trained one: the
    prediction traces the run's adapters (QLoRA's base dequantized as it runs); the truth is one real step of the
    model as the run fine-tunes it (PEFT's adapters, torchao's NF4 base)."""
    pytest.importorskip("peft")
    from costlab.models.adapters import apply_finetune

    cfg = compose_config([f"finetune={finetune}", *model, "model.block_size=32", "trainer.batch_size=4",
                          "trainer.device=cpu"])
    predicted = predict_state(cfg, 1)[f"{PREDICTED}activations_bytes_per_rank"]
    torch.manual_seed(0)
    trained = apply_finetune(build_model(cfg.model), cfg)
    trained.train()
    x = torch.randint(0, 256, (4, 32))
    with SavedActivations(trained) as meter:
        with autocast(cfg, torch.device("cpu")):
            logits = trained(x)
        loss = loss_fn(logits, x)
        del logits  # as the trainer frees them before backward: nothing saves them
        loss.backward()
    assert predicted / meter.held == pytest.approx(1, abs=0.01), (predicted, meter.held)


def test_a_collectives_buffer_its_worker_lets_go_of_late_is_not_counted(tmp_path):
    """A process group's worker thread lets go of a collective's buffers a moment after the caller has woken; on
    a loaded machine a TP run's gathered logits were counted twice that way. A reading that finds a collective's
    buffer alive waits for it: here a thread that lets go once the reading has begun stands in for the worker."""
    import threading

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = dist.group.WORLD.group_name
        with SavedActivations() as meter:
            kept = torch.ones(256) * 3  # a forward's tensor still referenced: held
            late = [torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(
                torch.ones(1024) * 2, "sum", group))]
            first = meter._bytes(set())
            began, read = threading.Event(), meter._bytes

            def reading(weights: set[int]) -> int:
                began.set()
                return read(weights)

            meter._bytes = reading
            worker = threading.Thread(target=lambda: began.wait() and late.clear())
            worker.start()
            held = meter.alive()
        worker.join()
    finally:
        dist.destroy_process_group()
    assert first == kept.nbytes + 1024 * 4  # the late buffer was alive when the reading began
    assert held == kept.nbytes
