__version__ = "0.1.0"


def score(x, **kwargs):
    """Score image quality for a multimodal LLM with MedQM-I (0 = cannot diagnose from it, 1 = perfect).

    ``x``: a path (file or folder; every frame and slice) → a pandas DataFrame with one row per image and one
    per unreadable file; a numpy array or `medqm.io.MedImage` → a `QualityScore`; a list of those → a list.
    Options (``model``, ``heatmaps``, ``batch_size``, ``device``, ``runtime``, reader options…) are those of
    `medqm.model.scoring.score`, imported on first use so ``import medqm`` stays light.
    """
    from medqm.model.scoring import score as _score

    return _score(x, **kwargs)
