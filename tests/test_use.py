"""``costlab.use``: a run's saved model loaded back (by folder and by MLflow run id, final and uncompressed),
generating and scoring text, in Python and from the command line. The run folders are made by two real
``run.py`` runs: a pruned and int8-quantized GPT, and a tiny Hugging Face Llama on bytes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from costlab import ROOT
from costlab.use import Loaded, generate, generate_ids, load_run, main, score, serve, windows

from .conftest import TINY, Cli

pytest.importorskip("transformers")

TRACKED = ["tracking.log_model=true", "tracking.system_metrics_s=1",  # the MLflow model, the system metrics
           # the two runs share two cores: a latency target loose enough that a rung meets it while the other
           # run computes (these tests check what is logged, not how fast)
           "serve.tpot_ms_p99=1000", "serve.ttft_ms_p99=10000"]
RUNS = {
    "gpt": [*TINY, "pruning=structured", "quantization=int8_dynamic", *TRACKED],
    "hf": [*(o for o in TINY if not o.startswith("model.")), "model=hf", "model.config=llama_tiny",
           "model.block_size=32", *TRACKED],
}
TEXT = "def add(a, b):\n    return a + b\n\n# a comment with a non-ASCII character: é\n" * 3
PROMPT = "def main("


@pytest.fixture(scope="module")
def runs(mlflow_uri, tmp_path_factory) -> dict[str, tuple[Cli, object, Path]]:
    """name -> (cli, MLflow run, run folder) of the two runs, made side by side (most of a tiny run is
    starting processes, which two cores do in parallel)."""

    def make(name: str) -> tuple[Cli, object, Path]:
        cli = Cli(mlflow_uri, tmp_path_factory.mktemp(f"use_{name}"))
        proc = cli(*RUNS[name], "trainer.max_steps=2", "trainer.device=cpu", f"tracking.run_name=use-{name}",
                   timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # torchao's notes on the CUDA kernel libraries a CPU cannot load, and torch's on torchao's enums, stay out
        said = proc.stdout + proc.stderr
        assert "Failed to load" not in said and "register_constant" not in said, said[-3000:]
        run = cli.run_by_name(f"use-{name}")
        assert run.info.status == "FINISHED"
        return cli, run, cli.out / "run"

    with ThreadPoolExecutor(2) as pool:
        made = dict(zip(RUNS, pool.map(make, RUNS), strict=True))
    return made


def _validation_loss(loaded: Loaded) -> float:
    """The run's held-out loss recomputed as the worker computes it: its corpus, tokenized by its codec,
    the same validation windows, costlab's own evaluate."""
    from costlab.data import build_corpus, eval_batches
    from costlab.data.tokens import tokenize_corpus
    from costlab.models.loss import evaluate

    cfg = loaded.config
    corpus = tokenize_corpus(build_corpus(cfg.data), loaded.codec)
    batches = eval_batches(corpus.val, cfg.model.block_size, cfg.trainer.eval_batch_size, cfg.trainer.eval_batches)
    return evaluate(loaded.model, batches, cfg, torch.device("cpu"))


def _one_line_error(excinfo: pytest.ExceptionInfo, starts: str) -> str:
    message = str(excinfo.value)
    assert message.startswith(starts) and "\n" not in message, message
    return message


