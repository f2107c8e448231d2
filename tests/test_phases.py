"""The whole run's phases (issue 19, item 5): loading, the training steps, evaluation and a checkpoint
save, each replayed through the allocator model from the state the one before left.  The evaluation
and the save are a stream of their own (training_events(after=True)); the training stream, and so the
event templates, are the same with or without it."""

import dataclasses
import json

import pytest

from conftest import TINY_LLAMA

pytest.importorskip("torch")

MiB = 1 << 20
TINY_MIXTRAL = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def _spec(cfg=TINY_LLAMA, name="tiny"):
    from vramfit.model.spec import spec_from_config

    return spec_from_config(name, dict(cfg))


def _events(spec, steps=2, eval_batch=None, **kw):
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets

    s = make_setup(**{"seq_len": 64, "micro_batch": 2, **kw})
    return s, training_events(spec, s, resolve_targets(spec, s), steps=steps, after=True, eval_batch=eval_batch)


def _phases(res, expandable=False):
    from vramfit.memory.replay import replay_phases

    return replay_phases([(res["events"], res["marks"]), (res["after"]["events"], res["after"]["marks"])],
                         expandable=expandable)


@pytest.mark.parametrize("kw", [{"method": "lora", "loss": "fused"},
                                {"method": "full", "precision": "bf16-mixed", "grad_ckpt": True}])
def test_the_training_stream_is_unchanged_and_the_rest_of_the_run_is_its_own(kw):
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template_build import same_events

    spec = _spec()
    s, res = _events(spec, **kw)
    plain = training_events(spec, s, resolve_targets(spec, s), steps=2)
    assert res["events"] == plain["events"] and res["marks"] == plain["marks"]
    post = res["after"]
    assert post["foreign_frees"] == 0  # evaluation and saving free nothing of the training's
    allocated = {ev[1] for ev in post["events"] if ev[0] == "a"}
    assert allocated == set(range(len(allocated)))  # ids of its own: it can follow any training stream
    assert all(ev[1] in allocated for ev in post["events"] if ev[0] == "f")
    live = set(allocated) - {ev[1] for ev in post["events"] if ev[0] == "f"}
    assert live == set()  # the run is back to its training state after them
    # recorded right after the load, as after the steps (what the template builder records)
    _, fresh = _events(spec, steps=0, **kw)
    assert same_events(fresh["after"]["events"], post["events"])


def test_evaluation_is_a_forward_without_saved_activations_and_grows_with_its_batch():
    from vramfit.memory.replay import run_phases

    spec = _spec()
    _, res = _events(spec, method="lora", seq_len=128, micro_batch=2)
    ph = run_phases(_phases(res))
    assert list(ph) == ["load", "forward", "backward", "optimizer", "eval", "save"]
    state = res["after"]["marks"]  # eval0 starts from what the steps leave
    assert state["eval0"] == 0 < state["eval1"] < state["save"] < state["end"]
    # no_grad: nothing kept for a backward, no gradients: below the training step at the same batch
    assert ph["eval"][0] < ph["backward"][0]
    # a larger eval micro-batch (per_device_eval_batch_size) can make evaluation the run's peak
    _, big = _events(spec, method="lora", seq_len=128, micro_batch=2, eval_batch=16)
    pb = run_phases(_phases(big))
    assert pb["eval"][0] > ph["eval"][0] and pb["eval"][0] > pb["backward"][0]
    assert pb["forward"] == ph["forward"] and pb["backward"] == ph["backward"]  # the steps untouched


def test_a_full_logits_evaluation_holds_the_logits_their_fp32_copy_and_log_softmax_at_once():
    from vramfit.memory.replay import run_phases

    spec = _spec(dict(TINY_LLAMA, vocab_size=8192))
    _, res = _events(spec, method="lora", seq_len=256, micro_batch=4)
    post = res["after"]
    first = post["events"][:post["marks"]["eval1"]]
    logits = 4 * 256 * 8192  # B x S x vocab
    live, cur, peak, sizes = {}, 0, 0, []
    for ev in first:
        if ev[0] == "a":
            live[ev[1]] = ev[2]
            cur += ev[2]
            peak = max(peak, cur)
            sizes.append(ev[2])
        elif ev[0] == "f":
            cur -= live.pop(ev[1])
    # bf16 logits, the loss's fp32 copy and log-softmax, accelerate's fp32 copy of the outputs
    assert sorted(sizes)[-4:] == [2 * logits, 4 * logits, 4 * logits, 4 * logits]
    assert peak >= 10 * logits
    ph = run_phases(_phases(res))
    assert ph["eval"][0] >= ph["optimizer"][0] - 4 * MiB + 10 * logits - 2 * MiB


