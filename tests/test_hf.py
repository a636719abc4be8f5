"""``model=hf``: Hugging Face causal LMs built from tiny configs, saved with ``save_pretrained`` and loaded back
through ``model.pretrained=`` (the path a user's checkpoint takes). Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from costlab.launcher.validate import validate  # noqa: E402
from costlab.measure.hardware import flops_per_token, matmul_params  # noqa: E402
from costlab.models.hf import HFCausalLM, decoder_layers  # noqa: E402
from costlab.models.hf_config import PIPELINE_FAMILIES, TP_LAYER_PLANS, shipped_configs  # noqa: E402
from costlab.models.saved import load_model  # noqa: E402
from costlab.schema import ConfigError  # noqa: E402

from .conftest import (  # noqa: E402
    TINY,
    Cli,
    assert_activations_predicted,
    compose_config,
    spawn_ranks,
    split_against_whole,
)

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")


def _config(family: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                          eos_token_id=None)
    if family == "gpt_neox":  # parallel residual, a quarter of each head rotated
        return GPTNeoXConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25, bos_token_id=None,
                             eos_token_id=None, tie_word_embeddings=False)
    if family == "qwen3":  # per-head q/k norms
        return Qwen3Config(**SMALL, head_dim=8)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**SMALL)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> dict[str, str]:
    """One tiny model per family, written by ``save_pretrained`` (a user's local checkpoint)."""
    from transformers import AutoModelForCausalLM

    folders = {}
    # and a GPT-2 without dropout: split by tensor parallel, it draws its attention's masks over a rank's heads
    for family in (*FAMILIES, "gpt2-dropless"):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"hf_{family}")
        config = _config(family.removesuffix("-dropless"))
        if family.endswith("-dropless"):
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        folders[family] = str(folder)
    return folders


TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 40


