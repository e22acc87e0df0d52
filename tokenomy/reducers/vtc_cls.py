"""VTC-CLS (reducers.md §2): keep the patches the [CLS] token attends to most, summed over encoder layers.

Score s_j = sum over layers start..feature_layer of the head-averaged CLS->patch attention (softmax over CLS and
patches, CLS share not renormalised away); keep the top-`keep`, in raster order, before the projector; positions follow the
model family (renumbered contiguously on LLaVA, as the reference does).
"""

from tokenomy.errors import InputError
from tokenomy.reducers.base import Reducer, Selection, Site, top_k_sorted
from tokenomy.reducers.registry import register
from tokenomy.vision.base import CLS_ATTENTION, SignalRequest


@register("vtc-cls")
class VTCCLS(Reducer):
    description = "keep the patches the [CLS] token attends to most, summed over encoder layers start..feature layer"
    paper = "Wang et al., [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS), arXiv 2412.05819"
    site = Site.PRE_PROJECTOR

    def __init__(self, keep=None, start_layer: int = 16):
        super().__init__(keep=keep)
        self.start_layer = start_layer

    def layers(self, num_layers: int, feature_layer: int) -> tuple:
        """Encoder layers start..feature_layer; a start beyond a shallow encoder's feature layer is clamped to it."""
        last = feature_layer + num_layers if feature_layer < 0 else feature_layer
        start = self.start_layer + num_layers if self.start_layer < 0 else self.start_layer
        if not 0 <= start:
            raise InputError(f"vtc-cls start_layer {self.start_layer} is outside the encoder's {num_layers} layers")
        return tuple(range(min(start, last), last + 1))

    def vision_request(self, num_layers, feature_layer):
        return SignalRequest.of(**{CLS_ATTENTION: self.layers(num_layers, feature_layer)})

    def select(self, image):
        if CLS_ATTENTION not in image.signals:
            raise InputError("vtc-cls needs the CLS attention row; this encoder has no CLS token")
        scores = image.signals[CLS_ATTENTION].float().sum(dim=0)
        return Selection.from_indices(image, top_k_sorted(scores, self.budget(image)))