def test_saving_allocates_nothing_for_a_dense_model_but_lora_reloads_its_adapter():
    from vramfit.memory.replay import replay_phases

    spec = _spec()
    for method in ("full", "lora"):
        _, res = _events(spec, method=method)
        post = res["after"]
        allocs = [ev[2] for ev in post["events"][post["marks"]["save"]:] if ev[0] == "a"]
        if method == "full":
            assert allocs == []  # transformers' save_pretrained: views; the writer copies to the host
            assert "save.load_best" not in post["marks"]
            continue
        # load_best_model_at_end: LoRA r=16 on q (64->64) and v (64->32) of 3 layers, fp32, loaded back once
        expected = 3 * 4 * ((16 * 64 + 64 * 16) + (16 * 64 + 32 * 16))
        assert post["marks"]["save.load_best"] == post["marks"]["save"]  # the adapter save itself: nothing
        assert sum(allocs) == expected
        out = replay_phases([(res["events"], res["marks"]), (post["events"], post["marks"])])["phases"]
        assert out["load_best"]["peak_allocated"] >= out["save"]["allocated_end"] + expected


def test_a_moe_full_save_reverts_the_fused_experts_on_the_gpu():
    spec = _spec(TINY_MIXTRAL, "tiny-mixtral")
    _, res = _events(spec, steps=0, method="full", precision="bf16-true")
    post = res["after"]
    save = post["events"][post["marks"]["save"]:]
    # transformers 5 reverts each layer's fused gate_up experts (4 x 192 x 64) to the checkpoint's
    # gate and up: clones on the GPU, all alive until the state dict is written
    assert [ev[2] for ev in save if ev[0] == "a"] == [4 * 96 * 64 * 2] * 4
    assert [ev[0] for ev in save] == ["a"] * 4 + ["f"] * 4


def test_qlora_saves_one_nested_code_clone_per_4bit_layer():
    from vramfit.memory.kernels import QUANT_STATE_CODE

    spec = _spec()
    _, res = _events(spec, steps=0, method="qlora")
    post = res["after"]
    save = post["events"][post["marks"]["save"]:post["marks"]["save.load_best"]]
    clones = [ev for ev in save if ev[0] == "a"]
    # all-linear on 3 layers: q, k, v, o, gate, up, down
    assert [ev[2] for ev in clones] == [QUANT_STATE_CODE] * 21
    assert [ev[1] for ev in save if ev[0] == "f"] == [ev[1] for ev in clones]  # freed in the state dict's order


def test_phase_replay_agrees_with_the_allocator_simulation():
    from vramfit.memory.allocator import simulate
    from vramfit.memory.replay import replay_phases

    spec = _spec()
    for expandable in (False, True):
        _, res = _events(spec, method="lora", seq_len=96, micro_batch=3)
        sim = simulate(res["events"], expandable_segments=expandable)
        ph = replay_phases([(res["events"], res["marks"])], expandable=expandable)
        assert (ph["peak_allocated"], ph["peak_reserved"]) == (sim["peak_allocated"], sim["peak_reserved"])
        assert ph["peak_allocated"] == max(p["peak_allocated"] for p in ph["phases"].values())
        whole = _phases(res, expandable)
        assert whole["peak_allocated"] >= ph["peak_allocated"] and whole["peak_reserved"] >= ph["peak_reserved"]
        # the rest of the run starts from the training's end state: its cached blocks
        assert whole["phases"]["eval"]["peak_reserved"] >= ph["reserved"]


def test_a_cap_stops_the_replay_in_the_phase_that_runs_out():
    from vramfit.memory.replay import replay_phases, run_phases

    spec = _spec()
    _, res = _events(spec, method="lora", seq_len=128, micro_batch=2, eval_batch=32)
    parts = [(res["events"], res["marks"]), (res["after"]["events"], res["after"]["marks"])]
    free = run_phases(replay_phases(parts))
    steps = max(free["backward"][1], free["forward"][1], free["optimizer"][1])
    assert free["eval"][1] > steps
    capped = replay_phases(parts, limit_bytes=steps + 4 * MiB)
    assert capped["oom"] and capped["oom_phase"] == "eval"