@pytest.fixture(scope="session")
def with_tokenizer(tmp_path_factory) -> str:
    """A tiny Llama with a byte-level BPE tokenizer of its own (512 tokens) in its folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    folder = tmp_path_factory.mktemp("hf_tokenized")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama").__class__(**{**SMALL, "vocab_size": 320})).save_pretrained(folder)
    return str(folder)


def test_a_folders_tokenizer_turns_the_corpus_into_its_tokens(with_tokenizer):
    from omegaconf import OmegaConf

    from costlab.data import ByteCorpus
    from costlab.data.tokens import ByteCodec, load_codec, tokenize_corpus

    model_cfg = OmegaConf.create({"pretrained": with_tokenizer, "tokenizer": "auto"})
    codec = load_codec(model_cfg)
    assert codec.decode(codec.encode(TEXT)) == TEXT and len(codec.encode(TEXT)) < len(TEXT.encode()) / 2
    raw = torch.frombuffer(bytearray(TEXT.encode()), dtype=torch.uint8)
    corpus = tokenize_corpus(ByteCorpus(train=raw, val=raw[:400], entropy_floor=1.0), codec)
    assert corpus.train.dtype == torch.int32 and int(corpus.train.max()) < codec.vocab_size
    assert corpus.bytes_per_token > 2 and corpus.entropy_floor is None
    assert isinstance(load_codec(OmegaConf.create({"pretrained": with_tokenizer, "tokenizer": "bytes"})), ByteCodec)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(with_tokenizer, tmp_path):
    import shutil

    small = tmp_path / "small"
    shutil.copytree(with_tokenizer, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    with pytest.raises(ConfigError, match="its tokenizer has .* more than the model's vocab_size=256"):
        validate(_hf_cfg(str(small)))
    validate(_hf_cfg(str(small), "model.tokenizer=bytes"))  # bytes fit


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_model_loads_back_and_computes_what_transformers_computes(pretrained, family):
    from transformers import AutoModelForCausalLM

    ours = HFCausalLM(pretrained=pretrained[family], block_size=16)
    theirs = AutoModelForCausalLM.from_pretrained(pretrained[family])
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(ours(x), theirs(input_ids=x).logits)
    # the decoder layers are the blocks FSDP and checkpointing act on, without a second name in the state dict
    assert list(ours.blocks.values()) == list(decoder_layers(ours.hf))
    assert all(k.startswith("hf.") for k in ours.state_dict())
    clone = copy.deepcopy(ours)
    assert clone.blocks["0"] is decoder_layers(clone.hf)[0] and clone.blocks["0"] is not ours.blocks["0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kv_cache_path_computes_what_the_plain_forward_computes(pretrained, family):
    model = HFCausalLM(pretrained=pretrained[family], block_size=32).eval()
    seq = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits, cache = model.forward_with_cache(seq[:, :8])
        torch.testing.assert_close(logits, model(seq[:, :8]), atol=1e-5, rtol=1e-5)
        for t in range(8, 12):
            logits, cache = model.forward_with_cache(seq[:, t:t + 1], cache)
            torch.testing.assert_close(logits[:, -1], model(seq[:, :t + 1])[:, -1], atol=1e-5, rtol=1e-5)


def _family_config(family: str, folder) -> str:
    """A tiny config.json of transformers' ``model_type`` ``family`` (4 layers, dropout where the family has it)."""
    shape = {"gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64}}.get(family, {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64})
    if family == "gpt_neox":
        shape = {**shape, "num_key_value_heads": 4, "rotary_pct": 0.25}
    path = folder / f"{family}.json"
    path.write_text(json.dumps({"model_type": family, "vocab_size": 256, "bos_token_id": None, "eos_token_id": None,
                                "pad_token_id": None, **shape}))
    return str(path)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_every_pipeline_family_computes_stage_after_stage_what_it_computes_whole(family, tmp_path):
    """Each family a pipeline accepts, cut into two stages as each pipeline rank cuts it, computes the whole model's
    logits (in training: GPT-2's dropout draws its masks in the same order) and leaves no weight out; only a tied
    head is held twice, on the first and the last stage."""
    torch.manual_seed(0)
    model = HFCausalLM(config=_family_config(family, tmp_path), block_size=16).train()
    x = torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    whole = model(x)
    stages = [copy.deepcopy(model) for _ in range(2)]
    for i, stage in enumerate(stages):
        stage.cut_to_stage(i, 2)
    torch.manual_seed(1)
    torch.testing.assert_close(stages[1](stages[0](x)), whole)
    names = [{n for n, _ in stage.named_parameters()} for stage in stages]
    assert not names[0] & names[1]
    tied = model.lm_head.weight is model.wte.weight
    head = {n for n, p in stages[1].named_parameters() if p is stages[1].lm_head.weight}
    assert names[0] | names[1] == {n for n, _ in model.named_parameters()} | (head if tied else set())
    assert stages[0].lm_head is None and stages[1].wte is None and len(stages[0].blocks) == len(stages[1].blocks) == 2


def test_a_family_whose_forward_a_stage_would_change_is_refused_a_pipeline(tmp_path):
    # Cohere's causal LM scales its logits in its own forward, which a last stage's head would leave out
    config = _family_config("cohere", tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["model=hf", f"model.config={config}", "model.block_size=16", "trainer.device=cpu",
                                 "parallelism=pp"]))
    assert str(e.value).startswith("parallelism.pp_degree=2: ") and "cohere" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def _tp_families_on_rank(rank: int, world: int, folder: str) -> None:
    """One rank of the tensor-parallel family test: each family's model whole and split as a run splits it, the
    same batch through both; the largest differences of the logits and of every weight's gradient, saved."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for family in TP_LAYER_PLANS:
            torch.manual_seed(0)
            # eval: GPT-2's dropout draws its masks over a rank's heads and units, not the whole model's
            whole = HFCausalLM(config=f"{folder}/{family}.json", block_size=16).eval()
            with torch.no_grad():  # biases start at zero: drawn, a bias laid out wrongly changes the logits
                for name, p in whole.named_parameters():
                    if name.endswith("bias"):
                        p.normal_()
            x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
            split, logits, grads = split_against_whole(whole, mesh, x)
            out[family] = {"logits": logits, "grads": grads,
                           "split": sorted(n for n, p in split.named_parameters()
                                           if isinstance(p, DTensor) and p.to_local().shape != p.shape),
                           "dtensors": all(isinstance(p, DTensor) for p in split.parameters()),
                           "vocab": [isinstance(m.weight, DTensor) and m.weight.placements == (Shard(0),)
                                     for m in (split.wte, split.lm_head)]}
        torch.save(out, f"{folder}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_tensor_parallel_family_computes_split_over_two_ranks_what_it_computes_whole(tmp_path):
    """Each family tensor parallel accepts, split over two gloo ranks as a run splits it, computes the whole model's
    logits and every weight's gradient; its layers' projections are split (not left whole), every weight is a
    DTensor on the mesh (one mesh for the optimizer and FSDP)."""
    for family in TP_LAYER_PLANS:
        _family_config(family, tmp_path)
    spawn_ranks(_tp_families_on_rank, 2, tmp_path, 300, "splitting each family")
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(saved) == set(TP_LAYER_PLANS)
        for family, got in saved.items():
            assert got["logits"] < 1e-5, (family, got["logits"])
            assert max(got["grads"].values()) < 1e-5, (family, got["grads"])
            assert got["dtensors"] and got["vocab"] == [True, True], family
            plan = TP_LAYER_PLANS[family]
            split = {name for name, style in plan.items() if style in ("colwise", "qkv_colwise", "rowwise")}
            for layer in range(4):  # every projection of every layer
                assert {f"{name}.weight" for name in split} <= {n.split(f".{layer}.", 1)[1] for n in got["split"]
                                                               if f".{layer}." in n}, (family, layer)


def _tp_checkpoint_on_rank(rank: int, world: int, folder: str) -> None:
    """One rank of the checkpoint test: GPT-2 split over two ranks (its packed c_attn part by part), a step of
    AdamW, saved by the run's Checkpointer; a model and optimizer of another seed, split alike, loaded by the run's
    :func:`load`; the differences of every parameter's and optimizer state's shard, saved."""
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh

    from costlab.parallelism.core import DistEnv
    from costlab.parallelism.tp import apply_tp
    from costlab.training.checkpoint import Checkpointer, load

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        cfg = OmegaConf.create({"runtime": {"run_dir": folder, "run_id": "r"}, "trainer": {"checkpoint_keep": 1}})
        env = DistEnv(rank, rank, world, world, torch.device("cpu"))

        def trained(seed: int):
            torch.manual_seed(seed)
            model = HFCausalLM(config=f"{folder}/gpt2.json", block_size=16)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_()
            apply_tp(model, mesh)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))).mean().backward()
            optimizer.step()
            return model, optimizer

        saved, saved_opt = trained(0)
        Checkpointer(cfg, env).save(saved, saved_opt, None, next_step=1)
        loaded, loaded_opt = trained(1)
        resumed = load(loaded, loaded_opt, None, cfg, env)
        states = [o.state_dict()["state"] for o in (saved_opt, loaded_opt)]
        out = {"step": resumed.step if resumed else None,
               "params": {n: (p.to_local() - q.to_local()).abs().max().item()
                          for (n, p), (_, q) in zip(saved.named_parameters(), loaded.named_parameters(), strict=True)},
               "moments": max((states[0][k][m].to_local() - states[1][k][m].to_local()).abs().max().item()
                              for k in states[0] for m in ("exp_avg", "exp_avg_sq")),
               "whole": {n: p.full_tensor() for n, p in saved.named_parameters()}}
        torch.save(out, f"{folder}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_tensor_parallel_gpt2_checkpoint_loads_back_and_holds_the_whole_weights(tmp_path):
    """GPT-2's c_attn under tensor parallel holds its queries', keys' and values' shares side by side on a rank, a
    part DCP cannot write as one box: the run's checkpoint writes it split plainly and reads it back as it was laid
    out, every parameter and AdamW moment to the bit; and what the files hold is the whole model's layout (read back
    into one process as a plain state dict)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _family_config("gpt2", tmp_path)
    spawn_ranks(_tp_checkpoint_on_rank, 2, tmp_path, 300, "checkpointing GPT-2")
    dcp_to_torch_save(tmp_path / "checkpoints" / "step_1", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)["model"]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["step"] == 1
        assert max(got["params"].values()) == 0 and got["moments"] == 0, got
        assert set(got["whole"]) <= set(whole)  # the state dict names the tied head too
        for name, tensor in got["whole"].items():
            assert torch.equal(whole[name], tensor), name
    assert any("c_attn.weight" in n for n in whole) and any("c_attn.bias" in n for n in whole)


