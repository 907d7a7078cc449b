"""Privacy audits of trained recommenders: `python -m recsim.audit mia run_dir=…` (recsim/audit/__main__.py).

Membership inference (arXiv 2511.14763, "Membership Inference Attack against LLM-based Recommendation Systems:
A New Distillation-based Paradigm"): a run made with `stage.holdout_users` > 0 holds out users that no model
trains on (non-members); the users a method trained on are members. Per stage: which samples stand for each
(membership), per-sample features of the target (features), a reference model distilled from the target in two
phases (reference), a shadow-model baseline (shadow), the attacks (attacks), AUC and TPR at 1% FPR with
bootstrap intervals (metrics); mia runs them in that order.
"""
