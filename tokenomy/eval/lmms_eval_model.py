"""The `lmms_eval.models` entry point (pyproject.toml): the manifest lmms-eval reads to find tokenomy's model class.

Kept apart from the class (tokenomy/eval/lmms_eval_adapter.py) and importing lmms-eval only when called: lmms-eval
loads its entry points while it is itself being imported, so a module that imported lmms-eval at its top would be
half-initialised when the manifest is asked for, if a user imported it first.
"""
MODEL_ID = "tokenomy"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="tokenomy.eval.lmms_eval_adapter.TokenomyLMMS")
