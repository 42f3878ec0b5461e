"""`model.device` (auto, cpu, cuda, cuda:N): honoured by every training command, and a device
this machine lacks (CUDA on a CPU-only torch) or a malformed value is a one-line error naming
the key before anything loads, not an error from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from test_cli_errors import run_cli
from test_resume_errors import checkpointed_run  # noqa: F401  (a fixture)

from prefalign.cli import main
from prefalign.config import ConfigError, load_config
from prefalign.training.loop import Trainer, TrainerConfig
from prefalign.training.preference import PreferenceConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# The config commands that load a model by `model.device`.
MODEL_COMMANDS = [("train",), ("sft",), ("rm", "train"), ("arm", "train"), ("rest",)]


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", "cuda:-1"])
def test_a_malformed_device_is_refused_at_load_naming_the_key(capsys, command, value):
    line = run_cli(capsys, *command, f"model.device={value}")
    assert f"config key 'model.device': got '{value}', allowed: 'auto', 'cpu', 'cuda'" in line


@no_cuda
@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_refused_before_anything_loads(
    tmp_path, capsys, command, value
):
    out_dir = tmp_path / "run"
    key = "out_dir" if command == ("rest",) else "trainer.out_dir"
    line = run_cli(
        capsys,
        *command,
        f"model.device={value}",
        "model.name_or_path=./no-such-model",  # never reached: the device is checked first
        *(
            ("grow.prompts=./no-such.jsonl", "reward.task=toy:sentiment")
            if command == ("rest",)
            else ("data.path=./no-such.jsonl",)
        ),
        f"{key}={out_dir}",
    )
    assert f"config key 'model.device': '{value}' asked for, but " in line
    assert "use auto or cpu" in line
    assert not out_dir.exists()


@no_cuda
def test_check_device_says_why_cuda_is_missing():
    from prefalign.modeling import check_device

    with pytest.raises(ConfigError, match=r"built without CUDA|finds no CUDA device"):
        check_device("cuda:0")
    assert check_device("cpu") == "cpu" and check_device("auto") == "auto"


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_the_trainer_trains_on_the_device_asked_for(tmp_path, device):
    config = TrainerConfig(out_dir=str(tmp_path), progress=False)
    trainer = Trainer(torch.nn.Linear(4, 4), config, lengths=[1] * 8, device=device)
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert trainer.accelerator.device.type == expected
    assert next(trainer.unwrapped.parameters()).device.type == expected


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_train_with_model_device_runs_there(
    checkpointed_run,  # noqa: F811  (the imported fixture)
    tmp_path,
    capsys,
    device,
):
    argv, out_dir = checkpointed_run
    argv = [a.replace(str(out_dir), str(tmp_path / "run")) for a in argv]
    assert main([*argv, f"model.device={device}", "trainer.max_steps=1"]) == 0
    assert (tmp_path / "run" / "final").is_dir()


def test_the_device_key_round_trips_through_a_config():
    config = load_config(PreferenceConfig, None, ["model.device=cuda:3"])  # a form, not a check
    assert config.model.device == "cuda:3"