def test_families_tensor_parallel_would_split_wrongly_are_refused_in_one_line(tmp_path):
    # Phi-3's fused qkv_proj packs queries, keys and values and its attention cuts them at the whole width's offsets;
    # OLMo-2's q/k norms take their statistics over every head
    for family in ("phi3", "olmo2"):
        with pytest.raises(ConfigError) as e:
            validate(compose_config(["model=hf", f"model.config={_family_config(family, tmp_path)}",
                                     "model.block_size=16", "trainer.device=cpu", "parallelism=tp"]))
        message = str(e.value)
        assert message.startswith("parallelism.tp_degree=2: ") and family in message, message
        assert "\n" not in message


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_of_the_decoder_layers_leaves_the_gradients_as_they_were(pretrained, mode):
    from costlab.parallelism.techniques import apply_ac

    x = torch.randint(0, 256, (2, 16))
    grads = []
    for checkpointed in (False, True):
        model = HFCausalLM(pretrained=pretrained["llama"], block_size=16)
        if checkpointed:
            apply_ac(model, mode)
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_the_attention_implementation_is_the_one_asked_for_and_computes_the_same(pretrained):
    validate(_hf_cfg(pretrained["llama"], "model.attn_implementation=eager"))
    x = torch.randint(0, 256, (2, 16))
    outs = {}
    for impl in ("sdpa", "eager"):
        model = HFCausalLM(pretrained=pretrained["llama"], block_size=16, attn_implementation=impl).eval()
        assert model.hf.config._attn_implementation == impl
        with torch.no_grad():
            outs[impl] = model(x)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = HFCausalLM(config=name)
    assert next(model.parameters()).is_meta and len(model.blocks) == model.config.n_layer


