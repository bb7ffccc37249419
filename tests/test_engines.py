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
        (probdyn.Ensemble, "num_member", "num_members"),
        (probdyn.SMC, "num_particle", "num_particles"),
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
        (lambda: probdyn.Ensemble(num_members=0), "num_members"),
        (lambda: probdyn.Ensemble(optimizer="lbfgs"), "optimizer"),
        (lambda: probdyn.Ensemble(init_scale=-0.1), "init_scale"),
        (lambda: probdyn.Ensemble(anchored="yes"), "anchored"),
        (lambda: probdyn.Ensemble(learning_rate=0.0), "learning_rate"),
        (lambda: probdyn.SMC(num_particles=0), "num_particles"),
        (lambda: probdyn.SMC(kernel="nuts"), "kernel"),
        (lambda: probdyn.SMC(target_ess=1.0), "target_ess"),
        (lambda: probdyn.SMC(temperatures="linear"), "temperatures"),
        (lambda: probdyn.SMC(temperatures=[0.5, 0.2, 1.0]), "increase strictly"),
        (lambda: probdyn.SMC(temperatures=[0.5, 0.9]), "end at 1.0"),
        (lambda: probdyn.SMC(temperatures=[0.0, 1.0]), "start"),
        (lambda: probdyn.SMC(temperatures=3), "sequence"),
        (lambda: probdyn.SMC(stream="online"), "stream"),
        (lambda: probdyn.SMC(jitter=0.0), "jitter"),
        (lambda: probdyn.SMC(stream="minibatch"), "batch_size"),
        (lambda: probdyn.SMC(batch_size=0, stream="minibatch"), "batch_size"),
    ],
)
def test_bad_values_name_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_smc_temperature_sequence_is_stored_as_a_tuple() -> None:
    # A list would make the frozen config unhashable and print differently.
    cfg = probdyn.SMC(temperatures=[0.1, 0.5, 1.0])
    assert cfg.temperatures == (0.1, 0.5, 1.0)
    assert hash(cfg) == hash(probdyn.SMC(temperatures=(0.1, 0.5, 1.0)))
    assert probdyn.SMC().temperatures == "adaptive"
