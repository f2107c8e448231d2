"""GPU measurement harness: real peak memory of fine-tuning steps, one fresh process per case.

    python -m benchmarks.accuracy.harness --grid issue2 --out benchmarks/results/<gpu>-<date>-issue2.jsonl

`cases.py` says what a case is, `grids.py` holds the named grids, `train_case.py` and
`context_case.py` run one case inside the child process, `probe.py` reads memory (torch, NVML),
`harness.py` forks one child per case and writes one JSON line per case.
"""
