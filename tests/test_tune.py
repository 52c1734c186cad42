"""The tune loop: checkpoints and --resume, the adapter folder, refusals, the CLI, mlx-lm loading."""

import json
from pathlib import Path

import numpy as np
import pytest

import moe_local
from moe_local.checkpoint import BUILTIN_MODELS
from moe_local.errors import UserError
from moe_local.tuning import folder as tune_folder
from moe_local.tuning import tune
from moe_local.tuning.adapter import read_adapter
from moe_local.tuning.report import TuneCallback

import checkpoints
from helpers import BACKENDS, answerable, answerable_records, run_cli, run_main, task_records, unit_rows, write_jsonl

SMALL = dict(layers=2, lr=1e-2, batch_size=4, lam_warmup=3, log_every=1)


def _task_file(m, folder, n):
    path = write_jsonl(folder / "train.jsonl", answerable(m, task_records(n)))
    np.save(path.with_suffix(".npy"), unit_rows(n))
    return path


def test_lambda_warmup():
    from moe_local.tuning.roma import lam_at

    assert [lam_at(s, 0.8, 4) for s in (1, 2, 4, 9)] == [0.2, 0.4, 0.8, 0.8]
    assert lam_at(1, 0.8, 0) == 0.8


class Interrupt(Exception):
    pass


class InterruptAt(TuneCallback):
    """Stops a run by raising once step ``stop`` has been taken (as a kill would, after its update)."""

    def __init__(self, stop: int = 1):
        self.stop = stop

    def on_step(self, step, row):
        if step >= self.stop:
            raise Interrupt


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# (save_every, log_every, the step after which the run is stopped, its latest checkpoint); 6 steps in all.
# A checkpoint between two logged steps must carry the metric sums of the steps since the last row.
RESUMES = [(2, 1, 5, 4), (3, 2, 4, 3)]


