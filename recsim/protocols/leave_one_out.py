"""The static leave-one-out protocol of RecBole and the generative-recommendation papers (SASRec, TIGER, ...).

Per user, in chronological order (ties in source order, as :class:`EncodedData` keeps them), with n
interactions at positions 0..n-1: the last item (n-1) is the test target, the second-to-last (n-2) the
validation target, and positions 1..n-3 are training targets (position 0 has no history). There is one
stage (index 0, "train", judged on split "test") and no time cut: this is the non-continual reference.
The test split "test" has a single group "all"; its validation split is "test_valid".

Users with fewer than 3 interactions are train-only: n = 2 gives the training target at position 1,
n = 1 nothing. Holding their only target out would leave no training signal, and RecBole drops such users
anyway (they do not occur after 5-core filtering). The history window (``stage.history_window``) defaults to
50, the length SASRec reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from recsim.protocols.base import EncodedData, EvalSplit, Protocol, StageData, resolve_users, sample_at

MASKED = "every user's test and validation target (last and second-to-last item)"


def build_leave_one_out(data: EncodedData, window: int, users: Sequence[int] | None = None) -> Protocol:
    users = resolve_users(data, users)
    test, valid, targets, sequences = [], [], {}, {}
    for u in users:
        seq = data.sequences[u]
        n = len(seq)
        sequences[u] = seq
        if n < 3:
            targets[u] = list(range(1, n))  # train-only (see the module docstring)
            continue
        targets[u] = list(range(1, n - 2))
        valid.append(sample_at(u, seq, n - 2, window))
        test.append(sample_at(u, seq, n - 1, window))
    # one stage: everything is new and cumulative at once (separate lists, so editing one spares the other)
    new_targets = {u: list(ps) for u, ps in targets.items()}
    stage = StageData(0, "train", sequences, new_targets, targets, {u: 0 for u in users}, list(users), [],
                      eval_split="test")
    splits = {"test": EvalSplit("test", {"all": test})}
    valid_splits = {"test": EvalSplit("test_valid", {"all": valid}, role="valid")}
    description = {
        "protocol": "leave_one_out",
        "groups": {"all": "every user with >= 3 interactions; target: their last item"},
        "validation": "second-to-last item of every user with >= 3 interactions",
        "short_users": "users with < 3 interactions are train-only",
        "masked_from_training": MASKED,
    }
    return Protocol(data, [stage], splits, window, description, valid_splits)
