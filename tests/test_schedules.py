"""The warmup-then-cosine learning-rate schedule against its formula."""

import math

import pytest
import torch
from hydra.utils import instantiate

from flows.lit.schedules import (
    NO_RUN_LENGTH,
    ScheduleError,
    build_schedule,
    cosine,
    warmup_cosine,
)
from tests.test_configs import EXPERIMENTS, build_from, compose_train


def rates(scheduler, optimizer, steps):
    """The learning rate used at each of ``steps`` training steps."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def config_schedule(cfg, optimizer):
    """The config's schedule over its ``trainer.max_steps``, as the trainer builds it."""
    return build_schedule(instantiate(cfg.scheduler), optimizer, cfg.trainer.max_steps)


def test_cosine_to_zero():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-3)
    used = rates(cosine(optimizer, total_steps=8), optimizer, 9)
    expected = [2e-3 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(9)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert used[8] == pytest.approx(0.0, abs=1e-15)


def test_schedule_gets_the_run_length_only_if_it_takes_one():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    constant = instantiate(compose_train("scheduler=constant").scheduler)
    assert rates(build_schedule(constant, optimizer, math.inf), optimizer, 3) == [1e-3] * 3
    for scheduler in ("cosine", "warmup_cosine"):
        factory = instantiate(compose_train(f"scheduler={scheduler}").scheduler)
        with pytest.raises(ScheduleError, match="no step or epoch limit") as refused:
            build_schedule(factory, optimizer, math.inf)
        assert str(refused.value) == NO_RUN_LENGTH


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-3)
    used = rates(warmup_cosine(optimizer, warmup_steps=4, total_steps=12), optimizer, 13)
    expected = [2e-3 * (t + 1) / 4 for t in range(4)]
    expected += [2e-3 * (1 + math.cos(math.pi * (t - 4) / 8)) / 2 for t in range(4, 13)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert used[3] == used[4] == pytest.approx(2e-3) and used[12] == pytest.approx(0.0)


def test_resumed_schedule_continues():
    """A scheduler rebuilt from the config and loaded from a state dict mid-warmup gives the
    same rates as one that never stopped (as a resumed run rebuilds it)."""
    def fresh():
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
        return optimizer, warmup_cosine(optimizer, warmup_steps=5, total_steps=20)

    optimizer, scheduler = fresh()
    straight = rates(scheduler, optimizer, 20)
    optimizer, scheduler = fresh()
    first = rates(scheduler, optimizer, 3)
    state = (optimizer.state_dict(), scheduler.state_dict())
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    assert first + rates(scheduler, optimizer, 17) == pytest.approx(straight, rel=1e-12)


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (10, 10), (20, 10)])
def test_bad_warmup_is_refused(warmup, total):
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ScheduleError, match="need 1 <= warmup_steps < total_steps.*max_steps"):
        warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total)


def test_config_warms_up_over_the_run():
    cfg = compose_train("scheduler=warmup_cosine", "trainer.max_steps=3000")
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    base = optimizer.param_groups[0]["lr"]
    used = rates(config_schedule(cfg, optimizer), optimizer, 3001)
    assert used[0] == pytest.approx(base / 1000) and used[999] == pytest.approx(base)
    assert used[3000] == pytest.approx(0.0, abs=1e-12)


WARMED_UP = [e for e in EXPERIMENTS
             if "warmup_cosine" in compose_train(f"experiment={e}").scheduler._target_]


def test_the_paper_image_experiments_warm_up():
    assert {"glow_mnist", "glow_cifar10", "iresnet_mnist", "iresnet_cifar10"} <= set(WARMED_UP)


@pytest.mark.parametrize("experiment", WARMED_UP)
@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_paper_experiment_runs_without_its_warmup(experiment, scheduler):
    """A paper experiment sets its papers' warmup length; choosing a schedule without a
    warmup drops it (the rate starts at the base) instead of failing on an unknown argument."""
    cfg = compose_train(f"experiment={experiment}", f"scheduler={scheduler}")
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    base = optimizer.param_groups[0]["lr"]
    used = rates(config_schedule(cfg, optimizer), optimizer, 2)
    assert used[0] == pytest.approx(base)


@pytest.mark.parametrize("override", ["warmup_steps=30", "scheduler.warmup_steps=30"])
def test_paper_experiment_warmup_shortened(override):
    """``iresnet_mnist`` warms up over 430 steps; either override makes it 30: the rate
    climbs to the base rate at 0-based step 29, holds it at 30 (the cosine's start) and
    decays from 31."""
    cfg = compose_train("experiment=iresnet_mnist", "trainer.max_steps=60", override)
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    base = optimizer.param_groups[0]["lr"]
    used = rates(config_schedule(cfg, optimizer), optimizer, 32)
    assert used[0] == pytest.approx(base / 30) and used[28] == pytest.approx(base * 29 / 30)
    assert used[29] == used[30] == pytest.approx(base)
    assert used[31] == pytest.approx(base * (1 + math.cos(math.pi / 30)) / 2)


