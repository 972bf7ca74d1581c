import math

import pytest
import torch

from unite_core.config import ConfigError
from unite_core.data import DataError, load_image_data
from unite_core.train import (
    CheckpointError, Trainer, TrainingError, build_optimizers, load_checkpoint, lr_factor,
    model_from_checkpoint, step_indices,
)


@pytest.fixture(scope="module")
def digits():
    from unite_core.config import DataConfig

    return load_image_data(DataConfig(dataset="digits", image_size=8))


def test_optimizer_split_follows_the_authors_rule(tiny_cfg, digits):
    """Muon: every 2-D weight except the patch embedding, the GE's output layer, the in-context and
    register position tables (the authors' utils/optim rule); AdamW (eps 1e-6): the rest."""
    tr = Trainer(tiny_cfg(model={"decoder_kind": "patch_tokens"}), digits.info, digits.train)
    muon, adamw = tr.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    adam_names = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    for n in ("encoder.blocks.0.attn.qkv.weight", "decoder.blocks.0.mlp.fc1.weight", "encoder.y_embed.weight",
              "encoder.t_embed.mlp.0.weight", "encoder.latent_in.weight", "decoder.head.weight",
              "decoder.latent_up.weight", "decoder.latent_in.weight"):
        assert n in muon_names, n
    for n in ("encoder.latent_pos", "encoder.in_context_pos", "encoder.embed.proj.weight", "encoder.out_proj.weight",
              "encoder.out_ada.weight", "encoder.final_norm.weight", "encoder.blocks.0.ada.bias", "decoder.cls"):
        assert n in adam_names, n
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert len(muon_names) + len(adam_names) == len(list(tr.model.parameters()))
    assert adamw.param_groups[0]["eps"] == 1e-6 and muon.param_groups[0]["eps"] == 1e-6
    assert muon.param_groups[0]["momentum"] == 0.95
    only_adamw = build_optimizers(tr.model, tiny_cfg(train={"optimizer": "adamw"}))
    assert len(only_adamw) == 1 and isinstance(only_adamw[0], torch.optim.AdamW)


def test_lr_scales_with_the_global_batch_like_the_authors(tiny_cfg, digits):
    """lr = train.lr x max(1, batch / 384): batch 1024 -> x 2.667; batches up to 384 keep train.lr."""
    model = Trainer(tiny_cfg(), digits.info, digits.train).model
    big = build_optimizers(model, tiny_cfg(train={"batch_size": 1024, "lr": 1e-4}))
    assert [o.param_groups[0]["lr"] for o in big] == pytest.approx([1e-4 * 1024 / 384] * 2)
    small = build_optimizers(model, tiny_cfg(train={"batch_size": 64, "lr": 1e-4}))
    assert [o.param_groups[0]["lr"] for o in small] == pytest.approx([1e-4] * 2)
    off = build_optimizers(model, tiny_cfg(train={"batch_size": 1024, "lr": 1e-4, "lr_batch_base": None}))
    assert [o.param_groups[0]["lr"] for o in off] == pytest.approx([1e-4] * 2)


def test_lr_schedule_warmup_then_cosine(tiny_cfg):
    cfg = tiny_cfg(train={"steps": 100, "warmup_steps": 10, "lr": 1e-3, "lr_min": 1e-5})
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-6)
    assert lr_factor(100, cfg) == pytest.approx(0.01)


