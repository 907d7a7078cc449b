"""recsim: a harness for LLM recommenders whose users' preferences evolve over time."""

__version__ = "0.1.0"