@pytest.mark.parametrize("save_every, log_every, stop, latest", RESUMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_interruption_gives_the_same_adapter(
    backend, save_every, log_every, stop, latest, olmoe_dir, tmp_path
):
    m = moe_local.load(str(olmoe_dir), backend=backend)
    records, emb = answerable_records(m, 10), unit_rows(10)
    settings = tune.TuneSettings(epochs=2, **{**SMALL, "save_every": save_every, "log_every": log_every})
    whole = tune.tune(m, records, emb, settings, tmp_path / "whole", progress="off")  # 3 steps per epoch

    with pytest.raises(Interrupt):
        tune.tune(m, records, emb, settings, tmp_path / "cut", callbacks=[InterruptAt(stop)], progress="off")
    assert tune_folder.latest_checkpoint(tmp_path / "cut").name == f"step-{latest:08d}"
    with pytest.raises(UserError, match="exists and is not empty"):
        tune.tune(m, records, emb, settings, tmp_path / "cut", progress="off")
    resumed = tune.tune(m, records, emb, settings, tmp_path / "cut", resume=True, progress="off")
    assert resumed.steps == whole.steps == 6
    a, _ = read_adapter(tmp_path / "whole")
    b, _ = read_adapter(tmp_path / "cut")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    rows = _rows(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(log_every, 7, log_every))
    assert all(tuple(r) == tune.METRIC_KEYS for r in rows)
    for key in ("loss", "ce", "manifold", "acc"):
        assert [r[key] for r in rows] == [r[key] for r in whole.metrics] == [r[key] for r in _rows(tmp_path / "whole")]
    # a resumed run with other settings is refused, naming the setting
    with pytest.raises(UserError, match="lr="):
        tune.tune(
            m,
            records,
            emb,
            tune.TuneSettings(**{**SMALL, "lr": 0.5}, epochs=2),
            tmp_path / "cut",
            resume=True,
            progress="off",
        )


def test_resume_draws_the_interrupted_epoch_from_the_checkpoints_rng_state(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 10), unit_rows(10)
    settings = tune.TuneSettings(epochs=2, **{**SMALL, "save_every": 2})
    whole = tune.tune(m, records, emb, settings, tmp_path / "whole", progress="off")
    with pytest.raises(Interrupt):
        tune.tune(m, records, emb, settings, tmp_path / "cut", callbacks=[InterruptAt(5)], progress="off")
    state = tune_folder.latest_checkpoint(tmp_path / "cut") / "state.json"
    info = json.loads(state.read_text())
    assert info["epoch"] == 1  # stopped inside the second epoch, one step into it
    info["rng"] = np.random.default_rng([99, 1]).bit_generator.state
    state.write_text(json.dumps(info))
    resumed = tune.tune(m, records, emb, settings, tmp_path / "cut", resume=True, progress="off")
    assert any(not np.array_equal(resumed.weights[k], whole.weights[k]) for k in whole.weights)


def test_adapter_folder_contents(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    result = tune.tune(
        m, answerable_records(m, 6), unit_rows(6), tune.TuneSettings(epochs=1, **SMALL), tmp_path / "A", progress="off"
    )
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
        "bank",
        "checkpoints",
        "metrics.jsonl",
    ]
    weights, config = read_adapter(tmp_path / "A")
    assert sorted(weights) == ["model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.weight"]
    assert all(w.dtype == np.float32 and w.shape == (8, 64) for w in weights.values())
    assert config["fine_tune_type"] == "full"
    ml = config["moe_local"]
    assert ml["layers"] == [2, 3] and ml["method"] == "roma"
    assert ml["fingerprint"] == m.spec.fingerprint([2, 3])
    for key in ("k", "lam", "sigma", "lr", "epochs", "batch_size", "lam_warmup", "seed", "weight_decay"):
        assert key in ml["hyperparameters"]
    bank = tmp_path / "A" / "bank"
    assert sorted(p.name for p in bank.iterdir()) == ["bank.json", "bank.safetensors"]
    meta = json.loads((bank / "bank.json").read_text())
    assert meta["layers"] == [2, 3] and meta["fingerprint"] == m.spec.fingerprint([2, 3]) and meta["data_sha256"]
    assert result.steps == 2 and len(result.metrics) == 2


def test_output_path_refusals(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 4), unit_rows(4)
    settings = tune.TuneSettings(epochs=1, **SMALL)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        tune.tune(m, records, emb, settings, tmp_path / "file", overwrite=True, progress="off")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a moe-local adapter"):
        tune.tune(m, records, emb, settings, tmp_path / "other", overwrite=True, progress="off")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
    with pytest.raises(UserError, match="not a moe-local adapter"):
        tune.tune(m, records, emb, settings, tmp_path / "lora", overwrite=True, progress="off")
    with pytest.raises(UserError, match="nothing to resume"):
        tune.tune(m, records, emb, settings, tmp_path / "new", resume=True, progress="off")


OUR_CONFIG = json.dumps({"fine_tune_type": "full", "moe_local": {}})
# Folders whose entries are named like an adapter's but are not provably this package's work.
LOOK_ALIKES = [
    {"checkpoints/my-model.bin": "weights", "metrics.jsonl": ""},
    {"metrics.jsonl": '{"step": 1}\n'},  # nothing marks the folder as an adapter
    {"adapters.safetensors": "weights"},
    {"bank/bank.json": "{}", "bank/notes.txt": "mine"},
    {"adapter_config.json": OUR_CONFIG, "checkpoints/step-00000002/notes.txt": "mine"},
    {"adapter_config.json": OUR_CONFIG, "metrics.jsonl": "my own log\nof runs\n"},
]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_folders_named_like_an_adapter(olmoe_dir, tmp_path, capsys):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 4), unit_rows(4)
    settings = tune.TuneSettings(epochs=1, **SMALL)
    for i, files in enumerate(LOOK_ALIKES):
        folder = tmp_path / f"user{i}"
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        before = _files(folder)
        with pytest.raises(UserError, match="not a moe-local adapter"):
            tune.tune(m, records, emb, settings, folder, overwrite=True, progress="off")
        assert _files(folder) == before, files
    path = _task_file(m, tmp_path / "user0", 4)  # the review's case, through the command line
    r = run_main(
        capsys,
        "tune",
        "--model",
        olmoe_dir,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "user0",
        "--overwrite",
        "--layers",
        2,
    )
    assert r[0] == 2 and "not a moe-local adapter (checkpoints)" in r[2]
    assert (tmp_path / "user0" / "checkpoints" / "my-model.bin").read_text() == "weights"
    assert (tmp_path / "user0" / "metrics.jsonl").exists()