def test_the_estimate_reports_the_whole_runs_phases(tmp_path, monkeypatch):
    from vramfit import api
    from vramfit.report import estimate_summary

    monkeypatch.delenv("VRAMFIT_REPLAY", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    est = api.estimate(str(tmp_path / "config.json"), method="lora", seq_len=128, micro_batch=2,
                       use_calibration=False)
    assert list(est.phases) == ["load", "forward", "backward", "optimizer", "eval", "save"]
    assert est.peak_allocated_bytes == max(est.phases.values())
    assert est.peak_phase == max(est.phases, key=est.phases.get)
    out = est.to_json()
    assert out["phases"] == est.phases and out["peak_phase"] == est.peak_phase
    assert any(n.startswith("replayed reserved peaks by phase (GiB): load ") for n in out["notes"])
    lines = estimate_summary(est)
    line = next(x for x in lines if x.startswith("peak phase:"))
    assert line.startswith(f"peak phase: {est.peak_phase}, of the whole run replayed (load ")
    assert "eval" in line and "save" in line
    fitted = api.estimate(str(tmp_path / "config.json"), method="lora", seq_len=128, micro_batch=2,
                          use_calibration=False, replay=False)
    assert set(fitted.phases) == {"forward", "backward", "optimizer"}
    assert next(x for x in estimate_summary(fitted) if x.startswith("peak phase:")).endswith("GiB allocated)")


def test_the_post_training_template_expands_to_the_recorded_stream(tmp_path, monkeypatch):
    """Built once on a 12-layer Llama (template_build, recording this stream), expanded torch-free at
    other sequence lengths, ranks and batch sizes of the regime: the recorded stream, event for event."""
    from vramfit.memory import replay as R
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_build import same_events

    spec = _spec(dict(TINY_LLAMA, num_hidden_layers=12), "tiny12")
    s = make_setup(method="lora", precision="bf16-amp", seq_len=300, micro_batch=4)
    targets = resolve_targets(spec, s)
    got = R.post_template(spec, s, targets)
    assert got["template"] is not None, got["note"]
    for B, S, r in ((4, 300, 16), (3, 1000, 64), (2, 2050, 4)):
        s2 = dataclasses.replace(s, micro_batch=B, seq_len=S, lora_r=r)
        fast = R.post_stream(spec, s2, targets, build=False)
        assert fast["source"] == "template"
        rec = training_events(spec, s2, targets, steps=0, after=True)["after"]
        assert same_events(fast["events"], rec["events"]), (B, S, r)
        assert fast["marks"] == {k: v for k, v in rec["marks"].items()}


def test_qlora_load_is_carved_from_the_warmup_segment_and_keeps_its_reserve():
    """from_pretrained's caching_allocator_warmup: one block of the model's bytes (4-bit weights at half a
    byte, the rest in bf16) before anything loads; prepare_model_for_kbit_training's empty_cache then
    releases nothing (all 12 QLoRA recipes runs on the H100 kept their load's reserved memory)."""
    from vramfit.memory.replay import replay_phases

    spec = _spec()
    _, res = _events(spec, steps=0, method="qlora")
    first = res["events"][0]
    h, i, v, layers = 64, 176, 512, 3
    quantized = layers * (h * h + 2 * (h * 32) + h * h + 3 * h * i)
    rest = 2 * v * h + (2 * layers + 1) * h  # embeddings and head (untied), norms
    assert first[0] == "a" and first[2] == quantized // 2 + 2 * rest and res["events"][1] == ("f", first[1])
    load = replay_phases([(res["events"], res["marks"])])["phases"]["load"]
    assert load["reserved_end"] == load["peak_reserved"]
    assert sum(1 for ev in res["events"] if ev[0] == "e") == 2  # prepare's empty_cache and the Trainer's


def test_the_phase_report_compares_measured_phases_with_their_replay(tmp_path):
    from benchmarks.accuracy import cases
    from benchmarks.accuracy.report import phase_rows, phases_markdown

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    case = cases.training_case(str(tmp_path / "config.json"), "lora", "bf16-amp", "adamw_torch", 64, 2,
                               target_modules=["q_proj", "v_proj"])
    meas = {"peak_allocated_bytes": 400_000, "peak_reserved_bytes": 2 * MiB, "allocated_end_bytes": 400_000,
            "reserved_end_bytes": 2 * MiB}
    rec = {"label": "tiny", "status": "ok", "case": dict(case, after=["eval", "save"]),
           "phases_outside_steps": {"load": meas, "setup": meas, "eval": meas, "save": meas, "load_best": meas}}
    rows = phase_rows([rec])
    assert [r["phase"] for r in rows] == ["load", "setup", "eval", "save", "load_best"]
    by = {r["phase"]: r for r in rows}
    assert by["eval"]["pred_allocated"] > by["save"]["pred_allocated"] >= by["setup"]["pred_allocated_end"]
    for r in rows:
        assert r["err_allocated"] == pytest.approx((r["pred_allocated"] - 400_000) / 400_000)
    assert "| eval lora | 1 | allocated |" in phases_markdown(rows)
