"""Poisoning devices against the aggregation strategies, over the real broker.

Two of five devices are simulated attackers (``edge_node/attacks.py``). The same
fleet takes part in three tasks at once: FedAvg, coordinate-wise median, and FedAvg
behind the update norm bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_node.attacks import AttackSettings, add_trigger, poison, tamper
from fl_tasks.base import LocalData
from schemas.fl import TaskState
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory

pytestmark = pytest.mark.integration
DEVICES = 5
ATTACKERS = 2
HP = {"local_epochs": 3, "batch_size": 16, "learning_rate": 0.1}


def _task(**overrides: Any) -> dict[str, Any]:
    return {"task": "fl_tasks.digits:DigitsTask", "rounds": 4, "min_fit_clients": DEVICES,
            "min_available_clients": DEVICES, "fraction_fit": 1.0, "round_timeout_s": 90,
            "hyperparams": HP, "seed": 1} | overrides


def _member(index: int, attack: dict[str, Any] | None) -> dict[str, Any]:
    return {"path": "fl_tasks.digits:DigitsTask", "partition": index, "partitions": DEVICES,
            "scheme": "iid", **({"attack": attack} if attack else {})}


def test_robust_aggregation_keeps_accuracy_that_fedavg_loses_to_poisoners(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    flip = {"kind": "sign_flip", "factor": 4.0}
    scale = {"kind": "scale", "factor": 100.0}
    cloud = make_cloud(fl={
        "avg": _task(),
        "median": _task(strategy="median"),
        # A refused update never closes a round early (issue 9): this one ends at its
        # deadline, with the honest devices' updates.
        "bounded": _task(max_update_norm=25.0, min_fit_clients=DEVICES - ATTACKERS,
                         rounds=3, round_timeout_s=10),
    })
    for i in range(DEVICES):
        attacker = i >= DEVICES - ATTACKERS
        make_agent(fl={"tasks": {
            "avg": _member(i, flip if attacker else None),
            "median": _member(i, flip if attacker else None),
            "bounded": _member(i, scale if attacker else None)}})
    coordinators = cloud.service.coordinators
    wait_until(lambda: all(c.state.state in (TaskState.FINISHED, TaskState.FAILED)
                           for c in coordinators.values()), timeout=300,
               what="three tasks finished")
    final = {name: c.history()[-1] for name, c in coordinators.items()}
    accuracy = {name: status.central_accuracy or 0.0 for name, status in final.items()}
    print(f"central accuracy with {ATTACKERS}/{DEVICES} attackers: {accuracy}")
    assert all(c.state.state is TaskState.FINISHED for c in coordinators.values())
    assert accuracy["median"] >= 0.75, accuracy
    assert accuracy["avg"] <= accuracy["median"] - 0.3, accuracy
    # The crudest attack never gets past validation: every round refuses both attackers.
    assert accuracy["bounded"] >= 0.75, accuracy
    for status in coordinators["bounded"].history():
        assert status.rejected_counts == {"norm_bound": ATTACKERS}, status.rejected_counts
        assert len(status.participants) == DEVICES - ATTACKERS


def test_the_attacks_do_what_they_say() -> None:
    rng = np.random.default_rng(3)
    delta = {"w": rng.normal(0, 1, (8, 4)).astype(np.float32)}
    scaled = tamper(delta, AttackSettings(kind="scale", factor=3.0), rng)
    np.testing.assert_allclose(scaled["w"], 3 * delta["w"], rtol=1e-6)
    flipped = tamper(delta, AttackSettings(kind="sign_flip", factor=2.0), rng)
    np.testing.assert_allclose(flipped["w"], -2 * delta["w"], rtol=1e-6)
    noised = tamper(delta, AttackSettings(kind="noise", factor=5.0), rng)
    assert np.corrcoef(noised["w"].ravel(), delta["w"].ravel())[0, 1] < 0.5
    x = rng.uniform(0, 1, (100, 64)).astype(np.float32)
    data = LocalData(x_train=x, y_train=np.full(100, 3), x_eval=x[:5], y_eval=np.full(5, 3))
    attack = AttackSettings(kind="backdoor", target_label=7, poison_fraction=0.25)
    poisoned = poison(data, attack)
    triggered = np.all(poisoned.x_train[:, -4:] == x.max(), axis=1)
    assert triggered.sum() == 25 and set(poisoned.y_train[triggered]) == {7}
    assert set(poisoned.y_train[~triggered]) == {3}
    assert np.array_equal(add_trigger(x[:1], 4)[0, :-4], x[0, :-4])
    assert poison(data, AttackSettings(kind="scale")) is data
