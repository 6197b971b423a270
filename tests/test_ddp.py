"""Lightning's DDP with 2 CPU processes (gloo): identical ranks, equal to one process.

The in-process fit runs in a fresh process (``tests/ddp_fit.py``); the command-line test uses
``trainer=ddp``, Lightning's subprocess launcher.
"""

import json

import torch

from tests.conftest import run_cli


def fit(folder, devices, batch_size):
    folder.mkdir()
    result = run_cli("tests.ddp_fit", str(folder), str(devices), str(batch_size),
                     cwd=folder, fresh=True)  # Lightning's launcher re-runs the command
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_ranks_hold_identical_weights_equal_to_one_process_with_twice_the_batch(tmp_path):
    fit(tmp_path / "ddp", devices=2, batch_size=128)
    fit(tmp_path / "single", devices=1, batch_size=256)

    ranks = [torch.load(tmp_path / "ddp" / f"actnorm-{r}.pt") for r in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    final = [torch.load(tmp_path / "ddp" / f"final-{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "single" / "final-0.pt")
    for key in single:
        assert torch.equal(final[0][key], final[1][key]), key
        # Rank r's batch is half of the single run's batch: the same gradient up to rounding.
        torch.testing.assert_close(final[0][key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    # ActNorm was initialised from both ranks' halves, i.e. from the single run's full batch.
    single_actnorm = torch.load(tmp_path / "single" / "actnorm-0.pt")
    for key in single_actnorm:
        torch.testing.assert_close(ranks[0][key], single_actnorm[key], rtol=1e-4, atol=1e-5)


def test_ddp_command_line_writes_one_run_folder_from_rank_zero(tmp_path):
    result = run_cli("flows.train", "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.max_steps=10", "data.num_train=4096",
                     "data.num_val=512", "data.num_test=1000", "data.batch_size=128",
                     "callbacks.plots.grid_points=20", "callbacks.plots.num_samples=100",
                     "name=ddp", "trainer.enable_progress_bar=false", fresh=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs").rglob("results.json"))
    assert [r.parent.name for r in runs] == ["ddp"]  # no folder from the second process
    assert (result.stdout + result.stderr).count("results: {") == 1  # rank 0 alone writes
    results = json.loads(runs[0].read_text())
    assert results["num_test"] == 1000  # every test point exactly once over both ranks
    assert results["train_steps"] == 10
    assert (runs[0].parent / "plots" / "final" / "density.png").is_file()
