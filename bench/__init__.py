"""Benchmarks of memorymamba's ops, blocks and models against every baseline (see bench/harness.py).

Run `python -m bench --help`; results go to bench/results/<machine>.jsonl, tables come from
`python -m bench.report`, charts from `python -m bench.plot`.
"""
