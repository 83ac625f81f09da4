"""A CNN trained on real Shapes images: one head per attribute, for prompt accuracy and Shapes-FID."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .grammar import ATTRIBUTES, NUM_CLASSES, parse_caption, to_tensor


@dataclass
class EvaluatorConfig:
    width: int = 32  # channels of the first conv; 4 stride-2 convs: 64 -> 4 px
    feature_dim: int = 256  # penultimate features, used for Shapes-FID
    resolution: int = 64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Evaluator(nn.Module):
    """Classifies each attribute of a Shapes image; inputs are PIL images or (B, 3, H, W) in [-1, 1]."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = config or EvaluatorConfig()
        w = self.config.width
        self.trunk = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w))
        side = self.config.resolution // 16
        self.proj = nn.Linear(4 * w * side * side, self.config.feature_dim)
        self.heads = nn.ModuleDict({a: nn.Linear(self.config.feature_dim, NUM_CLASSES[a]) for a in ATTRIBUTES})

    def _prepare(self, images) -> torch.Tensor:
        if isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and isinstance(images[0], Image.Image)):
            images = to_tensor(list(images) if not isinstance(images, Image.Image) else [images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be PIL or (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        p = next(self.parameters())
        x = images.to(p.device, p.dtype)
        if x.shape[-1] != self.config.resolution:
            x = F.interpolate(x, size=self.config.resolution, mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.trunk(x).flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.forward_features(x)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images, batch_size: int = 256) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim), float32 on the CPU."""
        x = self._prepare(images)
        return torch.cat([self.forward_features(x[i:i + batch_size]).float().cpu()
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels (N, len(ATTRIBUTES)) in ATTRIBUTES order."""
        x = self._prepare(images)
        out = []
        for i in range(0, len(x), batch_size):
            logits = self(x[i:i + batch_size])
            out.append(torch.stack([logits[a].argmax(1) for a in ATTRIBUTES], 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def prompt_accuracy(self, images, captions: list[str]) -> dict:
        """Fraction of images whose every named attribute matches its caption, and per-attribute accuracy.

        Attributes a caption does not name (label -1, from parse_caption) are not scored.
        """
        pred = self.predict(images)
        target = torch.tensor([[parse_caption(c)[a] for a in ATTRIBUTES] for c in captions])
        if len(target) != len(pred):
            raise ValueError(f"{len(pred)} images but {len(captions)} captions")
        named = target >= 0
        ok = (pred == target) | ~named
        per_attr = {a: float(ok[named[:, j], j].float().mean()) if named[:, j].any() else float("nan")
                    for j, a in enumerate(ATTRIBUTES)}
        return {"accuracy": float(ok.all(1).float().mean()), "per_attribute": per_attr, "n": len(pred)}

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"_class_name": "Evaluator", "attributes": list(ATTRIBUTES),
                                                      **asdict(self.config)}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Evaluator":
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("attributes", list(ATTRIBUTES)) != list(ATTRIBUTES):
            raise ValueError(f"evaluator at {path} was trained for attributes {cfg['attributes']}, "
                             f"this code has {list(ATTRIBUTES)}")
        fields = {k: cfg[k] for k in EvaluatorConfig.__dataclass_fields__ if k in cfg}
        model = cls(EvaluatorConfig(**fields))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(device).eval()


def evaluator_loss(model: Evaluator, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy; labels (B, len(ATTRIBUTES))."""
    logits = model(x)
    return sum(F.cross_entropy(logits[a], labels[:, j]) for j, a in enumerate(ATTRIBUTES))