def test_paper_experiment_keeps_its_warmup():
    """Without an override glow_mnist's schedule starts at 1/8600 of the rate (its 8,600-step
    warmup) and reaches the full rate at step 8,599."""
    cfg = compose_train("experiment=glow_mnist")
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    base = optimizer.param_groups[0]["lr"]
    used = rates(config_schedule(cfg, optimizer), optimizer, 8600)
    assert used[0] == pytest.approx(base / 8600) and used[8599] == pytest.approx(base)
    assert used[8598] == pytest.approx(base * 8599 / 8600)


def test_resume_refuses_another_warmup(tmp_path):
    """The warmup length reaches the schedule through ``${warmup_steps}``; a resume that
    changes it is refused like any other change to the schedule."""
    from flows.cli import RunFolderError, check_resume_settings

    saved = compose_train("experiment=iresnet_mnist")
    with pytest.raises(RunFolderError, match=r"changes warmup_steps \(430 -> 30\)"):
        check_resume_settings(saved, compose_train("experiment=iresnet_mnist", "warmup_steps=30"),
                              tmp_path / ".hydra" / "config.yaml")
    check_resume_settings(saved, compose_train("experiment=iresnet_mnist"),
                          tmp_path / ".hydra" / "config.yaml")


@pytest.mark.parametrize(("limits", "steps"), [
    (["trainer.max_steps=-1", "trainer.max_epochs=2"], 16),  # 2 epochs of 2048 // 256
    (["trainer.max_steps=3000", "trainer.max_epochs=1"], 8),  # the epoch ends the run first
    (["trainer.max_steps=5", "trainer.max_epochs=1"], 5),  # the steps end it first
])
def test_schedule_decays_over_the_steps_the_run_takes(tmp_path, limits, steps):
    """The cosine's length is the number of steps the run takes, whichever limit ends it, so
    the rate has decayed to 0 when it ends."""
    datamodule, module, trainer = build_from(
        tmp_path, *limits, "data.num_train=2048", "data.num_val=256", "data.num_test=256",
        "data.batch_size=256", "callbacks=none", "logger=csv", "test=false",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == steps
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_a_length_the_config_sets_is_kept():
    """``+scheduler.total_steps=100`` (or ``OneCycleLR``'s own) is not replaced by the run's."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    factory = instantiate(compose_train("scheduler=cosine", "+scheduler.total_steps=100")
                          .scheduler)
    assert build_schedule(factory, optimizer, 6000).T_max == 100


@pytest.mark.parametrize(("scheduler", "legacy"), [
    ("cosine", {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "T_max": "${trainer.max_steps}"}),
    ("warmup_cosine", {"_target_": "flows.lit.schedules.warmup_cosine",
                       "warmup_steps": "${warmup_steps}", "total_steps": "${trainer.max_steps}"}),
])
def test_a_run_saved_with_the_older_schedule_configs_resumes(tmp_path, scheduler, legacy):
    """Runs saved before the schedules took their length from the trainer passed it as
    ``trainer.max_steps``: the same schedule, so their resume is not refused; another length
    written there still is."""
    from omegaconf import OmegaConf

    from flows.cli import RunFolderError, check_resume_settings

    saved = compose_train(f"scheduler={scheduler}")
    saved.scheduler = OmegaConf.create({**legacy, "_partial_": True})
    source = tmp_path / ".hydra" / "config.yaml"
    check_resume_settings(saved, compose_train(f"scheduler={scheduler}"), source)
    length = "T_max" if scheduler == "cosine" else "total_steps"
    saved.scheduler[length] = 500
    with pytest.raises(RunFolderError, match=f"scheduler.{length}"):
        check_resume_settings(saved, compose_train(f"scheduler={scheduler}"), source)


def test_a_run_saved_before_a_model_setting_existed_resumes(tmp_path):
    """An i-ResNet run saved before ``model.training_svd`` and ``model.power_iteration_tol``
    existed resumes with today's config, where they are at their defaults (it was refused:
    ``model.training_svd (None -> False)``); setting one of them is still a change, and so is
    a setting whose default is not the old behaviour (``series_gradient``: "neumann" replaced
    backpropagating through every term)."""
    from omegaconf import open_dict

    from flows.cli import RunFolderError, check_resume_settings

    saved = compose_train("model=iresnet")
    with open_dict(saved):
        del saved.model["training_svd"], saved.model["power_iteration_tol"]
    source = tmp_path / ".hydra" / "config.yaml"
    check_resume_settings(saved, compose_train("model=iresnet"), source)
    with pytest.raises(RunFolderError, match=r"model.training_svd \(None -> True\)"):
        check_resume_settings(saved, compose_train("model=iresnet", "model.training_svd=true"),
                              source)
    with open_dict(saved):
        del saved.model["series_gradient"]
    with pytest.raises(RunFolderError, match=r"model.series_gradient \(None -> neumann\)"):
        check_resume_settings(saved, compose_train("model=iresnet"), source)
