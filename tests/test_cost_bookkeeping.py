"""benchmarks/cost.py's bookkeeping: floors interleaved with the methods, ratios only to adjacent floors
of the same run. Fake measurements, no timing."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cost.py"
spec = importlib.util.spec_from_file_location("cost_benchmark", PATH)
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)

GROUP = {"checkpoint": "testbed", "bytes": 10, "layers": 4, "stream": False, "domain": "wiki", "model": "m"}


def fake_measure(seconds: dict[str, list[float]]):
    """Each call returns the next number listed for its kind (floor) or method."""
    queues = {k: iter(v) for k, v in seconds.items()}
    counter = itertools.count()

    def measure_one(spec: dict) -> dict:
        what = spec.get("method", cost.FLOOR)
        s = next(queues[what])
        if s is None:
            return {"error": "boom"}
        load = float(next(counter))
        steps = {"forward": s / 2} if what == cost.FLOOR else {"compress": s / 2, "export": 0.1}
        cpu_steps = {"forward": s / 4} if what == cost.FLOOR else {"compress": s / 4}
        return {
            "cpu_steps": cpu_steps,
            "seconds": s,
            "cpu_seconds": s,
            "load_start": [load, 0, 0],
            "load_end": [load + 0.5, 0, 0],
            "peak_rss": 100,
            "steps": steps,
        }

    return measure_one


def collect(
    jobs: list[dict], seconds: dict, repeat: int, repeat_below: float = 60, group=GROUP
) -> list[dict]:
    samples: list[dict] = []
    cost.run_group(group, jobs, repeat, repeat_below, fake_measure(seconds), samples.append)
    return [s | {"run_id": "r1"} for s in samples]


def test_floors_interleave_and_slow_methods_run_once():
    jobs = [{"method": "reap", "keep": 8}, {"method": "naee", "keep": 8}]
    samples = collect(jobs, {"floor": [1.0] * 10, "reap": [2.0, 3.0, 4.0], "naee": [100.0]}, repeat=3)
    kinds = [s.get("method", "F") for s in samples]
    assert kinds == ["F", "reap", "F", "naee", "F", "reap", "F", "reap", "F"]
    assert [s["seq"] for s in samples] == list(range(len(samples)))


def test_rows_of_the_code_before_a_change_are_rows_of_their_own():
    jobs = [{"method": "naee", "keep": 8}, {"method": "naee", "keep": 8, "before": "35c434b"}]
    samples = collect(jobs, {"floor": [1.0, 2.0, 4.0], "naee": [3.0, 90.0]}, repeat=1)
    rows = [r for r in cost.summarize(samples) if r["kind"] == "prune"]
    assert [cost.job_label(j) for j in jobs] == ["naee|8", "naee@35c434b|8"]
    assert [(r.get("before"), r["seconds"], r["floor_seqs"]) for r in rows] == [
        (None, 3.0, [0, 2]),
        ("35c434b", 90.0, [2, 4]),
    ]
    assert "naee, at commit 35c434b" in cost._table_row(rows[1], 16)


def test_each_row_divides_by_its_adjacent_floors_only():
    jobs = [{"method": "reap", "keep": 8}, {"method": "msmoe", "keep": 4}]
    # F=1.0 reap=3 F=2.0 msmoe=8 F=4.0 reap=2.5 F=0.5 msmoe=9 F=10
    seconds = {"floor": [1.0, 2.0, 4.0, 0.5, 10.0], "reap": [3.0, 2.5], "msmoe": [8.0, 9.0]}
    rows = {(r["kind"], r.get("method")): r for r in cost.summarize(collect(jobs, seconds, repeat=2))}
    reap, msmoe, floor = rows["prune", "reap"], rows["prune", "msmoe"], rows["floor", None]
    assert reap["runs"] == 2 and reap["seconds"] == 2.5
    assert reap["floor_seqs"] == [0, 2, 4, 6] and reap["floor_seconds"] == 0.5
    assert reap["time_over_floor"] == pytest.approx(2.5 / 0.5)
    assert msmoe["floor_seqs"] == [2, 4, 6, 8] and msmoe["floor_seconds"] == 0.5
    assert msmoe["compress_over_forward"] == pytest.approx(4.0 / 0.25)
    assert msmoe["compress_cpu_over_forward_cpu"] == pytest.approx(2.0 / 0.125)
    assert floor["runs"] == 5 and floor["seconds"] == 0.5 and floor["seconds_max"] == 10.0
    assert reap["load_1min"][0] <= reap["load_1min"][1]


def test_a_failed_floor_is_skipped_for_the_next_one():
    jobs = [{"method": "reap", "keep": 8}, {"method": "ean", "keep": 8}]
    seconds = {"floor": [1.0, None, 3.0], "reap": [2.0], "ean": [5.0]}
    rows = {r.get("method"): r for r in cost.summarize(collect(jobs, seconds, repeat=1))}
    assert rows["reap"]["floor_seqs"] == [0, 4]
    assert rows["ean"]["floor_seqs"] == [0, 4]


def test_verified_runs_are_their_own_row():
    jobs = [{"method": "frequency", "keep": 8}, {"method": "frequency", "keep": 8, "verify": True}]
    rows = cost.summarize(collect(jobs, {"floor": [1.0] * 3, "frequency": [1.5, 9.0]}, repeat=1))
    verified = [r for r in rows if r.get("verify")]
    assert len(verified) == 1 and verified[0]["seconds"] == 9.0


def test_samples_of_two_runs_are_refused():
    jobs = [{"method": "reap", "keep": 8}]
    one = collect(jobs, {"floor": [1.0, 1.0], "reap": [2.0]}, repeat=1)
    two = [s | {"run_id": "r2"} for s in one]
    with pytest.raises(ValueError, match="one run"):
        cost.summarize(one + two)


def test_render_names_the_run_and_the_load():
    jobs = [{"method": "reap", "keep": 8}]
    samples = collect(jobs, {"floor": [1.0, 1.0], "reap": [None]}, repeat=1)
    pydoc = GROUP | {"domain": "pydoc"}
    samples += collect([{"method": "ean", "keep": 4}], {"floor": [1.0, 2.0], "ean": [3.0]}, 1, group=pydoc)
    meta = {
        "run_id": "r1",
        "started": "then",
        "finished": "later",
        "command": "python benchmarks/cost.py",
        "machine": cost.machine_info(),
        "versions": {"python": "3", "torch": "t", "transformers": "x", "moeshrink": "m", "commit": "abc"},
        "load_start": [1.0, 1.0, 1.0],
        "load_end": [2.0, 2.0, 2.0],
        "samples": 64,
        "seq_len": 256,
        "batch_size": 8,
        "repeat": 1,
        "repeat_below": 60,
    }
    text = cost.render({"meta": meta, "samples": samples})
    assert "Run `r1`" in text and "| 8 | reap | 1 | boom |" in text and "calibrated on pydoc" in text
    assert (
        "| 4 | ean | 1 | 3.00 | 1.00 | **3.00** | 0.75 | 0.25 | **3.00** | 3.00 | 1.00 | 3.00 | 3.00 |"
        in text
    )


def test_report_names_the_results_file_of_its_run():
    assert cost._results_name("python benchmarks/cost.py --out docs/cost_stun --keep 8") == "cost_stun.json"
    assert cost._results_name("python benchmarks/cost.py --keep 8") == "cost.json"
