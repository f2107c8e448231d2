"""MemoryTracker: the timeline is written as it goes, the summary compares with the prediction."""

import json
import time
from types import SimpleNamespace

from rich.console import Console

from vramfit.report import memory_summary_table, train_live, train_status, train_status_line
from vramfit.run.timeline_plot import memory_timeline_plot
from vramfit.run.tracker import MemoryTracker, predicted_peaks

GiB = 1 << 30
PREDICTED = {"peak_allocated_bytes": 4 * GiB, "peak_reserved_bytes": 5 * GiB, "device_bytes": 6 * GiB}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_each_reading_is_on_disk_before_the_run_ends_and_cpu_says_cuda_is_absent(tmp_path):
    path = tmp_path / "t.jsonl"
    tr = MemoryTracker(path, predicted=PREDICTED, interval_s=0.01).start()
    state = SimpleNamespace(global_step=0)
    tr.on_step_begin(None, state, None)
    time.sleep(0.05)
    state.global_step = 1
    tr.on_step_end(None, state, None)
    written = lines(path)  # not finished: the file already holds the readings
    assert written[0]["kind"] == "start" and written[0]["cuda"] is False and "CUDA is absent" in written[0]["note"]
    kinds = [r["kind"] for r in written]
    assert "step_begin" in kinds and kinds[-1] == "step_end" and kinds.count("sample") >= 2
    assert written[-1]["step"] == 1 and written[-1]["rss_bytes"] > 0 and written[-1]["allocated_bytes"] is None
    summary = tr.finish()
    assert lines(path)[-1]["kind"] == "summary" and summary["measured"]["rss_bytes"] > 0
    assert summary["relative_error"] == dict.fromkeys(PREDICTED)  # nothing measured on the GPU to compare
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert tr.finish() == summary  # idempotent


class FakeCuda(MemoryTracker):
    """Readings as a GPU would give them, to check the arithmetic."""

    def __init__(self, values, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values = iter(values + [(1, 1, 1)] * 1000)

    def reading(self):
        a, r, d = next(self.values)
        return {"allocated_bytes": a, "reserved_bytes": r, "peak_allocated_bytes": a, "peak_reserved_bytes": r,
                "device_bytes": d, "rss_bytes": None}


def test_summary_is_the_relative_error_of_the_prediction_per_peak(tmp_path):
    tr = FakeCuda([(1, 2, 3), (3 * GiB, 4 * GiB, 5 * GiB), (2 * GiB, 6 * GiB, 7 * GiB)], tmp_path / "t.jsonl",
                  predicted=PREDICTED, interval_s=60)
    tr.start()  # reading 1
    tr.sample()  # reading 2
    tr.sample()  # reading 3
    s = tr.finish()
    assert s["measured"] == {"peak_allocated_bytes": 3 * GiB, "peak_reserved_bytes": 6 * GiB,
                             "device_bytes": 7 * GiB, "rss_bytes": None}
    assert s["relative_error"] == {"peak_allocated_bytes": round(1 / 3, 4), "peak_reserved_bytes": round(-1 / 6, 4),
                                   "device_bytes": round(-1 / 7, 4)}
    table = memory_summary_table(s)
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "+33.3%" in text and "-16.7%" in text and "7.00" in text


def test_a_new_attempt_has_its_own_peaks_and_prediction(tmp_path):
    tr = FakeCuda([(9 * GiB, 9 * GiB, 9 * GiB), (1 * GiB, 2 * GiB, 3 * GiB)], None, predicted=PREDICTED,
                  interval_s=60, plot_path=None)
    tr.start()
    tr.begin_attempt({"micro_batch": 1}, {"peak_allocated_bytes": GiB, "peak_reserved_bytes": 2 * GiB,
                                          "device_bytes": 3 * GiB})
    s = tr.finish()
    assert s["measured"]["peak_allocated_bytes"] == GiB and s["measured_whole_run"]["peak_allocated_bytes"] == 9 * GiB
    assert s["predicted"]["peak_allocated_bytes"] == GiB and s["relative_error"]["peak_allocated_bytes"] == 0.0
    assert [r["message"] for r in tr.records if r["kind"] == "event"] == ["setup"]


def test_log_lines_keep_the_numbers_of_the_trainer_logs(tmp_path):
    tr = MemoryTracker(tmp_path / "t.jsonl", interval_s=60, plot_path=None).start()
    tr.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 2.5, "note": "x"})
    tr.finish()
    log = [r for r in lines(tmp_path / "t.jsonl") if r["kind"] == "log"]
    assert log == [{"kind": "log", "t": log[0]["t"], "step": 3, "loss": 2.5}]


def test_predicted_peaks_come_from_an_estimate_like_object():
    est = SimpleNamespace(peak_allocated_bytes=1, peak_reserved_bytes=2, device_bytes=3, other=4)
    assert predicted_peaks(est) == {"peak_allocated_bytes": 1, "peak_reserved_bytes": 2, "device_bytes": 3}
    assert predicted_peaks(None) is None


def test_plot_draws_gpu_lines_predictions_and_events(tmp_path):
    recs = [{"kind": "start", "cuda": True, "device": "H100", "capacity_bytes": 80 * GiB, "predicted": PREDICTED}]
    recs += [{"kind": "sample", "t": i / 10, "peak_allocated_bytes": i * GiB // 4, "peak_reserved_bytes": i * GiB // 3,
              "device_bytes": i * GiB // 2} for i in range(20)]
    recs.append({"kind": "event", "t": 1.0, "message": "out of memory"})
    memory_timeline_plot(recs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_status_line_for_pipes_shows_progress_loss_and_memory_against_prediction():
    s = train_status(5, 10, 30.0, 1234.0, 1.5, None, {"peak_allocated_bytes": 3 * GiB, "device_bytes": 5 * GiB},
                     PREDICTED)
    line = train_status_line(s)
    assert line.startswith("step 5/10 · loss 1.5000 · 1,234 tokens/s · allocated 3.00/4.00 GiB predicted")
    assert "device 5.00/6.00 GiB" in line and "ETA 0m30s" in line


def test_live_view_shows_gauges_against_the_prediction_in_a_terminal():
    console = Console(width=120, record=True, force_terminal=True)
    reading = {"peak_allocated_bytes": 3 * GiB, "peak_reserved_bytes": 4 * GiB, "device_bytes": 5 * GiB}
    console.print(train_live(train_status(5, 10, 30.0, None, 1.5, None, reading, PREDICTED), 80 * GiB))
    text = console.export_text()
    assert "step 5/10 · loss 1.5000" in text
    assert "3.00 GiB / predicted 4.00 / capacity 80.00" in text and text.count("|") == 3  # the predicted marks