def _use(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "costlab.use", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_the_final_model_loads_by_folder_and_by_run_id_and_evaluates_as_the_run_logged(runs, name):
    cli, run, folder = runs[name]
    by_folder = load_run(folder)
    assert by_folder.path == folder.resolve() / "model.pt" and not by_folder.model.training
    assert by_folder.config.runtime.run_id == run.info.run_id
    logged = run.data.metrics["eval/loss"]
    assert _validation_loss(by_folder) == pytest.approx(logged, rel=1e-4)
    assert run.data.metrics["eval/bits_per_byte"] == pytest.approx(logged / math.log(2))  # bytes: 1 per token
    by_id = load_run(run.info.run_id, tracking_uri=cli.uri)
    assert by_id.path == by_folder.path
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(by_id.model(x), by_folder.model(x))
    assert run.data.metrics["infer/decode_tokens_per_s"] > 0 and run.data.metrics["infer/ttft_ms"] > 0
    if name == "gpt":  # what the run shipped: structurally pruned (narrower) and int8 layers
        c_fc = by_folder.model.blocks["0"].mlp.c_fc
        weight = c_fc.weight() if callable(c_fc.weight) else c_fc.weight  # PyTorch's int8 Linear, or torchao's
        assert weight.dtype == torch.qint8 or type(weight) not in (torch.Tensor, nn.Parameter), type(weight)
        assert c_fc.out_features < by_folder.config.model.mlp_ratio * by_folder.config.model.n_embd

@pytest.mark.e2e
def test_the_uncompressed_model_is_the_trained_one_and_falls_back_when_nothing_was_compressed(runs, tmp_path):
    cli, run, folder = runs["gpt"]
    before = load_run(run.info.run_id, "uncompressed", tracking_uri=cli.uri)
    assert before.path == Path(run.data.tags["costlab.run_dir"]) / "uncompressed" / "model.pt"
    assert type(before.model.blocks["0"].mlp.c_fc) is nn.Linear
    assert _validation_loss(before) == pytest.approx(run.data.metrics["eval/loss_uncompressed"], rel=1e-4)
    # a run that compressed nothing saved one model: both names load it
    _, _, hf_folder = runs["hf"]
    assert load_run(hf_folder, "uncompressed").path == hf_folder.resolve() / "model.pt"
    # a compressed run whose uncompressed file is gone: refused, not replaced by the compressed one
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.yaml", "model.pt"):
        shutil.copy(folder / f, copy / f)
    with pytest.raises(ValueError) as e:
        load_run(copy, "uncompressed")
    assert "uncompressed/model.pt" in _one_line_error(e, "which=uncompressed: ")
    assert load_run(copy).path == copy.resolve() / "model.pt"


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_greedy_generation_is_deterministic_and_equals_recomputing_the_whole_prefix(runs, name):
    loaded = load_run(runs[name][2])
    prompt = loaded.codec.encode(PROMPT)
    new = generate_ids(loaded, prompt, 8)
    assert len(new) == 8 and new == generate_ids(loaded, prompt, 8)
    ids = list(prompt)
    with torch.no_grad():
        for token in new:  # the KV cache path against a full forward pass over all the ids so far
            logits = loaded.model(torch.tensor([ids]))[0, -1]
            # equal to the argmax, or within a hair of it (an int8 layer quantizes one token on its own scale)
            assert token == int(logits.argmax()) or float(logits.max() - logits[token]) < 1e-4, (ids, token)
            ids.append(token)
    text = generate(loaded, PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and text == loaded.codec.decode(prompt + new)[len(PROMPT):]
    assert loaded.generate(PROMPT, 8) == text
    sampled = generate(loaded, PROMPT, max_new_tokens=8, temperature=1.0, seed=3)
    assert isinstance(sampled, str) and sampled == generate(loaded, PROMPT, max_new_tokens=8, temperature=1.0, seed=3)
    assert generate_ids(loaded, prompt, 8, temperature=1.0, seed=3) != generate_ids(loaded, prompt, 8, 1.0, seed=4)


@pytest.mark.e2e
def test_generation_stops_at_block_size(runs):
    loaded = load_run(runs["gpt"][2])
    block = loaded.block_size
    assert len(generate_ids(loaded, [97] * (block - 3), 64)) == 3
    assert generate_ids(loaded, [97] * block, 64) == [] and generate(loaded, "a" * block) == ""
    with pytest.raises(ValueError) as e:
        generate(loaded, "a" * (block + 1))
    assert f"model.block_size={block}" in _one_line_error(e, "prompt=")
    with pytest.raises(ValueError) as e:
        generate(loaded, "")
    _one_line_error(e, "prompt=''")


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_score_gives_loss_tokens_and_bits_per_byte(runs, name):
    loaded = load_run(runs[name][2])
    result = score(loaded, TEXT)
    n_bytes = len(TEXT.encode("utf-8"))
    assert result["tokens"] == len(loaded.codec.encode(TEXT)) - 1 == n_bytes - 1  # both models are on bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / n_bytes)
    assert 0 < result["loss"] < 10 and loaded.score(TEXT) == result
    # the windows: every token but the first predicted once, none longer than the block
    batches = windows(loaded.codec.encode(TEXT), loaded.block_size)
    assert sum(y.numel() for _, y in batches) == result["tokens"]
    assert max(x.size(1) for x, _ in batches) == loaded.block_size
    # one window by hand: the mean cross-entropy of one forward pass
    ids = torch.tensor([loaded.codec.encode(TEXT)[: loaded.block_size + 1]])
    with torch.no_grad():
        by_hand = nn.functional.cross_entropy(loaded.model(ids[:, :-1])[0], ids[0, 1:])
    text = loaded.codec.decode(ids[0].tolist())
    assert score(loaded, text)["loss"] == pytest.approx(float(by_hand), rel=1e-5)


def test_what_a_user_can_get_wrong_is_one_line_naming_the_argument(mlflow_uri, tmp_path):
    with pytest.raises(ValueError) as e:
        load_run(tmp_path / "nowhere")
    _one_line_error(e, f"run={tmp_path / 'nowhere'}: no such run folder")
    with pytest.raises(ValueError) as e:
        load_run(tmp_path)
    _one_line_error(e, f"run={tmp_path}: the folder holds no config.yaml")
    (tmp_path / "config.yaml").write_text("model:\n  name: gpt_nano\n")
    with pytest.raises(ValueError) as e:
        load_run(tmp_path)
    assert _one_line_error(e, "run=").endswith("holds no model.pt (the run did not get to save its model)")
    with pytest.raises(ValueError) as e:
        load_run(tmp_path, "best")
    _one_line_error(e, "which=best: must be one of final, uncompressed")
    with pytest.raises(ValueError) as e:
        load_run("0123456789abcdef0123456789abcdef", tracking_uri=mlflow_uri)
    _one_line_error(e, "run=0123456789abcdef0123456789abcdef: no such folder, and no MLflow run with this id")
    with pytest.raises(ValueError) as e:
        load_run("0123456789abcdef0123456789abcdef", tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    _one_line_error(e, "run=0123456789abcdef0123456789abcdef: no such folder, and no MLflow store")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.e2e
def test_the_command_prints_text_and_scores(runs, tmp_path, capsys):
    cli, run, folder = runs["gpt"]
    proc = _use(str(folder), "--prompt", PROMPT, "--max-new-tokens", "8", "--uncompressed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("\n") and proc.stdout[:-1] == load_run(folder, "uncompressed").generate(PROMPT, 8)
    # the same entry point in this process (python -m costlab.use runs main): the scores
    (tmp_path / "text.py").write_text(TEXT)
    cli, run, hf_folder = runs["hf"]
    assert main([run.info.run_id, "--tracking-uri", cli.uri, "--score", str(tmp_path / "text.py")]) == 0
    printed = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()}
    expected = score(load_run(hf_folder), TEXT)
    assert printed["tokens"] == expected["tokens"]
    assert printed["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert printed["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_every_run_serves_its_final_model_and_logs_the_ladder_table_figure_and_price(runs, name, capsys,
                                                                                      tmp_path):
    """The run's serving ladder in MLflow: each rung's figures at the step of its concurrency (beside them the
    uncompressed model's, when the run compressed), the KV cache predicted as measured, the ladder as a table
    and a figure, and the price per million output tokens from the rung on target; then measured again from
    the saved model, here, through ``costlab.use``."""
    cli, run, folder = runs[name]
    c, m = cli.client(), run.data.metrics
    cap = int(run.data.params["serve.max_concurrency"])
    history = c.get_metric_history(run.info.run_id, "serve/tpot_ms_p99")
    assert sorted(h.step for h in history) == [2 ** k for k in range(cap.bit_length())]
    assert m["serve/kv_bytes_per_token"] == pytest.approx(m["serve/predicted_kv_bytes_per_token"], rel=0.02)
    target = int(m["serve/target_concurrency"])
    at_target = [h.value for h in c.get_metric_history(run.info.run_id, "serve/output_tokens_per_s")
                 if h.step == target]
    assert m["serve/target_output_tokens_per_s"] == pytest.approx(at_target[0])
    # on CPU one device is the node: its price per hour over the tokens it served in an hour
    assert m["serve/usd_per_1m_output_tokens"] == pytest.approx(
        m["cost/usd_per_hour"] / (m["serve/target_output_tokens_per_s"] * 3600) * 1e6)
    engine = {"gpt": "continuous batching", "hf": "static batching"}[name]
    assert run.data.tags["costlab.serve"].startswith(engine)
    compressed = name == "gpt"
    assert ("serve/target_speedup" in m) == compressed
    assert bool(c.get_metric_history(run.info.run_id, "serve/tpot_ms_p99_uncompressed")) == compressed
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "serve")}
    assert artifacts == {"serve/ladder.json", "serve/ladder.png"}
    table = json.loads(Path(c.download_artifacts(run.info.run_id, "serve/ladder.json", str(tmp_path))).read_text())
    assert {"model", "concurrency", "output_tokens_per_s", "tpot_ms_p99", "meets_target"} <= set(table["columns"])
    models = [row[table["columns"].index("model")] for row in table["data"]]
    assert len(models) == len(history) * (2 if compressed else 1)
    assert set(models) == ({"final", "uncompressed"} if compressed else {"final"})
    tags = json.loads(c.get_run(run.info.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "serve/ladder.json", "type": "table"} in tags  # the UI's table view finds it
    # measured again from the shipped model: the same ladder's rungs and KV cache
    assert main([str(folder), "--serve", "--max-concurrency", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(engine) and "at the target" in printed
    again = serve(load_run(folder), max_concurrency=2)
    assert list(again.rungs["final"]) == [1, 2]
    assert again.summary["serve/kv_bytes_per_token"] == m["serve/kv_bytes_per_token"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gpt", "hf"])
def test_the_final_model_is_an_mlflow_model_that_generates_in_a_fresh_process(runs, name, tmp_path):
    """``runs:/<run id>/model`` is a pyfunc model: loaded by MLflow in a fresh process started elsewhere, from
    the store alone, it continues a prompt as ``costlab.use`` does with the run's folder."""
    cli, run, folder = runs[name]
    uri = run.data.tags["costlab.mlflow_model"]
    assert uri == f"runs:/{run.info.run_id}/model"
    code = ("import json, sys, mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(json.dumps(list(m.predict(pd.DataFrame({'prompt': [sys.argv[2]]}), "
            "params={'max_new_tokens': 6}))))")
    proc = subprocess.run([sys.executable, "-c", code, uri, PROMPT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": cli.uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [load_run(folder).generate(PROMPT, 6)]
    model = {a.path for a in cli.client().list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/serving_input_example.json", "model/code", "model/conf"} <= model


@pytest.mark.e2e
def test_a_run_records_mlflows_system_metrics_while_it_runs(runs):
    cli, run, _ = runs["gpt"]
    cpu = cli.client().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = cli.client().get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert cpu and all(0 <= m.value <= 100 for m in cpu) and memory and all(m.value > 0 for m in memory)
    assert [m.step for m in sorted(cpu, key=lambda m: m.step)] == list(range(len(cpu)))  # one sample a second


@pytest.mark.e2e
def test_a_sweeps_pareto_front_models_are_registered_once(runs):
    import mlflow.pyfunc

    from costlab import report
    from costlab.report.deploy import front_runs, register_front

    cli, run, _ = runs["gpt"]
    c = cli.client()
    parent = c.create_run(run.info.experiment_id, run_name="a sweep", tags={"costlab.role": "sweep"}).info.run_id
    rep = report.build_report(report.load_runs(c, run_ids=[runs[n][1].info.run_id for n in RUNS]))
    fronts = {"size": ("model/size_bytes", False), "serving": ("serve/target_output_tokens_per_s", True)}
    front = front_runs(rep, fronts)
    registered = register_front(c, rep, parent, fronts)
    name = c.get_experiment(run.info.experiment_id).name
    versions = [v for v in c.search_model_versions(f"name='{name}'") if v.tags.get("sweep") == parent]
    assert len(registered) == len(front) >= 1 and {v.run_id for v in versions} == set(front)
    assert c.get_run(parent).data.tags["costlab.registered"] == "; ".join(registered)
    assert all(set(v.tags["pareto"].split(",")) <= set(fronts) for v in versions)
    assert register_front(c, rep, parent, fronts) == []  # a rebuilt report registers nothing twice
    # what the registry holds loads as the model it came from
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(cli.uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/{versions[0].version}")
    finally:
        mlflow.set_tracking_uri(before)
    folder = next(f for _, r, f in runs.values() if r.info.run_id == versions[0].run_id)
    import pandas as pd

    said = loaded.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"max_new_tokens": 4})
    assert list(said) == [load_run(folder).generate(PROMPT, 4)]


def test_the_command_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    proc = _use(str(tmp_path / "nowhere"), "--prompt", "x")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"costlab: error: run={tmp_path / 'nowhere'}: "), proc.stderr
    # the rest in this process: a file that is not there, a missing choice of what to do
    assert main([str(tmp_path), "--score", str(tmp_path / "none.txt")]) == 2
    missing = f"costlab: error: --score={tmp_path / 'none.txt'}: No such file or directory"
    assert capsys.readouterr().err.strip() == missing
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("costlab: error: one of the arguments --prompt --score --serve is required")
