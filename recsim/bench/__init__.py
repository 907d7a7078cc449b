"""`python -m recsim.bench <what> [overrides]`: speed and memory of recsim's own code paths.

One module per benchmark (`train`, `score`, `fullrank`), each a `run(cfg, bench) -> dict` of figures;
`settings` composes the run config and checks the `bench.*` keys, `flops` holds the FLOP model of a
training step, `report` prints the table and writes the JSON file. The overrides compose exactly the
config `python -m recsim.run` would see, so a benchmark times what a run with those settings runs.
"""
