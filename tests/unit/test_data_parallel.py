"""Two ranks on the CPU (gloo), as Ray Train's workers run them: DistributedDataParallel keeps the
ranks identical, every collective runs on the training device, and a non-finite loss on one rank
stops both before any optimizer step."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import TINY, deep_merge

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, nan_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from unite_core.config import config_from_dict
        from unite_core.data import load_image_data
        from unite_core.train import Trainer, TrainingError

        cfg = config_from_dict(deep_merge(TINY, {"train": {"steps": 10, "batch_size": 16, "grad_accum": 2}}))
        data = load_image_data(cfg.data)
        trainer = Trainer(cfg, data.info, data.train, rank=rank, world_size=world)
        seen = []
        real = dist.all_reduce

        def recording(tensor, *args, **kwargs):
            seen.append(str(tensor.device))
            return real(tensor, *args, **kwargs)

        dist.all_reduce = recording
        if nan_rank == rank:  # this rank's loss turns non-finite at step 2
            compute = trainer.model.compute_loss

            def poisoned(batch, gen=None, **kw):
                loss, metrics = compute(batch, gen, **kw)
                if trainer.step == 2:
                    loss = loss * float("nan")
                    metrics["loss"] = loss.detach()
                return loss, metrics

            trainer.model.compute_loss = poisoned
        error = None
        before = None
        try:
            for _ in range(STEPS):
                before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                trainer.train_step()
        except TrainingError as exc:
            error = str(exc)
        state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        torch.save({"state": state, "before": before, "error": error, "step": trainer.step, "devices": seen,
                    "model_device": str(next(trainer.model.parameters()).device),
                    "ddp": type(trainer._ddp).__name__},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, nan_rank=None) -> list[dict]:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), nan_rank), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_stay_identical_under_ddp_and_collectives_use_the_training_device(tmp_path):
    r0, r1 = _run(tmp_path)
    assert r0["ddp"] == "DistributedDataParallel" and r0["error"] is None and r0["step"] == STEPS
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # one model on both ranks
    assert any(not torch.equal(v, r0["before"][k]) for k, v in r0["state"].items())  # and it trained
    for rec in (r0, r1):
        assert rec["devices"], "the loop handed no tensor to a collective"
        assert set(rec["devices"]) == {rec["model_device"]}


def test_a_non_finite_loss_on_one_rank_stops_both_before_the_update(tmp_path):
    r0, r1 = _run(tmp_path, nan_rank=1)
    for rec in (r0, r1):
        assert rec["error"] is not None and "non-finite" in rec["error"] and "at step 2" in rec["error"]
        assert rec["step"] == 2  # the poisoned step was not applied
        for k, v in rec["state"].items():
            assert torch.equal(v, rec["before"][k]), k
            assert torch.isfinite(v).all() if v.is_floating_point() else True


def test_train_device_on_the_ray_path():
    """train.device is honoured by Ray workers: cuda needs distributed.use_gpu, auto takes the cluster's GPUs."""
    from pipelines.distributed import ray_use_gpu
    from unite_core.config import config_from_dict
    from unite_core.train import TrainingError

    def cfg(device, use_gpu, workers=2):
        return config_from_dict({}, [f"train.device={device}", f"distributed.use_gpu={str(use_gpu).lower()}",
                                     f"distributed.num_workers={workers}"])

    with pytest.raises(TrainingError, match="distributed.use_gpu=true"):
        ray_use_gpu(cfg("cuda", False), cluster_gpus=8)
    with pytest.raises(TrainingError, match="train.device=cpu but distributed.use_gpu=true"):
        ray_use_gpu(cfg("cpu", True), cluster_gpus=8)
    assert ray_use_gpu(cfg("cuda", True), cluster_gpus=0)  # then the resource check names the missing GPUs
    assert ray_use_gpu(cfg("auto", False), cluster_gpus=2)
    assert not ray_use_gpu(cfg("auto", False), cluster_gpus=1)  # not one per worker: CPU
    assert not ray_use_gpu(cfg("auto", False), cluster_gpus=0)
    assert not ray_use_gpu(cfg("cpu", False), cluster_gpus=8)


def test_resource_check_names_what_the_cluster_lacks_and_the_fix():
    from pipelines.distributed import ResourceError, check_resources
    from unite_core.config import config_from_dict

    cfg = config_from_dict({}, ["distributed.num_workers=2", "distributed.cpus_per_worker=2"])
    check_resources(cfg, True, {"CPU": 4, "GPU": 2})  # enough of both
    with pytest.raises(ResourceError, match=r"has 3 CPUs but 2 training workers x 2 CPUs need 4: lower"):
        check_resources(cfg, False, {"CPU": 3}, "training workers")
    with pytest.raises(ResourceError, match=r"needs 2 GPUs but the Ray cluster has 1: .*, or set eval.parallel=local$"):
        check_resources(cfg, True, {"CPU": 8, "GPU": 1}, "generation workers", fix=", or set eval.parallel=local")
