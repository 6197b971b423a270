"""Every model x data config composes, instantiates and computes a finite log-density."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import open_dict

from flows.lit.schedules import build_schedule

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# glow's vector entry only exists to fail with a clear message
# glow's vector config and nice's image config only stop with a message (test_train_images)
VECTOR_MODELS = sorted(p.stem for p in (CONF / "arch" / "vector").glob("*.yaml")
                       if p.stem != "glow")
IMAGE_MODELS = sorted(p.stem for p in (CONF / "arch" / "image").glob("*.yaml")
                      if p.stem != "nice")
IMAGE_DATA = ["digits", "mnist", "fashion_mnist", "cifar10"]
TOY_DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml")
                  if p.stem not in ["file", *IMAGE_DATA])
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def small_data(cfg):
    with open_dict(cfg):
        cfg.data.num_train, cfg.data.num_val, cfg.data.num_test = 256, 64, 64
        cfg.data.batch_size = min(cfg.data.batch_size, 256)  # one full batch to train on
    return cfg


def build_from(output_dir, *overrides: str):
    """``flows.train.build`` of the composed config, as the command's task function gets it
    (Hydra's runtime set, its own node removed)."""
    from flows.train import build

    cfg = compose_train(*overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return build(cfg)


def test_all_groups_have_options():
    assert {"realnvp", "iresnet", "glow", "nice"} == set(MODELS)
    assert set(VECTOR_MODELS) == {"realnvp", "nice", "iresnet"}
    assert set(IMAGE_MODELS) == {"realnvp", "glow", "iresnet"}
    assert set(TOY_DATA) == {"moons", "8gaussians", "checkerboard", "2spirals", "rings",
                             "pinwheel", "circles", "swissroll"}


@pytest.mark.parametrize("model", VECTOR_MODELS)
@pytest.mark.parametrize("data", TOY_DATA)
def test_model_data_pair_instantiates(model, data):
    cfg = small_data(compose_train(f"model={model}", f"data={data}"))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    flow = instantiate(cfg.model).eval()
    x = datamodule.splits["train"][:32]
    assert x.shape == (32, 2)
    with torch.no_grad():
        log_prob = flow.log_prob(x)
        samples = flow.sample(8)
    assert log_prob.shape == (32,) and torch.isfinite(log_prob).all()
    assert samples.shape == (8, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("data", IMAGE_DATA)
def test_image_model_data_pair_builds_for_the_data_shape(model, data):
    cfg = compose_train(f"model={model}", f"data={data}")
    assert cfg.space.kind == "image"
    flow = instantiate(cfg.model).eval()
    assert flow.event_shape == tuple(cfg.data.shape)
    x = torch.rand(2, *cfg.data.shape)
    with torch.no_grad():
        log_prob = flow.log_prob(x)
    assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()


def test_digits_data_config_loads_offline():
    datamodule = instantiate(compose_train("data=digits").data)
    datamodule.setup()
    assert datamodule.splits["val"].shape == (150, 1, 8, 8)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_instantiate(experiment):
    cfg = compose_train(f"experiment={experiment}")
    if cfg.space.kind == "image":  # the papers' 512-channel nets take a minute to build on CPU
        cfg.model.hidden_channels = 8
    flow = instantiate(cfg.model)
    assert sum(p.numel() for p in flow.parameters()) > 0
    # the schedule builds for the experiment's own run length (warmup_cosine refuses a warmup
    # as long as the run) and starts at a positive rate no higher than the configured one
    optimizer = instantiate(cfg.optim)(flow.parameters())
    build_schedule(instantiate(cfg.scheduler), optimizer, cfg.trainer.max_steps)
    assert 0 < optimizer.param_groups[0]["lr"] <= cfg.optim.lr


def test_trainer_callbacks_loggers_instantiate(tmp_path):
    cfg = compose_train()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)  # set by @hydra.main in a real run
    HydraConfig.instance().set_config(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == cfg.trainer.max_steps
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    assert build_schedule(instantiate(cfg.scheduler), optimizer, trainer.max_steps)


def test_threads_sets_torchs_intra_op_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        build_from(tmp_path, "threads=1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    build_from(tmp_path, "threads=null")  # torch's default stays
    assert torch.get_num_threads() == before


def test_a_callback_or_logger_set_to_null_is_left_out(tmp_path):
    _, _, trainer = build_from(tmp_path, "callbacks.diagnostics=null", "logger.tensorboard=null")
    kinds = {type(c).__name__ for c in trainer.callbacks}
    assert "FlowDiagnostics" not in kinds and {"ToyPlots", "LastCheckpoint"} <= kinds
    assert [type(logger).__name__ for logger in trainer.loggers] == ["CSVLogger"]


@pytest.mark.parametrize("override", ["model=nosuchmodel", "data=nosuchdata"])
def test_unknown_option_lists_the_valid_ones(override):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(override)
    message = str(info.value)
    assert "Available options" in message
    assert ("realnvp" in message) if override.startswith("model") else ("moons" in message)


def test_commands_run_in_full_float32_unless_tf32_is_asked(tmp_path):
    """torch lets cuDNN convolutions use TF32 by default; flows' commands turn it off (an
    i-ResNet's fixed-point inverse needs full float32) unless ``tf32=true``."""
    from flows.runs import use_tf32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True, False):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
            build_from(tmp_path, "data=moons", "data.num_train=256", "data.num_val=64",
                       "data.num_test=64", "data.batch_size=256", f"tf32={tf32}")
            assert torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
        with pytest.raises(ValueError, match="tf32=1: use tf32=true or tf32=false"):
            use_tf32(1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    for name in ("evaluate", "sample"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            assert compose(name, overrides=["ckpt=x"]).tf32 is False


@pytest.mark.parametrize(("overrides", "warned"), [
    (["model=nice", "model.log_scale_clamp=1"], True),
    (["model=nice", "+model.log_scale_clamp=1"], True),
    (["model=realnvp", "model.coupling=additive", "model.log_scale_clamp=3"], True),
    (["model=nice"], False),
    (["model=realnvp", "model.log_scale_clamp=3"], False),
])
def test_a_setting_the_model_ignores_is_named(overrides, warned):
    """``model.log_scale_clamp`` given with additive couplings (no log-scales) is named; not
    a ``~`` deletion, not the config's own value, not an affine model's."""
    from flows.cli import ignored_overrides

    cfg = compose_train(*[o for o in overrides if not o.startswith("+")])
    expected = ["model.log_scale_clamp has no effect here: additive couplings"] if warned else []
    assert [m[:60] for m in ignored_overrides(cfg, overrides)] == [e[:60] for e in expected]
    assert ignored_overrides(cfg, [*overrides[:1], "~model.log_scale_clamp"]) == []
