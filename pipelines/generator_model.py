"""The trained model as an MLflow model: `GeneratorModel`, class labels in, generated images out.

mlflow.pytorch pickles the module, so this class must stay importable under this name for logged
models to load (`mlflow.pytorch.load_model("models:/<model id>")`); keep it small and stable.
"""

from __future__ import annotations

import torch


class GeneratorModel(torch.nn.Module):
    """A trained UNITE model (EMA weights) that generates images for class labels.

    forward(labels: int64 tensor (N,)) -> float32 images (N, C, H, W) in [0, 1], sampled with the
    `sample` settings it was logged with (solver, steps, guidance scale and interval) from noise
    seeded by sample.seed: the same labels give the same images. Through mlflow.pyfunc,
    predict(np.array([3, 7])) returns the images as an array.
    """

    def __init__(self, model: torch.nn.Module, sample: dict):
        super().__init__()
        self.model = model
        self.sample = dict(sample)

    @torch.no_grad()
    def forward(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels).reshape(-1).long()
        device = next(self.model.parameters()).device
        s = self.sample
        gen = torch.Generator(device=device).manual_seed(int(s.get("seed", 0)))
        images, _ = self.model.generate(
            labels.to(device), solver=s["solver"], steps=int(s["steps"]), cfg_scale=float(s["cfg_scale"]),
            cfg_interval=tuple(s["cfg_interval"]), norm_first=bool(s["norm_first"]), rtol=float(s["rtol"]),
            atol=float(s["atol"]), generator=gen,
        )
        return images.float()