def test_two_phase_schedule_of_the_authors(tiny_cfg):
    """Their ImageNet config in steps (x 10): warmup 20, hold to 30, cosine to lr2 by 50, then flat."""
    cfg = tiny_cfg(train={"steps": 1000, "warmup_steps": 200, "lr": 1e-4, "lr_min": 1e-5, "schedule": "two_phase",
                          "two_phase": {"hold_until": 300, "decay_until": 500, "lr2": 5e-5,
                                        "hold2_until": 1000, "decay2_until": 1000}})
    assert lr_factor(0, cfg) == 0.0 and lr_factor(100, cfg) == pytest.approx(0.5)
    assert lr_factor(250, cfg) == 1.0
    assert lr_factor(400, cfg) == pytest.approx(0.5 + 0.5 * 0.5)  # half way down the cosine to 0.5
    assert lr_factor(500, cfg) == pytest.approx(0.5) and lr_factor(999, cfg) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="train.two_phase.decay_until"):
        tiny_cfg(train={"schedule": "two_phase", "two_phase": {"hold_until": 10, "decay_until": 5}})


def test_data_order_is_epochwise_permutation():
    seen = torch.cat([step_indices(s, 100, 10, seed=3) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(step_indices(0, 100, 10, 3), step_indices(10, 100, 10, 3))
    with pytest.raises(DataError, match="train.batch_size"):
        step_indices(0, 5, 10, 0)


def test_batch_larger_than_the_dataset_is_refused_at_construction(tiny_cfg, digits):
    with pytest.raises(TrainingError, match=r"train.batch_size=4096 exceeds the \d+ training samples"):
        Trainer(tiny_cfg(train={"batch_size": 4096}), digits.info, digits.train)


def _mean_image_psnr(dataset) -> float:
    x = dataset.get_batch(torch.arange(len(dataset)))[0]
    mse = ((x - x.mean(0, keepdim=True)) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.fixture(scope="module")
def mnist16():
    from unite_core.config import DataConfig

    return load_image_data(DataConfig(dataset="mnist5k", image_size=16))


@pytest.mark.slow
def test_short_run_learns_image_specific_latents(tiny_cfg, mnist16):
    """The tokenizer must encode each image, not just learn the mean image.

    MNIST (the embedded default's data) at 16x16 with the T-sized model, the authors' decoder (one
    latent per patch, K=16) and the embedded default's loss and GE output init. Before the fixes of
    the latent collapse (l1 on MNIST's flat background, tiny out_proj init, EMA without warm-up) such
    runs sat at the mean image's PSNR with identical latents for every image. Measured (AMD EPYC,
    2 threads): 15.5 dB against the mean image's 14.0 dB. (The query decoder with K=8 reaches only
    ~14.3 dB in these 300 steps: too close to the floor for a test of collapse.)
    """
    cfg = tiny_cfg(
        data={"dataset": "mnist5k", "image_size": 16},
        model={"ge_depth": 4, "ge_width": 128, "ge_heads": 4, "decoder_depth": 2, "decoder_width": 128,
               "decoder_heads": 4, "patch_size": 4, "latent_tokens": 16, "latent_dim": 8,
               "in_context_tokens": 8, "in_context_start": 2, "latent_out_init": "xavier",
               "decoder_kind": "patch_tokens"},
        loss={"recon": "mse"},
        train={"steps": 300, "batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "log_every": 300,
               "eval_every": 300, "precision": "bf16", "ema_decay": 0.99},
    )
    tr = Trainer(cfg, mnist16.info, mnist16.train, val_set=mnist16.val)
    first = tr.train_step()
    result = tr.run()
    last = result.history[-1]
    assert result.step == 300
    assert last["recon"] < 0.5 * first["recon"]
    floor = _mean_image_psnr(mnist16.val)
    assert last["val_psnr"] > floor + 0.5, (last["val_psnr"], floor)  # EMA weights, above the mean image
    x = mnist16.val.get_batch(torch.arange(100))[0]
    model = tr.ema.module.eval()
    with torch.no_grad():
        z1 = model.tokenize(x, torch.Generator().manual_seed(1)).float()
        z2 = model.tokenize(x, torch.Generator().manual_seed(2)).float()
    across_images = z1.var(0).mean()
    register_noise = (z1 - z2).pow(2).mean() / 2
    assert across_images > 0.02, across_images  # the latents differ between images (collapsed: ~1e-5) ...
    assert register_noise < 0.2 * across_images, (register_noise, across_images)  # ... because of the image


def test_ema_follows_the_weights_early(tiny_cfg, digits):
    """The EMA decay ramps up, so after a few steps the average is not still the random init."""
    tr = Trainer(tiny_cfg(train={"ema_decay": 0.999}), digits.info, digits.train)
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.run(until_step=20)
    key = "encoder.latent_in.weight"
    moved = (tr.model.state_dict()[key] - init[key]).norm()
    ema_moved = (tr.ema.module.state_dict()[key] - init[key]).norm()
    assert ema_moved > 0.5 * moved  # a plain 0.999 EMA would have moved about 2% of the way


def test_flow_warmup_trains_reconstruction_alone_first(tiny_cfg, digits):
    """loss.flow_warmup_steps=3: steps 0-2 have no flow term and leave the class embeddings (read by
    the denoising pass only; tokenization uses the null class) untouched; from step 3 the joint
    objective runs."""
    tr = Trainer(tiny_cfg(loss={"flow_warmup_steps": 3}), digits.info, digits.train)
    classes = lambda: tr.model.encoder.y_embed.weight[:10].detach().clone()  # noqa: E731 - rows of the 10 digits
    before = classes()
    warm = [tr.train_step() for _ in range(3)]
    assert all("flow" not in m for m in warm)
    assert all(w["loss"] == pytest.approx(w["recon"]) for w in warm)
    assert torch.equal(classes(), before)
    joint = tr.train_step()
    # flow.reduction=sum (the authors'): the M=3 noisings' mean losses are added
    assert joint["flow"] > 0 and joint["loss"] == pytest.approx(joint["recon"] + 3 * joint["flow"], rel=1e-4)
    assert not torch.equal(classes(), before)


def test_checkpoint_roundtrip_is_bit_identical(tiny_cfg, digits, tmp_path):
    tr = Trainer(tiny_cfg(), digits.info, digits.train)
    tr.run(until_step=3)
    path = tr.save(tmp_path / "ckpt.pt")
    state = load_checkpoint(path, tiny_cfg())
    for k, v in tr.model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    other = Trainer(tiny_cfg(), digits.info, digits.train)
    other.load_state_dict(state)
    for (k, a), b in zip(tr.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.step == 3
    m = model_from_checkpoint(state, use_ema=True)
    assert torch.equal(m.encoder.latent_pos, tr.ema.module.encoder.latent_pos)


def test_resume_matches_uninterrupted_run(tiny_cfg, digits, tmp_path):
    cfg = tiny_cfg(train={"steps": 12, "checkpoint_every": 5, "precision": "bf16"})
    full = Trainer(cfg, digits.info, digits.train)
    full.run()
    part = Trainer(cfg, digits.info, digits.train)
    part.run(until_step=5, checkpoint_path=tmp_path / "c.pt")
    resumed = Trainer(cfg, digits.info, digits.train)
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.pt", cfg))
    resumed.run()
    assert resumed.step == full.step == 12
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema_weights().values(), resumed.ema_weights().values()):
        assert torch.equal(a, b)


def test_gradient_accumulation_matches_full_batch(tiny_cfg, digits, monkeypatch):
    """Two micro-batches of 8 give the same update as one batch of 16 (for a loss whose value
    depends only on the samples, so that the random draws of the real objective do not differ)."""
    a = Trainer(tiny_cfg(train={"optimizer": "adamw", "grad_clip": None}), digits.info, digits.train)
    b = Trainer(tiny_cfg(train={"optimizer": "adamw", "grad_clip": None, "grad_accum": 2}), digits.info, digits.train)
    for tr in (a, b):
        model = tr.model

        def det_loss(batch, gen=None, model=model):
            x, _ = batch
            out = model.decode(x.flatten(1)[:, :16].reshape(-1, 4, 4))
            loss = (out - x).abs().mean()
            return loss, {"loss": loss.detach(), "recon": loss.detach()}

        monkeypatch.setattr(model, "compute_loss", det_loss)
    ma, mb = a.train_step(), b.train_step()
    assert ma["recon"] == pytest.approx(mb["recon"], rel=1e-5)
    live = 0
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), name
        live += int(pa.grad.abs().sum() > 0)
    assert live >= 10  # the decoder's parameters all received gradient


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, digits, tmp_path, monkeypatch):
    cfg = tiny_cfg(train={"steps": 20, "checkpoint_every": 4})
    tr = Trainer(cfg, digits.info, digits.train)
    real = tr.model.compute_loss

    def poisoned(batch, gen=None):
        loss, metrics = real(batch, gen)
        if tr.step == 6:
            loss = loss * float("nan")
            metrics["loss"] = loss.detach()
        return loss, metrics

    monkeypatch.setattr(tr.model, "compute_loss", poisoned)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(TrainingError, match="step 6.*last good checkpoint"):
        tr.run(checkpoint_path=ckpt)
    state = load_checkpoint(ckpt, cfg)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoint_from_other_config_is_refused(tiny_cfg, digits, tmp_path):
    tr = Trainer(tiny_cfg(), digits.info, digits.train)
    path = tr.save(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"model.latent_dim=4 .* 6"):
        load_checkpoint(path, tiny_cfg(model={"latent_dim": 6}))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)


