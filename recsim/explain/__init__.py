"""Explanations of recommendations: the teacher LLM's (recsim.explain.teacher) and what they are scored with."""
