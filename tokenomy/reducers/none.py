"""The identity reducer: every visual token reaches the LLM (the unpruned baseline)."""
from tokenomy.reducers.base import Reducer, Selection
from tokenomy.reducers.registry import register


@register("none")
class NoReduction(Reducer):
    description = "the identity: every visual token reaches the LLM (the unpruned baseline)"
    paper = "-"
    def __init__(self, keep=None):
        # keep is accepted so sweeps can pass one value to every reducer; the baseline ignores it, and its stats say so.
        super().__init__(keep=keep)

    @property
    def applies_budget(self):
        return False

    def budget(self, image):
        return image.num_tokens

    def select(self, image):
        return Selection.keep_all(image)
