"""bench/time_split.py: a call's wall time against its kernels' device time."""

import csv

from attn_zoo.bench import time_split


def test_each_mechanism_gets_four_rows_and_a_csv(tmp_path, capsys):
    out = tmp_path / "split.csv"
    assert time_split.main(["--impl", "reference", "--seq-len", "64", "--batch", "1",
                            "--heads", "2", "--head-dim", "32", "--calls", "2",
                            "--mechanisms", "dense,lsh", "--out", str(out)]) == 0  # fmt: skip
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 8 and table[1].startswith("| dense | yes | before |")
    rows = list(csv.DictReader(out.open()))
    assert [(r["mechanism"], r["causal"], r["planning"]) for r in rows[:4]] == [
        ("dense", "True", "False"), ("dense", "True", "True"),
        ("dense", "False", "False"), ("dense", "False", "True"),
    ]  # fmt: skip
    for row in rows:  # on a CPU nothing runs on a device
        assert float(row["wall_ms"]) > 0 and float(row["device_ms"]) == 0
        assert row["host_bound"] == "inf"


def test_an_impl_that_cannot_run_is_refused_in_one_line(capsys):
    assert time_split.main(["--impl", "nope", "--mechanisms", "dense"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("time_split: dense: unknown implementation 'nope'; accepted:")
    assert out.count("\n") == 1


def test_waits_and_copies_are_counted_per_call(monkeypatch):
    """The host's waits and copies come from the profiler's runtime events, per call."""

    class Event:
        def __init__(self, name):
            self.name, self.device_type = name, time_split.DeviceType.CPU

    class Profile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            names = ["cudaStreamSynchronize", "cudaMemcpyAsync", "aten::add"] * 4
            return [Event(name) for name in names]

    monkeypatch.setattr(time_split, "profile", Profile)
    found = time_split.split(lambda: None, 2, time_split.torch.device("cpu"))
    assert found["waits"] == 2 and found["copies"] == 2 and found["kernels"] == 0


def test_host_top_names_the_functions_that_took_the_host_time(capsys):
    def slow():
        sum(range(20000))

    found = time_split.host_top(lambda: slow(), 3, 2)
    assert found.count(" us") == 2 and "sum" in found
    assert time_split.main(["--impl", "reference", "--seq-len", "64", "--batch", "1",
                            "--heads", "2", "--head-dim", "32", "--calls", "1",
                            "--mechanisms", "dense", "--host-top", "2"]) == 0  # fmt: skip
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("dense, causal")]
    assert len(lines) == 4 and lines[0].count(" us") == 2


def test_a_failing_case_is_a_row_and_the_rest_still_runs(monkeypatch, tmp_path, capsys):
    """A case that raises (out of memory, say) is a row with its status, each row is
    in the CSV as soon as it is measured, and a machine without a profiler still gets
    its wall times."""
    real = time_split.split
    seen = []

    def flaky(call, calls, device):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return real(call, calls, device)

    monkeypatch.setattr(time_split, "split", flaky)
    out = tmp_path / "split.csv"
    assert time_split.main(["--impl", "reference", "--seq-len", "64", "--batch", "1",
                            "--heads", "2", "--head-dim", "32", "--calls", "1",
                            "--mechanisms", "dense", "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == [
        "ok", "failed: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB", "ok", "ok",
    ]  # fmt: skip
    assert rows[1]["wall_ms"] == "nan" and "failed: RuntimeError" in capsys.readouterr().out

    def no_profiler(*args, **kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(time_split, "profile", no_profiler)
    found = real(lambda: None, 2, time_split.torch.device("cpu"))
    assert found["wall_ms"] >= 0 and found["device_ms"] != found["device_ms"]  # NaN
    assert found["status"] == "ok, no profile: RuntimeError: CUPTI unavailable"