def test_overwrite_replaces_the_adapter_only_once_the_new_run_succeeds(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 6), unit_rows(6)  # 2 steps per epoch
    out = tmp_path / "A"
    first = tune.tune(m, records, emb, tune.TuneSettings(epochs=1, **SMALL), out, progress="off")
    (out / ".keep").write_text("mine")  # a hidden file of the user's stays with the folder
    before = _files(out)
    again = tune.TuneSettings(epochs=2, **{**SMALL, "lr": 0.05})

    with pytest.raises(Interrupt):
        tune.tune(m, records, emb, again, out, overwrite=True, callbacks=[InterruptAt()], progress="off")
    assert _files(out) == before  # the failed replacement left the old adapter whole
    assert [p.name for p in tmp_path.iterdir()] == ["A"]  # and nothing beside it
    second = tune.tune(m, records, emb, again, out, overwrite=True, progress="off")
    weights, config = read_adapter(out)
    assert config["moe_local"]["hyperparameters"]["lr"] == 0.05
    for name in weights:
        np.testing.assert_array_equal(weights[name], second.weights[name])
        assert not np.array_equal(weights[name], first.weights[name])
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (out / ".keep").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["A"]
    # a bank given from the folder being replaced moves into the new one
    bank_json = (out / "bank" / "bank.json").read_text()
    tune.tune(m, records, emb, again, out, bank=out / "bank", overwrite=True, progress="off")
    assert (out / "bank" / "bank.json").read_text() == bank_json


def test_a_failed_run_leaves_only_what_the_next_run_can_use(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 6), unit_rows(6)
    settings = tune.TuneSettings(epochs=1, **SMALL)
    with pytest.raises(UserError, match="6 records"):
        tune.tune(m, records, unit_rows(5), settings, tmp_path / "runs" / "A", progress="off")
    assert not (tmp_path / "runs").exists()  # the folders it made are gone

    with pytest.raises(Interrupt):  # stopped before its first checkpoint
        tune.tune(m, records, emb, settings, tmp_path / "A", callbacks=[InterruptAt()], progress="off")
    assert [p.name for p in (tmp_path / "A").iterdir()] == ["bank"]
    result = tune.tune(m, records, emb, settings, tmp_path / "A", progress="off")
    assert result.prepare_s == 0  # the next run took the bank it left


