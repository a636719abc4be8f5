"""The ``finetune`` group: LoRA adapters (PEFT) train while the rest is frozen (QLoRA: on a base held in NF4 by
torchao or bitsandbytes), the memory model predicts the smaller state exactly, the shipped model has the
adapters merged (a plain model of the run's config, which ``costlab.use`` loads), and what cannot carry adapters
is refused before any rank starts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from costlab.launcher.job import check_job
from costlab.measure.memory import PREDICTED, predict_state
from costlab.measure.metrics import local_bytes, state_bytes_per_rank
from costlab.measure.names import MEM_OPTIMIZER, MEM_PARAMS
from costlab.models.adapters import (
    ADAPTER_DIR,
    _bnb_linear,
    _torchao_nf4,
    adapter_state,
    apply_finetune,
    dequantized,
    is_nf4,
    load_adapter,
    merge_adapters,
    nf4_bytes,
    save_adapter,
    trainable_params,
)
from costlab.models.gpt import build_model
from costlab.models.loss import loss_fn
from costlab.parallelism.core import load_full_state
from costlab.training.optimizers import build_optimizer

from .conftest import HF_TINY, TINY, compose_config, refusal

pytest.importorskip("peft")

LORA = ["finetune=lora", "finetune.rank=2"]  # rank 2 on these 32-wide layers: an adapter much smaller than them


def _lora(*extra: str, base: list[str] = TINY):
    cfg = compose_config([*base, *LORA, "trainer.device=cpu", *extra])  # extra after LORA: it may set the rank
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    return cfg, plain, apply_finetune(build_model(cfg.model), cfg)


def _adapted_base(cfg):
    """The model :func:`_lora` put the adapters on (its second build from the seed), built again plain."""
    torch.manual_seed(0)
    build_model(cfg.model)
    return build_model(cfg.model)


def _train(model, cfg) -> dict[str, float]:
    """Three steps on one random batch; the state bytes measured after the last."""
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, 256, (4, cfg.model.block_size + 1))
    for _ in range(3):
        loss_fn(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        measured = state_bytes_per_rank(model, opt)
        opt.zero_grad(set_to_none=True)
    return measured


@pytest.mark.parametrize("family, optimizer", [
    ("gpt", "adamw"), ("hf", "adamw"), ("gpt", "sgd"), ("gpt", "adamw_bf16"),
    pytest.param("gpt", "adamw_8bit", marks=pytest.mark.slow),  # its update compiles for ~20 s on 2 cores
])
def test_lora_trains_only_its_adapters_and_holds_the_predicted_state(family, optimizer):
    if optimizer.startswith("adamw_"):
        pytest.importorskip("torchao")
    base = [*(HF_TINY if family == "hf" else TINY), f"optimizer={optimizer}"]
    # 128 wide at rank 32: adapters of at least 4096 values, which the low-bit optimizers quantize
    wide = optimizer == "adamw_8bit"
    if wide:
        base.append("model.n_embd=128")
    cfg, plain, model = _lora(*(["finetune.rank=32"] if wide else []), base=base)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert 0 < trainable_params(model) < (0.6 if wide else 0.2) * trainable_params(plain)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    measured = _train(model, cfg)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    predicted = predict_state(cfg, 1)
    assert predicted[f"{PREDICTED}optimizer_bytes_per_rank"] == measured[MEM_OPTIMIZER]
    assert predicted[f"{PREDICTED}params_bytes_per_rank"] == measured[MEM_PARAMS]
    full = predict_state(compose_config([*base, "trainer.device=cpu"]), 1)
    assert measured[MEM_OPTIMIZER] < full[f"{PREDICTED}optimizer_bytes_per_rank"]


def test_the_shipped_model_has_the_adapters_merged_and_predicts_as_the_adapted_one():
    cfg, plain, model = _lora()
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at zero (the adapted model starts as the base): give it values
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(x)
        shipped = load_full_state(model.state_dict(), cfg, torch.device("cpu"))  # what every layout ships
        merged = shipped(x)
    assert type(shipped) is type(plain) and shipped.state_dict().keys() == plain.state_dict().keys()
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, plain(x), atol=1e-3)  # the adapters changed something
    assert merge_adapters(plain) is plain  # no adapters: nothing to do


@pytest.mark.parametrize("overrides, key, says", [
    (["parallelism=tp"], "finetune", "tensor parallel"),
    (["quantization=qat_int8"], "finetune", "acts on the weights while training"),
    (["finetune.merge=false"], "finetune.merge", "the base it was trained on"),
    (["finetune.rank=0"], "finetune.rank", "positive"),
    (["finetune.targets=[]"], "finetune.targets", "empty"),
    (["finetune=qlora", "finetune.backend=bitsandbytes", "parallelism=fsdp"], "finetune.backend", "FSDP2"),
    (["finetune=qlora", "parallelism=tp"], "finetune", "tensor parallel"),
    (["finetune=qlora", "finetune.backend=nf8"], "finetune.backend", "nf8"),
])
def test_what_cannot_carry_adapters_is_refused_naming_the_key(overrides, key, says):
    e = refusal(*TINY, "finetune=lora", *overrides)
    assert e.key == key and says in str(e), str(e)


NF4_BACKENDS = ["torchao", pytest.param("bitsandbytes", marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"))]


@pytest.mark.parametrize("backend", NF4_BACKENDS)
def test_qlora_holds_the_base_in_nf4_trains_the_adapters_and_ships_them_merged(backend):
    pytest.importorskip("torchao")
    cfg, plain, model = _lora("finetune=qlora", f"finetune.backend={backend}")
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert base and all(is_nf4(p) and not p.requires_grad for p in base.values())
    dense = dict(plain.named_parameters())
    held = sum(local_bytes(p) for p in base.values())
    assert held == sum(nf4_bytes(dense[n].numel(), backend) for n in base)
    # a weight's code tables are a fixed cost (~1 KiB with bitsandbytes): these 32-wide layers pay it, ...
    assert held <= 0.3 * sum(dense[n].numel() * 4 for n in base)
    layer = torch.nn.Linear(1024, 1024, bias=False)  # ... a model's layers do not: the goal, <= 0.16x of fp32
    layer = _bnb_linear(layer, None) if backend == "bitsandbytes" else (_torchao_nf4(layer) or layer)
    assert local_bytes(layer.weight) <= 0.16 * 1024 * 1024 * 4
    built = _adapted_base(cfg).state_dict()  # the weights the NF4 base was quantized from
    # NF4 keeps them to within ~9 % (mean absolute error over mean magnitude); bitsandbytes to within ~16-25 % on
    # these few-block weights (its 8-bit block scales are coarse there), ~9 % on a 1024 x 1024 one
    for name, p in base.items():
        err = (dequantized(p) - built[name]).abs().mean() / built[name].abs().mean()
        assert 0 < err < 0.3, (name, err)
    measured = _train(model, cfg)
    predicted = predict_state(cfg, 1)
    for part in ("params", "grads", "optimizer"):
        assert predicted[f"{PREDICTED}{part}_bytes_per_rank"] == measured[f"mem/{part}_bytes_per_rank"], part
    x = torch.randint(0, 256, (4, cfg.model.block_size))
    with torch.no_grad():
        adapted = model(x)
        shipped = load_full_state(model.state_dict(), cfg, torch.device("cpu"))
        merged = shipped(x)
    assert type(shipped) is type(plain) and shipped.state_dict().keys() == plain.state_dict().keys()
    assert not any(is_nf4(p) for p in shipped.parameters())
    assert torch.allclose(adapted, merged, atol=1e-4)


@pytest.mark.parametrize("backend", NF4_BACKENDS)
def test_qlora_under_bf16_holds_the_activations_its_backend_leaves(backend):
    """bitsandbytes computes in autocast's dtype and hands back its input's: after a norm (fp32 under autocast) the
    MLP's hidden layer comes out in fp32, twice torchao's bytes, and the activation after it saves that. The memory
    model traces each backend's dtype; the bytes are measured in one process as a run's first step counts them."""
    from costlab.measure.activations import SavedActivations
    from costlab.measure.memory import predict_activations

    pytest.importorskip("torchao")
    cfg = compose_config([*TINY, *LORA, "finetune=qlora", f"finetune.backend={backend}", "precision=bf16",
                          "model.n_layer=3", "trainer.device=cpu"])
    torch.manual_seed(0)
    model = apply_finetune(build_model(cfg.model), cfg)
    x = torch.randint(0, 256, (int(cfg.trainer.batch_size), int(cfg.model.block_size)))
    with SavedActivations(model) as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = loss_fn(logits, x)
        del logits  # as the trainer frees them before backward: nothing saves them
        loss.backward()
    assert predict_activations(cfg, 1) == pytest.approx(meter.held, rel=0.01), backend


def test_an_adapter_saved_alone_goes_back_on_its_base_as_the_merged_model(tmp_path):
    """``finetune.merge=false`` on costlab's own model: the adapter written in PEFT's format, put back on the base
    it was trained on, gives the merged model (the run's ``model.pt``)."""
    cfg, _, model = _lora("finetune.merge=false")
    base = _adapted_base(cfg)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    size = save_adapter(adapter_state(model), cfg, tmp_path / ADAPTER_DIR)
    assert size == sum(f.stat().st_size for f in (tmp_path / ADAPTER_DIR).iterdir())
    assert size < 0.2 * sum(p.numel() * 4 for p in base.parameters())
    merged = load_full_state(model.state_dict(), cfg, torch.device("cpu")).state_dict()
    rebuilt = load_adapter(base, tmp_path / ADAPTER_DIR).state_dict()
    assert rebuilt.keys() == merged.keys()
    assert all(torch.allclose(v, merged[k], atol=1e-6) for k, v in rebuilt.items())


def test_qlora_backend_auto_is_timed_here_and_fsdp_takes_torchao():
    pytest.importorskip("torchao")
    cfg = compose_config([*TINY, "finetune=qlora", "parallelism=ddp"])
    check_job(cfg, planning=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert cfg.finetune.backend == "torchao"
    else:  # both timed; the faster chosen
        times = dict(cfg.finetune.probe_ms)
        assert set(times) == {"torchao", "bitsandbytes"} and all(t > 0 for t in times.values())
        assert cfg.finetune.backend == min(times, key=times.__getitem__)
    cfg = compose_config([*TINY, "finetune=qlora", "parallelism=fsdp"])
    check_job(cfg, planning=True)
    assert cfg.finetune.backend == "torchao" and cfg.finetune.get("probe_ms") is None


def test_a_qlora_plan_takes_the_backend_of_the_card_it_names_and_a_search_leaves_it_to_its_layouts():
    """A plan times nothing on this CPU for the card it names: on a GPU a run without FSDP takes bitsandbytes where
    installed. A search has no layout yet (its world is not the default layout's): it is not refused for that."""
    pytest.importorskip("torchao")
    plan = ["mode=plan", "finetune=qlora", "hardware=h100_sxm", "trainer.nproc_per_node=8"]
    cfg = compose_config([*TINY, *plan, "parallelism=ddp", "parallelism.dp_replicate=8"])
    check_job(cfg, planning=True)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    assert cfg.finetune.backend == ("bitsandbytes" if has_bnb else "torchao") and "probe_ms" not in cfg.finetune
    search = compose_config([*TINY, *plan, "plan.search=true"])
    check_job(search, planning=True)
    assert search.finetune.backend == "auto"


def test_an_adapter_shipped_alone_is_refused_with_compression(tmp_path):
    model_file = tmp_path / "model.pt"
    torch.save(build_model(compose_config(TINY).model).state_dict(), model_file)
    e = refusal(*TINY, *LORA, "finetune.merge=false", f"trainer.init_from={model_file}", "quantization=int8_dynamic")
    assert e.key == "finetune.merge" and "quantization=int8_dynamic compresses a dense model" in str(e), str(e)


def test_lora_from_random_weights_is_warned_and_from_a_trained_model_is_not(tmp_path):
    cfg = compose_config([*TINY, "finetune=lora"])
    assert any("random weights" in w for w in check_job(cfg, planning=True))
    model_file = tmp_path / "model.pt"
    torch.save(build_model(cfg.model).state_dict(), model_file)
    cfg = compose_config([*TINY, "finetune=lora", f"trainer.init_from={model_file}"])
    assert not any("random weights" in w for w in check_job(cfg, planning=True))


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_lora_and_qlora_runs_fine_tune_a_trained_run_and_ship_a_plain_model(cli, finetune):
    from costlab.use import load_run

    if finetune == "qlora":
        pytest.importorskip("torchao")
    assert cli(*TINY, f"tracking.run_name=ft-base-{finetune}",
               "hydra.run.dir=" + str(cli.out / f"base-{finetune}")).returncode == 0
    base = cli.run_by_name(f"ft-base-{finetune}")
    proc = cli(*TINY, *LORA, f"finetune={finetune}", f"trainer.init_from={base.info.run_id}",
               f"tracking.run_name=ft-{finetune}", "hydra.run.dir=" + str(cli.out / finetune))
    assert proc.returncode == 0 and "random weights" not in proc.stderr, proc.stderr[-3000:]
    run = cli.run_by_name(f"ft-{finetune}")
    m = run.data.metrics
    assert run.data.tags["finetune"] == finetune and run.data.tags["mlflow.runName"] == f"ft-{finetune}"
    assert 0 < m["model/trainable_params"] < 0.2 * m["model/params"]
    assert m[MEM_OPTIMIZER] == m[f"{PREDICTED}optimizer_bytes_per_rank"]
    assert m[MEM_PARAMS] == m[f"{PREDICTED}params_bytes_per_rank"]
    assert m[MEM_OPTIMIZER] < 0.2 * base.data.metrics[MEM_OPTIMIZER]
    # the memory and time models take the model as it fine-tunes: its adapters traced, its probes run on it
    assert m[f"{PREDICTED}activations_bytes_per_rank"] == pytest.approx(m["mem/activations_bytes_per_rank"], rel=0.02)
    assert m["perf/predicted_tokens_per_s"] > 0
    if finetune == "qlora":
        assert m[MEM_PARAMS] < 0.75 * base.data.metrics[MEM_PARAMS]  # the NF4 base, beside fp32 embeddings
    loaded = load_run(cli.out / finetune)  # a plain model of the run's config: the adapters were merged
    assert type(loaded.model) is type(build_model(loaded.config.model))
    assert not any("lora" in k or "quant" in k for k in loaded.model.state_dict())
    assert not any(is_nf4(p) for p in loaded.model.parameters())


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("finetune, parallelism, family", [
    ("lora", "fsdp", "hf"), ("lora", "pp", "hf"),
    ("qlora", "ddp", "gpt"), ("qlora", "fsdp", "gpt"), ("qlora", "fsdp", "hf"), ("qlora", "pp", "gpt"),
])
def test_adapters_run_with_data_parallel_and_pipeline_layouts(cli, finetune, parallelism, family):
    if finetune == "qlora":
        pytest.importorskip("torchao")
    name = f"{finetune}-{parallelism}-{family}"
    proc = cli(*(HF_TINY if family == "hf" else TINY), *LORA, f"finetune={finetune}", f"parallelism={parallelism}",
               f"tracking.run_name={name}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = cli.run_by_name(name)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    for part in ("params", "grads", "optimizer"):  # measured on the ranks, predicted from the shapes
        assert m[f"mem/{part}_bytes_per_rank"] == m[f"{PREDICTED}{part}_bytes_per_rank"], part
    assert 0 < m["model/trainable_params"] < 0.2 * m["model/params"]
    # (a pipeline's stages within 3 %, as without adapters: what each keeps per micro-batch in flight)
    assert m[f"{PREDICTED}activations_bytes_per_rank"] == pytest.approx(m["mem/activations_bytes_per_rank"],
                                                                     rel=0.03 if parallelism == "pp" else 0.02)
    assert m["perf/predicted_tokens_per_s"] > 0
    if finetune == "qlora":  # the NF4 base beside the fp32 embeddings, norms and adapters
        assert run.data.tags["nf4_backend"] == run.data.params["finetune.backend"] != "auto"
        assert m[MEM_PARAMS] < 0.75 * 4 * m["model/params"] / (2 if parallelism == "fsdp" else 1)


@pytest.mark.slow
@pytest.mark.e2e
def test_lora_in_a_pipeline_trains_as_on_one_rank(cli):
    """A pipeline's stages keep whole blocks, adapters and all: in fp32 its loss curve is one rank's, the tied
    weight's copies frozen (no gradient to sum between the first and last stage) and the shipped model merged."""
    curves = {}
    for parallelism in ("single", "pp"):
        name = f"lora-curve-{parallelism}"
        proc = cli(*TINY, *LORA, f"parallelism={parallelism}", "trainer.max_steps=6", f"tracking.run_name={name}",
                   "hydra.run.dir=" + str(cli.out / parallelism))
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = cli.run_by_name(name)
        curves[parallelism] = cli.loss_curve(run.info.run_id)
    assert len(curves["pp"]) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(curves["single"], curves["pp"], strict=True)) <= 1e-4, curves
    m = run.data.metrics
    for part in ("params", "grads", "optimizer"):
        assert m[f"mem/{part}_bytes_per_rank"] == m[f"{PREDICTED}{part}_bytes_per_rank"], part


@pytest.mark.slow
@pytest.mark.e2e
def test_an_adapter_shipped_alone_by_fsdp_loads_with_peft_onto_its_hugging_face_base(cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    from costlab.use import load_run

    torch.manual_seed(0)
    folder = tmp_path / "llama"
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None,
                         eos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    proc = cli(*HF_TINY, *LORA, "finetune.merge=false", f"model.pretrained={folder}", "parallelism=fsdp",
               "tracking.run_name=alone-fsdp", "hydra.run.dir=" + str(cli.out / "alone"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    adapter = cli.out / "alone" / ADAPTER_DIR
    # what a PEFT user does with it: the base from its folder, the adapter on it, merged
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter))
    merged = peft_model.merge_and_unload().state_dict()
    shipped = {k.removeprefix("hf."): v for k, v in load_run(cli.out / "alone").model.state_dict().items()}
    assert merged.keys() == shipped.keys()
    assert all(torch.allclose(v, shipped[k], atol=1e-6) for k, v in merged.items())
    assert any(not torch.equal(v, w) for v, w in zip(merged.values(), AutoModelForCausalLM.from_pretrained(folder)
                                                      .state_dict().values(), strict=True))  # it did train


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("backend", NF4_BACKENDS)
def test_qlora_composes_with_bf16_and_activation_checkpointing(cli, backend):
    pytest.importorskip("torchao")
    name = f"qlora-bf16-ac-{backend}"
    proc = cli(*TINY, *LORA, "finetune=qlora", f"finetune.backend={backend}", "precision=bf16",
               "trainer.activation_checkpointing=full", f"tracking.run_name={name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = cli.run_by_name(name).data.metrics
    assert m[MEM_PARAMS] == m[f"{PREDICTED}params_bytes_per_rank"] and m["eval/loss"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_a_qlora_run_resumes_from_a_checkpoint_of_what_trains(cli):
    """A checkpoint holds the adapters and their optimizer state, not the frozen NF4 base (rebuilt as the first
    attempt built it): the resumed run ends where an uninterrupted one does. bitsandbytes: the backend whose NF4
    state dict DCP could not load back; torchao's takes the same path."""
    pytest.importorskip("bitsandbytes")
    backend = "bitsandbytes"
    args = [*TINY, *LORA, "finetune=qlora", f"finetune.backend={backend}", "parallelism=ddp", "trainer.max_steps=6",
            "trainer.checkpoint_interval=2"]
    assert cli(*args, f"tracking.run_name=whole-{backend}").returncode == 0
    run = cli.run_by_name(f"whole-{backend}")
    whole = run.data.metrics["eval/loss"]
    # the same run, as if it had died after its step-4 checkpoint: resumed, it must end where it ended
    cli.client().set_terminated(run.info.run_id, "KILLED")
    proc = cli(f"trainer.resume={run.info.run_id}")
    assert proc.returncode == 0 and "resumed from step_4" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert cli.client().get_run(run.info.run_id).data.metrics["fault/resumes"] == 1
    # the store keeps the first attempt's figures (each step is logged once); the resumed attempt prints its own
    resumed = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.split()[:1] == ["eval/loss"]]
    assert resumed == [pytest.approx(whole, abs=1e-5)], proc.stdout[-2000:]


QLORA_FSDP = [*TINY, *LORA, "finetune=qlora", "finetune.backend=torchao", "parallelism=fsdp", "trainer.device=cpu"]


def _ship_qlora_fsdp(rank: int, world: int, folder: str) -> None:
    """One rank of a QLoRA model under FSDP: rank 0 saves the model it would ship, every rank the number of
    collectives left unwaited once the gather returned."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import _get_work_registry_size

    from costlab.parallelism.core import DistEnv
    from costlab.parallelism.parallelize import parallelize

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    try:
        cfg = compose_config(QLORA_FSDP)
        torch.manual_seed(0)
        model = apply_finetune(build_model(cfg.model), cfg, shards=world)
        parallel = parallelize(model, cfg, DistEnv(rank, rank, world, world, torch.device("cpu")))
        final = parallel.full_model(cfg)
        torch.save({"unwaited": _get_work_registry_size(), "state": final.state_dict() if final else None},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_qlora_base_sharded_by_fsdp_ships_whole_with_every_gather_waited_on(tmp_path):
    """The shipped model of a QLoRA run under FSDP is gathered from NF4 shards: it holds exactly the dequantized
    base and merged adapters one process builds, and no collective is still running when it is handed on
    (torchao's own NF4 gather through DTensor is never waited on, and 2-rank runs aborted on a corrupted heap)."""
    pytest.importorskip("torchao")
    import torch.multiprocessing as mp

    from costlab.parallelism.core import plain_copy

    world = 2
    mp.spawn(_ship_qlora_fsdp, args=(world, str(tmp_path)), nprocs=world)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert [s["unwaited"] for s in saved] == [0] * world
    cfg = compose_config(QLORA_FSDP)
    torch.manual_seed(0)
    model = apply_finetune(build_model(cfg.model), cfg, shards=world)  # the same NF4 blocks, in one process
    assert any(is_nf4(p) for p in model.parameters())
    expected = plain_copy(model, cfg, torch.device("cpu")).state_dict()
    shipped = saved[0]["state"]
    assert shipped.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(shipped[name], value), name
