import pytest
import torch

from costlab.models.gpt import GPT, MLPLM, build_model
from tests.conftest import compose_config

EXPECTED_PARAMS = {  # (low, high): the sizes the model group promises
    "gpt_nano": (0.7e6, 1.3e6),
    "gpt_micro": (9e6, 12e6),
    "gpt2_small": (120e6, 130e6),
    "llama_nano": (0.7e6, 1.3e6),
    "mlp": (0.1e6, 1e6),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_model_option_builds_with_its_promised_size(name):
    model = build_model(compose_config([f"model={name}"]).model)
    n = sum(p.numel() for p in model.parameters())
    low, high = EXPECTED_PARAMS[name]
    assert low <= n <= high, f"{name}: {n} parameters"


def test_the_7b_plan_model_has_llama_2_7bs_shape():
    with torch.device("meta"):  # for mode=plan only: never built for real here
        model = build_model(compose_config(["model=llama_7b"]).model)
    assert model.blocks["0"].mlp.c_fc.out_features == 11008
    d, v, h, layers = 4096, 32000, 11008, 32  # Llama-2-7B: attention, SwiGLU MLP, two norms a layer; untied head
    assert sum(p.numel() for p in model.parameters()) == layers * (4 * d * d + 3 * d * h + 2 * d) + 2 * v * d + d


def test_the_mlp_width_rounds_up_to_its_multiple():
    cfg = compose_config(["model=llama_nano", "model.n_embd=48", "model.mlp_multiple_of=32"])  # 2/3 x 4 x 48 = 128
    assert build_model(cfg.model).blocks["0"].mlp.c_fc.out_features == 128
    cfg = compose_config(["model=llama_nano", "model.n_embd=40", "model.mlp_multiple_of=32"])  # 106 -> 128
    assert build_model(cfg.model).blocks["0"].mlp.c_fc.out_features == 128


@pytest.mark.parametrize("name", ["gpt_nano", "llama_nano", "mlp"])
def test_forward_shape_and_causality(name):
    cfg = compose_config([f"model={name}", "model.block_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    # positions before the change must not see it
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_llama_variant_uses_rmsnorm_rope_and_swiglu():
    model = GPT(norm="rmsnorm", pos="rope", mlp="swiglu", n_layer=1)
    assert isinstance(model.ln_f, torch.nn.RMSNorm)
    assert model.wpe is None and hasattr(model, "rope_cos")
    assert hasattr(model.blocks["0"].mlp, "c_fc2")


def test_head_and_embedding_are_tied():
    model = GPT(n_layer=1)
    assert model.lm_head.weight is model.wte.weight


def test_mlp_model_sees_only_its_context_window():
    torch.manual_seed(0)
    model = MLPLM(context=4, block_size=16).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 256  # outside the window of position 8
    torch.testing.assert_close(model(x)[0, 8], model(y)[0, 8])


def test_gpt_learns_a_repeated_pattern():
    torch.manual_seed(0)
    model = GPT(n_layer=1, n_head=2, n_embd=32, block_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.arange(17).repeat(4, 1) % 7
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