@pytest.mark.slow
def test_a_model_built_on_meta_first_leaves_the_next_random_one_its_own_init():
    """A worker's memory prediction builds the model on the meta device, with torch's fills as no-ops, before it
    builds the one it trains; transformers, first imported there, had recorded the no-ops, so the trained model
    kept PyTorch's default init (the embedding's std 1.0) on rank 0 alone. In a fresh process, as a worker is:
    the weights built after a meta build are those built without one, at the config's ``initializer_range``. The
    other ranks' warm-up (``costlab.training.worker.warm_up``, while rank 0 predicts) builds on meta too, and
    leaves the modules the run needs imported and the random generator where it was."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from costlab.models.gpt import build_model\n"
        "from costlab.models.meta import on_meta\n"
        "from tests.conftest import compose_config\n"
        "cfg = compose_config(['model=hf', 'model.config=llama_tiny', 'model.block_size=32'])\n"
        "if sys.argv[1] == 'meta':\n"
        "    with on_meta():\n"
        "        build_model(cfg.model)\n"
        "if sys.argv[1] == 'warm':\n"
        "    from costlab.training.worker import warm_up\n"
        "    state = torch.random.get_rng_state()\n"
        "    warm_up(cfg)\n"
        "    assert torch.equal(state, torch.random.get_rng_state())\n"
        "    assert {'torch._dynamo', 'transformers.models.llama.modeling_llama'} <= set(sys.modules)\n"
        "torch.manual_seed(0)\n"
        "m = build_model(cfg.model)\n"
        "print(m.hf.model.embed_tokens.weight.std().item(), sum(p.double().sum().item() for p in m.parameters()))\n"
    )
    out = {}
    for first in ("meta", "warm", "none"):
        proc = subprocess.run([sys.executable, "-c", script, first], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[first] = [float(v) for v in proc.stdout.split()[-2:]]
    assert out["meta"] == out["warm"] == out["none"]
    from transformers import LlamaConfig  # llama_tiny sets no initializer_range: Llama's default

    assert out["meta"][0] == pytest.approx(LlamaConfig().initializer_range, rel=0.1)


def test_flops_count_gpt2s_conv1d_layers(pretrained):
    model = HFCausalLM(pretrained=pretrained["gpt2"], block_size=16)
    convs = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    assert convs and matmul_params(model) == sum(m.weight.numel() for m in convs) + model.hf.lm_head.weight.numel()
    cfg = model.config
    assert flops_per_token(model, 16) == 6 * matmul_params(model) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 16


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_structured_pruning_removes_whole_key_value_groups_and_mlp_units_and_the_file_loads_back(
        pretrained, family, tmp_path):
    from omegaconf import OmegaConf

    from costlab.compression import DEFAULT_TARGETS, target_layers
    from costlab.measure.metrics import save_model
    from costlab.pruning.structured import mask_structured, plan_structured, shrink

    model = HFCausalLM(pretrained=pretrained[family], block_size=32).eval()
    plan = plan_structured(model, target_layers(model, list(DEFAULT_TARGETS)), 0.5, ("mlp", "attn"))
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    mask_structured(masked, plan)
    shrink(small, plan)
    attn = small.hf.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.head_dim  # 1 of the 2 key/value heads kept ...
    assert attn.q_proj.out_features == 2 * attn.head_dim  # ... with both query heads that share it
    assert small.hf.model.layers[0].mlp.up_proj.out_features == 32  # 64 units: half
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x))  # the removed units were exactly the zeroed ones
        logits, cache = small.forward_with_cache(x[:, :8])
        logits, _ = small.forward_with_cache(x[:, 8:9], cache)
        torch.testing.assert_close(logits[:, -1], small(x[:, :9])[:, -1], atol=1e-5, rtol=1e-5)
    full, pruned = save_model(model, tmp_path / "full.pt"), save_model(small, tmp_path / "pruned.pt")
    assert pruned < 0.8 * full  # half the decoder layers' weights; the embedding and head (45 %) stay
    loaded = load_model(OmegaConf.create({"_target_": "costlab.models.hf.HFCausalLM", "pretrained": pretrained[family],
                                          "block_size": 32}), tmp_path / "pruned.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


@pytest.mark.parametrize("backend", ["torchao", "pytorch"])
def test_int8_dynamic_ships_a_llama_at_least_3x_smaller_and_it_loads_back(tmp_path, backend):
    from costlab.measure.metrics import save_model
    from costlab.quantization import build_quantization

    pytest.importorskip("torchao")
    config = tmp_path / "config.json"  # decoder layers dominate, as in any real model
    config.write_text(_config("llama").__class__(**{**SMALL, "hidden_size": 256, "intermediate_size": 688,
                                                    "num_hidden_layers": 4}).to_json_string())
    cfg = compose_config(["model=hf", f"model.config={config}", "model.block_size=16", "trainer.device=cpu",
                          "quantization=int8_dynamic", f"quantization.backend={backend}"])
    torch.manual_seed(0)
    model = HFCausalLM(config=str(config), block_size=16).eval()
    dense = save_model(model, tmp_path / "dense.pt")
    info = build_quantization(cfg).apply(model, cfg)
    assert info["quantization/layers"] == 4 * 7  # q, k, v, o, gate, up, down of each layer; never the head
    size = save_model(model, tmp_path / "model.pt")
    assert dense / size >= 3, dense / size
    x = torch.randint(0, 256, (2, 16))
    loaded = load_model(cfg.model, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _hf_cfg(source: str, *overrides: str):
    return compose_config(["model=hf", f"model.pretrained={source}", "model.block_size=16", "trainer.device=cpu",
                           *overrides])


@pytest.mark.parametrize(("family", "overrides", "key"), [
    ("llama", ["parallelism=pp", "trainer.nproc_per_node=4", "parallelism.microbatches=4"], "parallelism.pp_degree"),
    ("gpt2", ["parallelism=tp", "trainer.nproc_per_node=3"], "parallelism.tp_degree"),  # 4 heads (GPT-2's n_head)
    ("llama", ["parallelism=tp", "trainer.nproc_per_node=4"], "parallelism.tp_degree"),  # 2 key/value heads
    ("llama", ["model.block_size=128"], "model.block_size"),  # the tiny models have 64 positions
    ("llama", ["model.attn_implementation=fast"], "model.attn_implementation"),
])
def test_what_does_not_apply_to_hf_models_is_refused_in_one_line(pretrained, family, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(_hf_cfg(pretrained[family], *overrides))
    assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)


def test_hf_configs_that_cannot_run_are_refused_in_one_line(tmp_path):
    cases = [
        (compose_config(["model=hf", f"model.pretrained={tmp_path}/nothing"]), "model.pretrained"),
        (compose_config(["model=hf", "model.config=no_such_family"]), "model.config"),
    ]
    small_vocab = tmp_path / "config.json"
    small_vocab.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "max_position_embeddings": 64}))
    cases.append((compose_config(["model=hf", f"model.config={small_vocab}"]), "model.config"))
    for cfg, key in cases:
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)


def test_hf_models_take_ddp_fsdp_tp_and_checkpointing(pretrained):
    for overrides in (["parallelism=ddp"], ["parallelism=fsdp", "trainer.activation_checkpointing=full"],
                      ["precision=bf16", "trainer.compile=true"], ["parallelism=tp"], ["parallelism=fsdp_tp"],
                      ["parallelism=pp"]):
        validate(_hf_cfg(pretrained["qwen2"], *overrides))


HF_RUN = [*(o for o in TINY if not o.startswith("model.")), "model=hf", "model.block_size=32", "trainer.device=cpu",
          "trainer.max_steps=6"]


@pytest.fixture(scope="module")
def hf_runs(mlflow_uri, tmp_path_factory, pretrained):
    """``run.py`` on a tiny model (default the Llama, with grouped-query attention) once per name, cached."""
    cache: dict[str, tuple] = {}

    def get(name: str, *overrides: str, family: str = "llama"):
        if name not in cache:
            cli = Cli(mlflow_uri, tmp_path_factory.mktemp(f"hf_{name}"))
            proc = cli(*HF_RUN, f"model.pretrained={pretrained[family]}", *overrides, f"tracking.run_name=hf-{name}",
                       timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            run = cli.run_by_name(f"hf-{name}")
            assert run.info.status == "FINISHED"
            cache[name] = (cli, run, cli.loss_curve(run.info.run_id))
        return cache[name]

    return get


@pytest.mark.slow  # the default suite trains an hf model in tests/test_use.py
@pytest.mark.e2e
def test_an_hf_model_trains_compresses_and_ships_a_file_that_loads_back(hf_runs):
    cli, run, curve = hf_runs("single", "pruning=wanda", "quantization=int8_dynamic")
    m = run.data.metrics
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert m["eval/bits_per_byte"] == pytest.approx(m["eval/loss"] / math.log(2))
    # half of the decoder layers' weights; the embedding and the head (half of this tiny model) are not pruned
    assert 0.15 < m["model/sparsity"] < 0.5 and m["model/size_ratio"] > 1
    assert m["infer/ttft_ms"] > 0 and m["infer/decode_tokens_per_s"] > 0 and m["infer/decode_speedup"] > 0
    assert run.data.tags["costlab.generation"] == "prompt 8, new tokens 4, batch 1"  # tests' trainer.gen_*
    run_dir = cli.out / "run"
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = load_model(cfg.model, run_dir / "model.pt")
    x = torch.randint(0, 256, (2, 32))
    assert model(x).shape == (2, 32, 256)


@pytest.mark.slow
@pytest.mark.e2e
def test_init_from_starts_an_hf_compression_study_from_a_trained_run(hf_runs):
    cli, trained, _ = hf_runs("single", "pruning=wanda", "quantization=int8_dynamic")
    _, run, curve = hf_runs("init", f"trainer.init_from={cli.out / 'run'}", "trainer.max_steps=0",
                            "quantization=int8_weight_only")
    assert curve == []  # nothing trained: the trained (uncompressed) model was loaded and compressed another way
    m = run.data.metrics
    assert m["eval/loss_uncompressed"] == pytest.approx(trained.data.metrics["eval/loss_uncompressed"], rel=1e-6)
    assert m["model/size_ratio"] > 1


@pytest.mark.slow
@pytest.mark.e2e
def test_an_hf_model_trains_on_its_own_tokens_and_reports_bits_per_byte(mlflow_uri, tmp_path, with_tokenizer):
    cli = Cli(mlflow_uri, tmp_path)
    (tmp_path / "code.py").write_text(TEXT * 20)
    args = [o for o in HF_RUN if not o.startswith("data")]
    proc = cli(*args, f"model.pretrained={with_tokenizer}", "data=textfile", f"data.path={tmp_path / 'code.py'}",
               "tracking.run_name=hf-tokens")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = cli.run_by_name("hf-tokens")
    m = run.data.metrics
    assert run.data.tags["costlab.tokenizer"] == f"tokenizer:{with_tokenizer}"
    assert m["data/bytes_per_token"] > 1.5  # a BPE trained on Python code, scoring Python code
    assert m["eval/bits_per_byte"] == pytest.approx(m["eval/loss"] / math.log(2) / m["data/bytes_per_token"])


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("option", ["fsdp", "tp", "fsdp_tp", "pp"])
def test_an_hf_model_reproduces_the_single_loss_curve(hf_runs, option):
    _, ref, ref_curve = hf_runs("single", "pruning=wanda", "quantization=int8_dynamic")
    _, run, curve = hf_runs(option, f"parallelism={option}")
    assert len(curve) == len(ref_curve) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(ref_curve, curve, strict=True)) <= 1e-3, (ref_curve, curve)
    # the full model gathered on rank 0 evaluates like single's before compression
    assert run.data.metrics["eval/loss"] == pytest.approx(ref.data.metrics["eval/loss_uncompressed"], rel=1e-3)
    assert_activations_predicted(ref.data.metrics)
    assert_activations_predicted(run.data.metrics)  # traced on fake tensors for this layout


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize(("family", "option"), [("qwen2", "tp"), ("gpt2", "fsdp"), ("gpt2", "pp"), ("gpt_neox", "tp"),
                                              ("qwen3", "tp"), ("qwen3", "fsdp_tp"), ("gpt2-dropless", "tp"),
                                              ("gpt2-dropless", "fsdp_tp")])
def test_other_families_reproduce_their_single_loss_curve(hf_runs, family, option):
    # qwen2: biased q/k/v projections split column-wise; gpt2: Conv1D layers, tied embeddings, sharded per block,
    # or cut into stages (learned positions on the first, the tied head's copy on the last), or split by tensor
    # parallel (its packed c_attn part by part, its whole bias's gradient gathered; FSDP shards both again);
    # gpt_neox: its fused query_key_value split head by head; qwen3: its per-head q/k norms' gradients all-reduced
    # (by FSDP's reduction under fsdp_tp)
    _, ref, ref_curve = hf_runs(f"{family}-single", family=family)
    _, run, curve = hf_runs(f"{family}-{option}", f"parallelism={option}", family=family)
    assert max(abs(a - b) / abs(a) for a, b in zip(ref_curve, curve, strict=True)) <= 1e-3, (ref_curve, curve)
    assert run.data.metrics["eval/loss"] == pytest.approx(ref.data.metrics["eval/loss"], rel=1e-3)
    assert_activations_predicted(run.data.metrics)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_pipeline_of_tensor_parallel_hugging_face_stages_reproduces_the_single_loss_curve(hf_runs):
    # four ranks: two stages, each split over two (the first's embedding over the vocabulary, the last's head)
    _, ref, ref_curve = hf_runs("gpt_neox-single", family="gpt_neox")
    _, run, curve = hf_runs("gpt_neox-pp-tp", "parallelism=pp", "trainer.nproc_per_node=4", "parallelism.pp_degree=2",
                            "parallelism.tp_degree=2", family="gpt_neox")
    assert max(abs(a - b) / abs(a) for a, b in zip(ref_curve, curve, strict=True)) <= 1e-3, (ref_curve, curve)
    assert run.data.metrics["eval/loss"] == pytest.approx(ref.data.metrics["eval/loss"], rel=1e-3)
    # the first stage's embedding side traced as it runs, each stage's rotary tables, 1F1B's kept send
    assert_activations_predicted(run.data.metrics, rel=0.002)
