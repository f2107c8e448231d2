"""The GPU proof drivers' torch-free logic: schedules, resuming, the OOM run's design, report merging."""

from __future__ import annotations

import json

from benchmarks.plan_proof import report as plan_report
from benchmarks.plan_proof import run as plan_run
from benchmarks.train_proof import report as train_report
from benchmarks.train_proof import run as train_run


def test_next_larger_is_the_first_rejected_micro_batch():
    import vramfit
    from vramfit.planner.search import Evaluator
    from vramfit.model.spec import load_spec

    spec = load_spec("qwen2.5-0.5b")
    p = vramfit.plan(spec, gpu=plan_run.plan_device("12GB"), seq_len=512, effective_batch=4)
    ev = Evaluator(spec)
    c = plan_run.next_larger(p, ev)
    assert c is not None and not c.fits and c.setup.micro_batch > p.chosen.setup.micro_batch
    below = c.setup.micro_batch - 1
    if below > p.chosen.setup.micro_batch:  # beyond the effective batch: the one below still fits
        assert ev.candidate(c.setup.with_(micro_batch=below, grad_accum=1), p.device, p.usable_bytes).fits


def test_schedule_and_skip_done(tmp_path):
    args = plan_run.parse_args(["--print-schedule", "--models", "qwen2.5-0.5b", "--budgets", "8GB", "40GB"])
    w = plan_run.Work(args, "qwen2.5-0.5b")
    roles = [t["role"] for t in w.trials]
    assert roles[:2] == ["plan", "plan"] and "next_larger" in roles and "alt" in roles
    assert w.seconds(args, set()) > plan_run.PROCESS_START_S
    out = tmp_path / "pp.jsonl"
    first = w.trials[0]
    s = plan_run.setup_json(first["plan"].chosen.setup)
    base = {"kind": "trial", "model": "qwen2.5-0.5b", "overrides": {}, "seq_len": 512, "effective_batch": 4,
            "budget": first["budget"], "role": "plan", "setup": s, "steps_asked": 20}
    out.write_text(json.dumps({**base, "status": "ok", "steps_done": 11}) + "\n")  # cut: run again
    done = plan_run.load_done(str(out))[0]
    assert first["key"] not in done
    with out.open("a") as f:
        f.write(json.dumps({**base, "status": "ok", "steps_done": 20}) + "\n{cut")
    done = plan_run.load_done(str(out))[0]
    assert first["key"] in done and first not in w.pending(args, done)
    # the report counts the complete trial, not the cut one
    assert [t["steps_done"] for t in plan_report.latest(plan_report.load(str(out))[:2], "plan")] == [20]


def test_oom_design_exceeds_the_cap_and_the_fallback_fits():
    d = train_run.oom_design()
    assert d["fixed"]["predicted_allocated_gib"] >= (1 + train_run.OOM_MARGIN) * d["allocator_cap_gib"]
    assert d["fallback_first_rung"]["reserved_share_of_cap"] <= 1 - train_run.OOM_MARGIN


