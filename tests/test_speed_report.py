"""The speed a report quotes says what measured it (transformers in PyTorch, the device, the dtype),
so it is never read as a serving engine's number."""

from __future__ import annotations

from moeshrink.evaluate.speed import measure_speed
from moeshrink.io.checkpoint import load_model
from moeshrink.report.report import write_report


def test_speed_names_its_engine_and_the_report_quotes_it(checkpoints, tmp_path):
    loaded = load_model(checkpoints["mixtral"], "float32")
    speed = measure_speed(loaded.model, batch_size=2, prompt_len=16, new_tokens=4, repeats=1)
    assert (
        speed["engine"].startswith("transformers ")
        and "CPU" in speed["engine"]
        and "float32" in speed["engine"]
    )
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    result = {
        "experts_per_layer": [8, 8, 8],
        "top_k": 2,
        "parameter_bytes": speed["parameter_bytes"],
        "domains": {"wiki": {"perplexity": 10.0, "tokens": 100}},
        "speed": speed,
    }
    write_report(tmp_path, {"unpruned": result}, baseline="unpruned", title="t", intro="i")
    report = (tmp_path / "report.md").read_text()
    assert f"measured by {speed['engine']}" in report and "--serving" in report
