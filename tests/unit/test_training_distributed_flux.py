"""The FLUX methods on 2 CPU processes (torchrun, DDP over gloo) against 1 process with the same global batch, as
``tests/unit/test_training_run.py`` checks the SDXL methods: DynaIP's adapter and fusion, MOSAIC's reference LoRA,
and AlignGen's LoRA, DEM and S*."""
from __future__ import annotations

import pytest
import torch
from fixtures.training import launch
from fixtures.training_aligngen import aligngen_config, aligngen_dataset
from fixtures.training_flux import dynaip_config, staged_dataset
from fixtures.training_mosaic import mosaic_config, mosaic_dataset


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # gloo's all-reduce sums in another order than one process's batch mean: float-level differences only (the
    # tolerances of the SDXL test); a different data stream or gradient moves elements by up to lr x steps
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert float(diffs.mean()) < 1e-6, float(diffs.mean())
    assert float(diffs.max()) < 1e-3, float(diffs.max())


@pytest.mark.parametrize("method", ["dynaip", "mosaic", "aligngen"])
def test_two_processes_match_one_process(method, tmp_path, msbench):
    if method == "dynaip":
        data = staged_dataset(tmp_path / "data" / "data", msbench)

        def config(out, batch):
            return dynaip_config(tmp_path, data, 4, train={"batch_size": batch, "output_dir": str(out),
                                                           "checkpoint_every": 4}, method={"stage1_steps": 2})
    elif method == "aligngen":
        data = aligngen_dataset(tmp_path / "data" / "data", msbench)

        def config(out, batch):
            return aligngen_config(tmp_path, data, 4, train={"batch_size": batch, "output_dir": str(out),
                                                             "checkpoint_every": 4})
    else:
        data = mosaic_dataset(tmp_path / "data" / "data", msbench)

        def config(out, batch):
            return mosaic_config(tmp_path, data, 4, train={"batch_size": batch, "output_dir": str(out),
                                                           "checkpoint_every": 4})
    one = launch(tmp_path / "one", config(tmp_path / "one" / "run", 4), 1)
    two = launch(tmp_path / "two", config(tmp_path / "two" / "run", 2), 2)
    same_weights(one, two)
