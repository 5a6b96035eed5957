"""Metrics for RL on language models: text diversity/degeneracy statistics and MAUVE.

`text` holds DDP-correct `torchmetrics` metrics computed from decoded completions; `mauve` holds offline
featurizers and a wrapper around `mauve-text` (imported lazily, it pulls in faiss and scikit-learn).
"""

from lightning_rlm.metrics.mauve import (
    Featurizer,
    HFFeaturizer,
    MiniLMFeaturizer,
    PolicyFeaturizer,
    compute_mauve,
    compute_mauve_from_features,
    minilm_model_path,
)
from lightning_rlm.metrics.text import (
    DegenerateFlag,
    DistinctN,
    GroupJaccard,
    MeanLength,
    RepeatedNgramLoop,
    UniqueFirstSentences,
    count_sentences,
    first_sentence,
    word_tokenize,
)

__all__ = [
    "DegenerateFlag",
    "DistinctN",
    "Featurizer",
    "GroupJaccard",
    "HFFeaturizer",
    "MeanLength",
    "MiniLMFeaturizer",
    "PolicyFeaturizer",
    "RepeatedNgramLoop",
    "UniqueFirstSentences",
    "compute_mauve",
    "compute_mauve_from_features",
    "count_sentences",
    "first_sentence",
    "minilm_model_path",
    "word_tokenize",
]