def test_atomic_save_leaves_no_temp_files(tiny_cfg, digits, tmp_path):
    tr = Trainer(tiny_cfg(), digits.info, digits.train)
    tr.save(tmp_path / "c.pt")
    tr.save(tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_time_limit_stops_early_with_checkpoint(tiny_cfg, digits, tmp_path):
    tr = Trainer(tiny_cfg(train={"steps": 10_000}), digits.info, digits.train)
    res = tr.run(checkpoint_path=tmp_path / "c.pt", time_limit_s=0.5)
    assert res.stopped_early and 0 < res.step < 10_000
    assert load_checkpoint(tmp_path / "c.pt")["step"] == res.step
    assert math.isfinite(res.history[-1]["loss"]) if res.history else True


# ----------------------------------------------------------------------------------------------
# The loader path: image folders decoded by DataLoader worker processes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(16):
            h, w = (int(v) for v in rng.integers(10, 30, 2))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{k}.png")
    return root


def _folder_cfg(tiny_cfg, root, workers: int, **train):
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 8, "flip": True, "val_fraction": 0.25,
            "num_workers": workers}
    return tiny_cfg(data=data, train={"batch_size": 8, **train})


def _reference_batches(ds, steps, batch, seed, rank, world, accum):
    """The in-thread order of the loop before the DataLoader, written out."""
    from unite_core.train import fetch

    out = []
    for s in range(steps):
        idx = step_indices(s, len(ds), batch, seed)
        ds.set_epoch(s // (len(ds) // batch))
        for chunk in idx[rank::world].chunk(accum):
            out.append(fetch(ds, chunk))
    return out


@pytest.mark.parametrize("rank,world,accum", [(0, 1, 1), (1, 2, 2)])
def test_loader_reproduces_the_step_order(image_folder, rank, world, accum):
    from unite_core.config import DataConfig
    from unite_core.data.loader import StepBatches, move

    data = load_image_data(DataConfig(dataset="imagefolder", root=str(image_folder), image_size=8, flip=True,
                                      val_fraction=0.25))
    steps = 10  # 36 training images, 4 steps of 8 per epoch: crosses two epoch boundaries
    want = _reference_batches(data.train, steps, 8, 5, rank, world, accum)
    sb = StepBatches(data.train, batch_size=8, seed=5, rank=rank, world_size=world, grad_accum=accum, start=3,
                     end=steps, num_workers=2)
    got = [move(b, "cpu") for s in range(3, steps) for b in sb.take(s)]
    assert sb._it is None  # the last step closed the workers
    assert len(got) == len(want[3 * accum:]) == (steps - 3) * accum
    for (xa, ya), (xb, yb) in zip(got, want[3 * accum:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_images_are_decoded_in_worker_processes(tiny_cfg, image_folder, monkeypatch):
    from torch.utils.data import get_worker_info

    from unite_core.data import ImageFolderDataset

    real = ImageFolderDataset._decode

    def only_in_workers(self, i):
        if get_worker_info() is None:
            raise AssertionError("decoded in the training process")
        return real(self, i)

    monkeypatch.setattr(ImageFolderDataset, "_decode", only_in_workers)  # forked workers inherit it
    cfg = _folder_cfg(tiny_cfg, image_folder, 2)
    data = load_image_data(cfg.data)
    tr = Trainer(cfg, data.info, data.train)
    tr.run(until_step=3)
    assert tr.step == 3 and tr._batches is None  # run() stopped its workers
    in_thread = Trainer(_folder_cfg(tiny_cfg, image_folder, 0), data.info, data.train)
    with pytest.raises(DataError, match="decoded in the training process"):  # the guard works
        in_thread.train_step()


def test_resume_on_the_loader_path_matches_uninterrupted_run(tiny_cfg, image_folder, tmp_path):
    """Workers, accumulation and flips: a run resumed from step 3 ends bit-identical to an uninterrupted
    one, and both equal the run that fetched every batch in the training thread."""
    train = {"steps": 8, "checkpoint_every": 3, "grad_accum": 2, "log_every": 4, "eval_every": 4}
    cfg = _folder_cfg(tiny_cfg, image_folder, 2, **train)
    data = load_image_data(cfg.data)
    full = Trainer(cfg, data.info, data.train)
    full.run()
    part = Trainer(cfg, data.info, data.train)
    part.run(until_step=3, checkpoint_path=tmp_path / "c.pt")
    resumed = Trainer(cfg, data.info, data.train)
    resumed.train_step()  # opens workers at step 0; loading the checkpoint must move them to step 3
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.pt", cfg))
    resumed.run()
    thread = Trainer(_folder_cfg(tiny_cfg, image_folder, 0, **train), data.info, data.train)
    thread.run()
    assert resumed.step == full.step == thread.step == 8
    for other in (resumed, thread):
        for (k, a), b in zip(full.model.state_dict().items(), other.model.state_dict().values()):
            assert torch.equal(a, b), k
    assert [r["loss"] for r in full.history] == [r["loss"] for r in thread.history]


def test_a_corrupt_image_in_a_worker_is_one_line(tiny_cfg, image_folder, tmp_path):
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(image_folder, root)
    cfg = _folder_cfg(tiny_cfg, root, 2)
    data = load_image_data(cfg.data)
    victim = data.train.path(0)
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    tr = Trainer(cfg, data.info, data.train)
    with pytest.raises(DataError) as err:
        tr.run(until_step=6)  # 36 images, 4 steps per epoch: step 4 at the latest uses image 0
    msg = str(err.value)
    assert str(victim) in msg and "data.on_corrupt=skip" in msg and "\n" not in msg and "Traceback" not in msg


class _DiesInWorkers(torch.utils.data.Dataset):
    """A lazy set whose worker processes are killed (as by the out-of-memory killer)."""

    lazy = True

    def __len__(self):
        return 32

    def get_batch(self, indices):
        import os
        import signal

        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(len(indices), 1), torch.zeros(len(indices), dtype=torch.long)


def test_a_killed_loader_worker_is_a_data_error_naming_the_fix():
    from unite_core.data.loader import StepBatches

    sb = StepBatches(_DiesInWorkers(), batch_size=8, seed=0, start=0, end=4, num_workers=1)
    with pytest.raises(DataError, match=r"data-loading worker process ended unexpectedly .*data.num_workers"):
        list(sb.take(0))
    sb.close()
