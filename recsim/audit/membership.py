"""Who is a member of the model after stage i, which samples stand for them, and what the attacker knows.

    members of stage i      users whose samples the method trained on at stages 0..i
    member samples          exactly those training samples: `method.training_samples(stage_j)` for j <= i with the
                            run's seeded `trainer.max_train_samples` cap, as recsim.runner.fit_stage drew them
                            (checked against each stage's efficiency.json `train_samples`); duplicates dropped
    non-members             the held-out users (`stage.holdout_users`, protocol.json): never trained on
    non-member samples      the same kind of samples for them: the protocol rebuilt without held-out users (the same
                            prepare_protocol path, `stage.holdout_users=0`), `method.training_samples(stage_j)` on it
                            for j <= i, the held-out users' samples kept; nothing is capped (the cap chose among
                            members). The rebuilt stages restricted to the members must equal the run's: checked.

Choices:
- What the method trains on, not the protocol's plain targets: EvoRec's Forget edits the histories it trains on,
  finetune sees stage 0 and then the windows, base only stage 0. Asking the method on the protocol without
  held-out users gives a non-member the samples it would have had as a member (EvoRec's filter then sees every
  user, as it would have). Extra fits inside a method's `before_update` (LSAT's long-term adapter, InfLoRA's
  inputs) are not replayed: they only ever see members' data, so no non-member is mislabelled by that.
- A method's `training_samples` is asked with the stage-i method (its state does not enter the data choice of
  any recsim method); what it reports (EvoRec's forgotten items) is restored after.
- Pools (`audit.max_samples_per_class`, `audit.balance`): each class's samples are cut to at most that many,
  uniform without replacement; with balance, both to the smaller class's count. Then the attacker's knowledge is
  drawn by user, so no user has samples on both sides: `audit.known_member_share` of the member users (at least
  one) and as many non-member users (or `audit.known_nonmember_share` of them); every other user is evaluated.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from recsim.protocols.base import Sample, StageData


class MembershipError(ValueError):
    """The run cannot be audited as asked (no held-out users, too few of them to know some and evaluate others)."""


@dataclass
class AuditSet:
    samples: list[Sample]
    label: np.ndarray  # [n] 1 = member
    known: np.ndarray  # [n] bool: the attacker's training rows
    counts: dict  # pool and split sizes, for the record

    @property
    def users(self) -> np.ndarray:
        return np.array([s.user for s in self.samples])


def held_out_users(protocol) -> list[int]:
    """The run's non-members, from the protocol's record of them."""
    record = protocol.description.get("holdout")
    if not record or not record.get("user_indices"):
        raise MembershipError("the run holds out no users: rerun it with stage.holdout_users=<share> (e.g. 0.2)")
    return list(record["user_indices"])


@contextmanager
def asked_on(method, protocol):
    """The method answering `training_samples` for `protocol`, its protocol and report restored after."""
    before, report = method.protocol, dict(method.report)
    method.protocol = protocol
    try:
        yield method
    finally:
        method.protocol, method.report = before, report


def trained_samples(cfg, method, stage: StageData, rec) -> list[Sample]:
    """The samples stage `stage`'s fit trained on: the method's choice, then the runner's seeded cap."""
    from recsim.runner import training_subsample

    return training_subsample(cfg, stage.index, method.training_samples(stage, rec) or [])


def member_samples(cfg, loaded, upto: int, stage_dirs: dict[int, Path]) -> tuple[list[Sample], dict[int, int]]:
    """Every sample trained on at stages 0..upto (deduplicated, in stage order) and the count per stage."""
    out, counts = {}, {}
    with asked_on(loaded.method, loaded.protocol) as method:
        for stage in loaded.protocol.stages[: upto + 1]:
            samples = trained_samples(cfg, method, stage, loaded.rec)
            counts[stage.index] = len(samples)
            recorded = stage_dirs.get(stage.index, Path()) / "efficiency.json"
            if recorded.is_file():
                expected = json.loads(recorded.read_text()).get("train_samples")
                if expected is not None and expected != len(samples):
                    raise RuntimeError(f"stage {stage.index}: {len(samples)} training samples replayed, the run "
                                       f"trained on {expected} ({recorded}): the method's data choice changed since")
            out.update(dict.fromkeys(samples))
    return list(out), counts


