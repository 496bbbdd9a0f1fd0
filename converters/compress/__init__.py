"""Compression steps on the canonical decoder (issue 5): structured pruning (layers, GQA-aware
heads, FFN channels), unstructured magnitude sparsity, low-rank factorization, and knowledge
distillation from the uncompressed model.

* :mod:`.options` — :class:`CompressOptions` and the CLI flags (torch-free);
* :mod:`.importance` — calibration statistics that rank channels, heads and layers;
* :mod:`.prune` — structured and unstructured pruning;
* :mod:`.lowrank` — truncated-SVD factorization into two plain linears;
* :mod:`.distill` — teacher -> student training (checkpoints, resume, progress);
* :mod:`.checkpoint` — the ``edgelm compress`` output folder, readable as a convert source;
* :mod:`.recipe` — :func:`compress_source`, the whole chain, and its report.

Everything keeps the model a plain canonical decoder (per-layer dims and ranks in the
config), so every lowering takes a compressed model unchanged.
"""

from __future__ import annotations

from edgelm.errors import EdgeLMError


class CompressionError(EdgeLMError):
    """A compression recipe cannot be applied to this model."""
