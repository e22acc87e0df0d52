"""Triton kernels, each with a PyTorch reference of the same signature.

Token merging: ``tokenomy.kernels.tome`` (dispatched match/merge/unmerge and the ViT patch), the reference
``tokenomy.kernels.merge``, the Triton twin ``tokenomy.kernels.merge_triton``, the choice in ``dispatch``.
"""