def test_train_report_merges_commands(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, lines in ((a, [{"run": "x", "status": "completed"}, {"run": "y", "status": "timeout"}]),
                     (b, [{"run": "x", "status": "skipped (out of time)"}, {"run": "y", "status": "completed"}])):
        d.mkdir()
        (d / "train_proof.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    dest = tmp_path / "merged"
    lines = [json.loads(x) for src in (a, b) for x in train_report.unpack(src, dest)]
    assert [(r["run"], r["status"]) for r in train_report.merged(lines)] == [("x", "completed"), ("y", "completed")]


def test_supersede_replaces_a_role_per_model_budget_and_drops_older_alternatives():
    def t(f, role, mb, status="ok", tps=None, budget="12GB"):
        return {"kind": "trial", "_file": f, "model": "m", "budget": budget, "role": role, "status": status,
                "setup": {"micro_batch": mb}, "tokens_per_s": tps}

    recs = [t(0, "plan", 2, tps=100.0), t(0, "alt", 1, tps=120.0), t(0, "next_larger", 3),
            t(0, "next_larger", 5, budget="24GB"),
            t(1, "next_larger", 4, status="oom"), t(1, "next_larger", 6, status="skipped_time", budget="24GB")]
    kept = plan_report.supersede(recs)
    roles = {(r["budget"], r["role"], r["setup"]["micro_batch"]) for r in kept}
    # file 1's walk replaces file 0's at 12GB; a skipped trial replaces nothing (24GB keeps file 0's)
    assert ("12GB", "next_larger", 3) not in roles and ("12GB", "next_larger", 4) in roles
    assert ("24GB", "next_larger", 5) in roles
    # the plan was not re-run: it and its alternative (same file) stay
    assert ("12GB", "plan", 2) in roles and ("12GB", "alt", 1) in roles
    # a re-run plan drops the alternatives measured before it (another machine's tokens/s)
    kept = plan_report.supersede(recs + [t(1, "plan", 1, tps=90.0)])
    roles = {(r["budget"], r["role"], r["setup"]["micro_batch"]) for r in kept}
    assert ("12GB", "plan", 2) not in roles and ("12GB", "plan", 1) in roles and ("12GB", "alt", 1) not in roles


def test_midrun_design_fits_the_first_steps_and_not_the_last():
    steps = [w for n, a, b in train_run.MIDRUN_PHASES for w in [min(b, train_run.MAX_SEQ_LEN)] * n]
    lengths = [w for w in steps for _ in range(16)]
    d = train_run.midrun_design(lengths)
    assert d["fixed"]["safe_reserved_share_of_cap"] <= 1 - train_run.OOM_MARGIN
    assert d["fixed"]["long_over_cap"] >= train_run.OOM_MARGIN
    assert d["fallback_first_rung"]["reserved_share_of_cap"] <= 1 - train_run.OOM_MARGIN
    assert train_run.MIDRUN_SAVE_STEPS < d["predicted_oom_step"] <= train_run.MIDRUN_STEPS
    args = train_run.midrun_args(d, tiny=False)
    assert args[args.index("--gpu") + 1] == d["gpu"] and "--enforce-budget" in args and "sequential" in args


def _midrun_run(tmp_path, oom_step=13, resumed=10, second_first_log=11, error="CUDA out of memory. Tried to allocate"):
    steps = train_run.MIDRUN_STEPS
    out = tmp_path / "run"
    out.mkdir(parents=True)
    setup16 = {"micro_batch": 16, "grad_accum": 1, "grad_ckpt": False}
    setup8 = {"micro_batch": 8, "grad_accum": 2, "grad_ckpt": False}
    rep = {"status": "completed", "steps": steps, "max_steps": steps,
           "losses": [{"step": s, "loss": 5.0 - 0.01 * s} for s in range(1, steps + 1)],
           "fallbacks": [{"step": oom_step, "error": error, "resumed_from": f"/x/checkpoints/lora/checkpoint-{resumed}",
                          "setup_before": setup16, "setup_after": setup8}]}
    recs = [{"kind": "event", "message": "setup"}]
    for s in range(1, oom_step):
        recs += [{"kind": "step_end", "step": s}, {"kind": "log", "step": s, "loss": 5.0 - 0.01 * s,
                                                   "num_input_tokens_seen": 100 * s}]
    recs += [{"kind": "event", "message": "out of memory"}, {"kind": "event", "message": "setup"}]
    for s in range(resumed + 1, steps + 1):
        log_step = s - resumed - 1 + second_first_log
        recs += [{"kind": "step_end", "step": s}, {"kind": "log", "step": log_step, "loss": 5.0 - 0.01 * log_step,
                                                   "num_input_tokens_seen": 100 * log_step}]
    (out / "memory_timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (out / "run.log").write_text(f"out of memory at step {oom_step}: a -> b; resumed from /x/checkpoint-{resumed}\n"
                                 f"run completed: {steps} of {steps} steps in 1m, final loss 4.7\n")
    return out, rep


def test_midrun_checks_pass_a_resumed_run_and_catch_a_reset_or_an_early_oom(tmp_path):
    out, rep = _midrun_run(tmp_path / "good")
    checks = train_run.midrun_checks(out, rep, tiny=False, design=None)
    assert all(c["ok"] for c in checks), checks
    assert "redone steps [11, 12]" in checks[-2]["detail"]
    out, rep = _midrun_run(tmp_path / "reset", second_first_log=1)  # the resumed attempt logged from step 1
    assert not {c["check"]: c["ok"] for c in train_run.midrun_checks(out, rep, False, None)}[
        "loss curve continuous (no reset)"]
    out, rep = _midrun_run(tmp_path / "early", oom_step=3, resumed=0, second_first_log=1)  # before any checkpoint
    bad = {c["check"] for c in train_run.midrun_checks(out, rep, False, None) if not c["ok"]}
    assert {"OOM after the first checkpoint", "resumed from the last checkpoint before the OOM"} <= bad
    out, rep = _midrun_run(tmp_path / "injected", error="CUDA out of memory (injected: batch of 400 tokens)")
    assert not train_run.midrun_checks(out, rep, False, None)[1]["ok"]  # a GPU run's OOM must be real
    assert train_run.midrun_checks(out, rep, True, None)[1]["ok"]  # the --tiny run's is injected
