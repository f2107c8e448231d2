"""GPU proof of `vramfit plan` under enforced memory budgets (issue 4): run.py measures, report.py tabulates."""
