"""Verifiers for test-time search: `score(images, prompts) -> [N]`, higher is better.

`ClassifierVerifier` is the small local one (log-probability of the target class under a locally trained CNN);
`CLIPVerifier` is CLIPScore through open_clip with weights from a local file only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tokenomy.errors import InputError, ModelLoadError


class ClassifierVerifier:
    """Score = log p(target class | image); prompts are class ids (one per image, or one for all)."""

    def __init__(self, classifier):
        self.classifier = classifier.eval()
        self.calls = 0

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        self.calls += images.shape[0]
        targets = torch.as_tensor(prompts, dtype=torch.long).expand(images.shape[0])
        return self.classifier(images).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


class CLIPVerifier:
    """CLIPScore = 2.5 * max(cos(image, text), 0), open_clip model `model_name` with weights from `weights_path`."""

    def __init__(self, model_name: str, weights_path, device: str = "cpu"):
        import open_clip

        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise ModelLoadError(f"CLIP weights {weights_path} not found; the verifier only loads local files")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights_path), device=device)
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot load open_clip model {model_name!r} from {weights_path}: {exc}") from exc
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval()
        self.device, self.calls = device, 0
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, (tuple, list)) else (size, size)
        mean, std = self.model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073), self.model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise InputError(f"CLIPVerifier got {images.shape[0]} images but {len(prompts)} prompts")
        self.calls += images.shape[0]
        pixels = F.interpolate((images.float() + 1) / 2, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        pixels = ((pixels - self.mean) / self.std).to(self.device)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return 2.5 * (image_features * text_features).sum(-1).clamp_min(0).cpu()