def test_adapter_from_another_model_is_refused(olmoe_dir, qwen3_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    tune.tune(
        m, answerable_records(m, 4), unit_rows(4), tune.TuneSettings(epochs=1, **SMALL), tmp_path / "A", progress="off"
    )
    with pytest.raises(UserError, match="made for another model") as e:
        moe_local.load(str(qwen3_dir), backend="torch", adapter_path=tmp_path / "A")
    assert "\n" not in str(e.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a router adapter"):
        moe_local.load(str(olmoe_dir), backend="torch", adapter_path=tmp_path / "notes")


def test_mlx_lm_loader_gives_the_same_logits(tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    folder = checkpoints.make_qwen3_moe(tmp_path / "model", spelling="both")
    m = moe_local.load(str(folder), backend="torch")
    ids = np.array(m.tokenizer("What is 3 plus 4?\nAnswer:")["input_ids"])
    base = m.logits(ids)
    tune.tune(
        m,
        answerable_records(m, 8),
        unit_rows(8),
        tune.TuneSettings(epochs=1, **{**SMALL, "lr": 0.1}),
        tmp_path / "A",
        progress="off",
    )
    ours = moe_local.load(str(folder), backend="torch", adapter_path=tmp_path / "A").logits(ids)
    assert np.abs(ours - base).max() > 1e-3  # the adapter changes the model
    model, _ = load_model(Path(folder))
    load_adapters(model, str(tmp_path / "A"))
    theirs = np.array(model(mx.array(ids)[None]).astype(mx.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_cli_prepare_then_tune_with_config_file(olmoe_dir, tmp_path, capsys):
    path = _task_file(moe_local.load(str(olmoe_dir), backend="torch"), tmp_path, 6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layers: 2\nepochs: 1\nbatch_size: 3\nlr: 0.01\nlam_warmup: 0\nbackend: torch\n")
    bank = tmp_path / "A" / "bank"  # where tune looks for a bank by default
    r = run_cli("prepare", "--model", olmoe_dir, "--data", path, "--bank", bank, "--layers", 2)
    assert r.returncode == 0, r.stderr
    assert (bank / "bank.json").is_file()
    r = run_main(
        capsys,
        "tune",
        "--model",
        olmoe_dir,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "A",
        "-c",
        cfg,
        "--method",
        "router",
    )
    assert r[0] == 0, r[2]
    assert "prepare:" not in r[1]  # the prepared bank was used, not made again
    _, config = read_adapter(tmp_path / "A")
    assert config["moe_local"]["method"] == "router" and config["moe_local"]["hyperparameters"]["batch_size"] == 3
    assert "step 2/2" in r[1]  # plain metric lines when stdout is not a terminal
    r = run_main(capsys, "tune", "--model", olmoe_dir, "--data", path, "--adapter-path", tmp_path / "A", "-c", cfg)
    assert r[0] == 2 and "exists and is not empty" in r[2] and "Traceback" not in r[2]
    r = run_main(
        capsys,
        "tune",
        "--model",
        olmoe_dir,
        "--data",
        path,
        "--bank",
        bank,
        "--adapter-path",
        tmp_path / "A",
        "-c",
        cfg,
        "--method",
        "router",
        "--resume",
    )
    assert r[0] == 0, r[2]  # already complete: rewrites the same adapter
    r = run_main(capsys, "prepare", "--model", olmoe_dir, "--data", path, "--bank", bank, "--layers", 2)
    assert r[0] == 2 and "--overwrite" in r[2]


def test_cli_tune_and_eval_on_mlx(olmoe_dir, tmp_path, capsys):
    pytest.importorskip("mlx_lm")
    path = _task_file(moe_local.load(str(olmoe_dir), backend="mlx"), tmp_path, 6)
    common = ["--model", olmoe_dir, "--backend", "mlx"]
    r = run_main(
        capsys,
        "tune",
        *common,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "A",
        "--layers",
        2,
        "--epochs",
        1,
        "--batch-size",
        3,
        "--lr",
        0.05,
        "--lam-warmup",
        0,
    )
    assert r[0] == 0, r[2]
    assert "prepare:" in r[1] and "step 2/2" in r[1] and "wrote" in r[1]
    weights, config = read_adapter(tmp_path / "A")
    assert config["moe_local"]["layers"] == [2, 3] and config["moe_local"]["method"] == "roma"
    report = tmp_path / "report.json"
    r = run_main(
        capsys,
        "eval",
        *common,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "A",
        "--oracle",
        "--oracle-steps",
        2,
        "--report",
        report,
    )
    assert r[0] == 0, r[2]
    rows = json.loads(report.read_text())
    assert [(row["method"], row["backend"]) for row in rows] == [
        ("roma", "mlx"),
        ("oracle", "mlx"),
        ("oracle_wrong", "mlx"),
    ]
    r = run_main(
        capsys,
        "tune",
        *common,
        "--data",
        path,
        "--adapter-path",
        tmp_path / "A",
        "--layers",
        2,
        "--epochs",
        1,
        "--batch-size",
        3,
        "--lr",
        0.05,
        "--lam-warmup",
        0,
        "--resume",
    )
    assert r[0] == 0, r[2]  # already complete: rewrites the same adapter
    again, _ = read_adapter(tmp_path / "A")
    for name in weights:
        np.testing.assert_array_equal(again[name], weights[name])


def test_cli_tune_bad_inputs(olmoe_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", task_records(4))
    np.save(path.with_suffix(".npy"), unit_rows(5))
    r = run_main(
        capsys, "tune", "--model", olmoe_dir, "--data", path, "--adapter-path", tmp_path / "A", "--layers", "2"
    )
    assert r[0] == 2 and "has 5 rows but the data has 4 records" in r[2]
    path.with_suffix(".npy").unlink()
    r = run_main(
        capsys, "tune", "--model", olmoe_dir, "--data", path, "--adapter-path", tmp_path / "A", "--layers", "2"
    )
    assert r[0] == 2 and "moe-local embed" in r[2]
    assert not (tmp_path / "A").exists()
    for flag in ("--batch-size", "--layers"):
        r = run_main(capsys, "prepare", "--model", olmoe_dir, "--data", path, "--bank", tmp_path / "B", flag, 0)
        assert r[0] == 2 and f"Invalid value for '{flag}'" in r[2], (flag, r[2])
    assert not (tmp_path / "B").exists()


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", "float32"), ("torch", "bfloat16"), pytest.param("mlx", "float32", marks=BACKENDS[1].marks)],
)
def test_prefix_cache_modes_agree(olmoe_dir, tmp_path, backend, dtype):
    m = moe_local.load(str(olmoe_dir), backend=backend, dtype=dtype)
    records, emb = answerable_records(m, 6), unit_rows(6)
    out = {}
    modes = ("memory", "disk", "recompute", "full") if dtype == "float32" else ("memory", "disk")
    for mode in modes:
        settings = tune.TuneSettings(epochs=1, prefix_cache=mode, **{**SMALL, "batch_size": 3})
        out[mode] = tune.tune(m, records, emb, settings, tmp_path / mode, progress="off")
        assert not (tmp_path / mode / tune_folder.CACHE_FILE).exists()  # the memory-mapped file is removed
    for name in out["memory"].weights:  # exact bytes round trip through the file
        np.testing.assert_array_equal(out["disk"].weights[name], out["memory"].weights[name])
    # the prefix run in another batch layout, or the whole model: the same losses up to rounding
    loss = [r["loss"] for r in out["memory"].metrics]
    for mode in modes[2:]:
        np.testing.assert_allclose([r["loss"] for r in out[mode].metrics], loss, rtol=1e-5)


def test_a_tuned_result_that_is_not_finite_is_never_written(olmoe_dir, tmp_path):
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 4), unit_rows(4)
    settings = tune.TuneSettings(epochs=1, **{**SMALL, "lr": 1e39})  # finite in Python, inf in the float32 routers
    with pytest.raises(
        UserError, match="holds NaN or infinite values after step 1; no checkpoint or adapter is written"
    ):
        tune.tune(m, records, emb, settings, tmp_path / "A", progress="off")
    assert not (tmp_path / "A" / "adapters.safetensors").exists()
    assert tune_folder.latest_checkpoint(tmp_path / "A") is None


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
        ({"lam": float("nan")}, "--lam must be a finite number"),
        ({"seed": -1}, "--seed must be at least 0"),
        ({"epochs": 2.7}, "--epochs must be an integer, got 2.7"),
        ({"layers": True}, "--layers must be an integer"),
    ],
)
def test_settings_are_checked_before_any_work(setting, message):
    with pytest.raises(UserError, match=message):
        tune.TuneSettings(**setting).check()


def test_cli_refuses_bad_settings_before_any_work(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, task_records(4))
    np.save(tmp_path / "d.npy", unit_rows(4))
    (tmp_path / "cfg.yaml").write_text("epochs: 2.7\n")
    for extra, message in [
        (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["-c", tmp_path / "cfg.yaml"], "'epochs' must be an integer, got 2.7"),
    ]:
        code, out, err = run_main(capsys, "tune", "--data", data, "--adapter-path", tmp_path / "A", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert out == "" and not (tmp_path / "A").exists()


def test_the_default_layer_count_fits_the_model(tmp_path, capsys):
    from moe_local.families import spec_from_config
    from moe_local.tuning.roma import tuned_layers

    wide = spec_from_config(dict(checkpoints.QWEN3, model_type="qwen3_moe", num_hidden_layers=7))
    assert tuned_layers(wide, None) == (2, 3, 4, 5, 6)  # the paper's 5
    # tiny has 4 MoE layers: a bare `moe-local tune` tunes them all
    suite = BUILTIN_MODELS["tiny"].parent / "suite"
    data = tmp_path / "d.jsonl"
    data.write_text("".join((suite / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    np.save(tmp_path / "d.npy", np.load(suite / "train.npy")[:8])
    code, out, err = run_main(capsys, "tune", "--data", data, "--adapter-path", tmp_path / "A", "--epochs", 1)
    assert code == 0, err
    _, config = read_adapter(tmp_path / "A")
    assert config["moe_local"]["layers"] == [0, 1, 2, 3] and config["moe_local"]["hyperparameters"]["layers"] == 4
    code, out, err = run_main(capsys, "eval", "--data", data, "--oracle", "--oracle-steps", 1)
    assert code == 0 and "oracle: accuracy" in out, err


def test_claim_repairs_what_a_killed_overwrite_run_left(tmp_path):
    def make(folder, files):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    old = {"adapter_config.json": OUR_CONFIG, "adapters.safetensors": "old", "bank/bank.json": "{}", ".keep": "mine"}
    new = {"adapter_config.json": OUR_CONFIG, "adapters.safetensors": "new"}
    # killed between the swap's two renames: the old adapter is aside, the new one not yet in place
    make(tmp_path / ".A.old-x1", old)
    make(tmp_path / ".A.partial-x2", new)
    with tune_folder.claim(tmp_path / "A"):
        assert _files(tmp_path / "A") == {k: v.encode() for k, v in old.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]
    # killed after the swap, before the kept bank and the user's hidden file were moved over
    (tmp_path / "A").rename(tmp_path / ".A.old-bank-x3")
    make(tmp_path / "A", {**new, "checkpoints/.step-00000002.partial-x4/state.json": "{", ".prefix-cache.bin": ""})
    with tune_folder.claim(tmp_path / "A"):
        assert _files(tmp_path / "A") == {
            k: v.encode() for k, v in {**new, "bank/bank.json": "{}", ".keep": "mine"}.items()
        }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]


def test_a_checkpoint_or_bank_that_is_not_finite_is_refused(olmoe_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 4), unit_rows(4)
    settings = tune.TuneSettings(epochs=1, **SMALL)
    tune.tune(m, records, emb, settings, tmp_path / "A", progress="off")
    for path, key, run in [
        (tune_folder.latest_checkpoint(tmp_path / "A") / "state.safetensors", "exp_avg_sq", dict(resume=True)),
        (tmp_path / "A" / "bank" / "bank.safetensors", "routing", dict(bank=tmp_path / "A" / "bank")),
    ]:
        tensors = load_file(str(path))
        name = next(n for n in tensors if key in n)
        tensors[name][0] = np.nan
        save_file(tensors, str(path))
        out = tmp_path / ("A" if "resume" in run else "B")
        with pytest.raises(UserError, match=f"{name}' holds NaN or infinite values|{name} holds NaN or infinite"):
            tune.tune(m, records, emb, settings, out, progress="off", **run)
    assert not (tmp_path / "B").exists()


@pytest.mark.slow
def test_cli_prepare_and_tune_in_rc_from_a_datasets_folder(olmoe_dir, tmp_path, capsys):
    """--format rc reaches what prepare counts as correct (acc, as eval counts it) and the CE tune
    trains on; a bank made in one format is refused for another."""
    import datasets

    from moe_local.tuning.bank import read_bank
    from moe_local.tuning.data import read_task
    from moe_local.tuning.evaluate import evaluate

    rows = [
        {"goal": r["question"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": i % 2}
        for i, r in enumerate(task_records(6))
    ]
    folder = tmp_path / "piqa"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    np.save(tmp_path / "piqa.train.npy", unit_rows(6))  # the default embeddings of split train
    bank = tmp_path / "A" / "bank"
    picked = ["--data", folder, "--split", "train", "--format", "rc"]
    r = run_main(capsys, "prepare", "--model", olmoe_dir, *picked, "--bank", bank, "--layers", 2)
    assert r[0] == 0, r[2]
    made = read_bank(bank)
    assert made.meta["prompting"]["format"] == "rc"
    records, asked = read_task(folder, "train", format="rc")
    m = moe_local.load(str(olmoe_dir), backend="torch")
    result = evaluate(m, records, layers=2, progress="off", prompting=asked)
    np.testing.assert_array_equal(made.correct, result.predictions == [r.answer for r in records])
    tuned = ["--adapter-path", tmp_path / "A", "--layers", 2, "--epochs", 1, "--batch-size", 3, "--method", "router"]
    r = run_main(capsys, "tune", "--model", olmoe_dir, *picked, *tuned)
    assert r[0] == 0, r[2]
    _, config = read_adapter(tmp_path / "A")
    assert config["moe_local"]["hyperparameters"]["prompting"]["format"] == "rc"
    again = ["--bank", bank, "--adapter-path", tmp_path / "B", "--layers", 2]
    r = run_main(capsys, "tune", "--model", olmoe_dir, "--data", folder, "--split", "train", *again)
    assert r[0] == 2 and "made from other data" in r[2]  # an rc bank for an mc run


class Snapshots(TuneCallback):
    def __init__(self):
        self.epochs = {}

    def on_epoch(self, epoch, weights):
        self.epochs[epoch] = weights


def test_epoch_snapshots_are_the_routers_of_shorter_runs(olmoe_dir, tmp_path):
    """on_epoch(e, weights): what a run of e epochs ends with, bit for bit (the sweep picks epochs this way)."""
    m = moe_local.load(str(olmoe_dir), backend="torch")
    records, emb = answerable_records(m, 10), unit_rows(10)
    seen = Snapshots()
    three = tune.tune(m, records, emb, tune.TuneSettings(epochs=3, **SMALL), tmp_path / "3", callbacks=[seen])
    two = tune.tune(m, records, emb, tune.TuneSettings(epochs=2, **SMALL), tmp_path / "2", progress="off")
    assert sorted(seen.epochs) == [1, 2, 3]
    for name in two.weights:
        np.testing.assert_array_equal(seen.epochs[2][name], two.weights[name])
        np.testing.assert_array_equal(seen.epochs[3][name], three.weights[name])
        assert not np.array_equal(seen.epochs[1][name], seen.epochs[2][name])