def _restricted(stage: StageData, users: set[int]) -> dict:
    """What a stage holds of `users`, in comparable form."""
    keep = lambda d: {u: v for u, v in d.items() if u in users}
    return {"sequences": {u: tuple(v.tolist()) for u, v in keep(stage.sequences).items()},
            "new_targets": keep(stage.new_targets), "cumulative_targets": keep(stage.cumulative_targets),
            "boundary": keep(stage.boundary), "active_users": [u for u in stage.active_users if u in users],
            "inactive_users": [u for u in stage.inactive_users if u in users]}


def without_holdout(cfg):
    """The protocol the run's config builds with nobody held out (the same prepare_protocol path)."""
    from recsim.protocols.prepare import prepare_protocol

    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.stage.holdout_users = 0
    return prepare_protocol(plain).protocol


def nonmember_samples(cfg, loaded, upto: int, held: list[int]) -> list[Sample]:
    """The held-out users' samples of stages 0..upto as the method would have trained on them (module doc)."""
    plain = without_holdout(cfg)
    held_set = set(held)
    out = {}
    with asked_on(loaded.method, plain) as method:
        for mine, theirs in zip(loaded.protocol.stages[: upto + 1], plain.stages[: upto + 1]):
            members = set(mine.sequences)
            if members & held_set:
                raise RuntimeError(f"stage {mine.index}: held-out users {sorted(members & held_set)[:5]} are in "
                                   "the run's training stage")
            if _restricted(theirs, members) != _restricted(mine, members):
                raise RuntimeError(f"stage {mine.index}: the protocol rebuilt with stage.holdout_users=0 gives the "
                                   "members other data than the run's protocol; the non-members' samples would not "
                                   "be the same kind")
            samples = method.training_samples(theirs, loaded.rec) or []
            out.update(dict.fromkeys(s for s in samples if s.user in held_set))
    return list(out)


def _count(share: float | None, users: int, default: int) -> int:
    return default if share is None else max(1, math.floor(share * users + 0.5))


def audit_set(members: list[Sample], nonmembers: list[Sample], settings, seed: int) -> AuditSet:
    """The capped, balanced pools and the attacker's known users (module doc)."""
    rng = np.random.default_rng(seed)
    if not members or not nonmembers:
        raise MembershipError(f"{len(members)} member and {len(nonmembers)} non-member samples: an audit needs both "
                              "(a stage without training has no members; held-out users without samples none)")
    cap = settings.max_samples_per_class
    n_each = [len(members), len(nonmembers)]
    if settings.balance:
        n_each = [min(n_each)] * 2
    if cap is not None:
        n_each = [min(n, int(cap)) for n in n_each]
    pools = [[pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
             for pool, n in zip((members, nonmembers), n_each)]
    users = [sorted({s.user for s in pool}) for pool in pools]
    known_m = _count(settings.known_member_share, len(users[0]), 1)
    known_n = _count(settings.known_nonmember_share, len(users[1]), known_m)
    for name, option, known, total in (("member", "audit.known_member_share", known_m, len(users[0])),
                                       ("non-member", "audit.known_nonmember_share", known_n, len(users[1]))):
        if known >= total:
            raise MembershipError(f"{known} of {total} {name} users would be known to the attacker, leaving none to "
                                  f"evaluate: lower {option} (or audit.known_member_share), raise "
                                  "audit.max_samples_per_class, or hold out more users (stage.holdout_users)")
    known_users = set(rng.choice(users[0], known_m, replace=False).tolist()) | \
        set(rng.choice(users[1], known_n, replace=False).tolist())
    samples = pools[0] + pools[1]
    label = np.array([1] * len(pools[0]) + [0] * len(pools[1]))
    known = np.array([s.user in known_users for s in samples])
    counts = {"member_samples_pool": len(members), "nonmember_samples_pool": len(nonmembers),
              "member_users": len(users[0]), "nonmember_users": len(users[1]),
              "known_member_users": known_m, "known_nonmember_users": known_n,
              "known_member_samples": int((known & (label == 1)).sum()),
              "known_nonmember_samples": int((known & (label == 0)).sum()),
              "n_members": int((~known & (label == 1)).sum()), "n_nonmembers": int((~known & (label == 0)).sum())}
    return AuditSet(samples, label, known, counts)
