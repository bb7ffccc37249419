"""Engine configs: frozen, printable, validated at the boundary."""

from __future__ import annotations

import dataclasses

import pytest

import probdyn


def test_configs_are_frozen_printable_and_comparable() -> None:
    cfg = probdyn.NUTS(num_warmup=10, num_samples=20)
    assert cfg == probdyn.NUTS(num_warmup=10, num_samples=20)
    assert "num_warmup=10" in repr(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_warmup = 5  # type: ignore[misc]
    assert cfg.to_dict()["engine"] == "NUTS"


@pytest.mark.parametrize(
    "engine, bad, suggestion",
    [
        (probdyn.NUTS, "num_warmpu", "num_warmup"),
        (probdyn.HMC, "stepsize", "step_size"),
        (probdyn.VI, "num_step", "num_steps"),
    ],
)
def test_unknown_option_suggests_the_right_name(engine, bad: str, suggestion: str) -> None:
    with pytest.raises(TypeError, match=f"unknown option '{bad}'.*Did you mean '{suggestion}'"):
        engine(**{bad: 10})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: probdyn.NUTS(num_samples=0), "num_samples"),
        (lambda: probdyn.NUTS(num_chains=1.5), "num_chains"),
        (lambda: probdyn.NUTS(target_accept=1.2), "target_accept"),
        (lambda: probdyn.NUTS(chain_method="threads"), "chain_method"),
        (lambda: probdyn.NUTS(init="zeros"), "init"),
        (lambda: probdyn.HMC(step_size=-1.0), "step_size"),
        (lambda: probdyn.VI(guide="delta"), "guide"),
        (lambda: probdyn.VI(learning_rate=0), "learning_rate"),
        (lambda: probdyn.VI(final_learning_rate_fraction=2.0), "final_learning_rate_fraction"),
    ],
)
def test_bad_values_name_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
