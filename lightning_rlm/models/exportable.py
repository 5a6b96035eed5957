"""What a method hands to `lightning-rlm export` (:mod:`lightning_rlm.workflow.export`): its language model.

Every method that trains an LM has a hook ``exportable_lm(adapter_mode) -> ExportableLM`` and a class attribute
``export_adapter_modes`` (the adapter modes it can export, the default first; empty when the LM has no
switchable adapters). The export command turns the module into a Hugging Face folder: a plain HF causal LM is
saved as it is, a PEFT LoRA model is merged (``--merge``) or saved as a PEFT adapter folder, and a model with
the repo's own two-adapter wrappers (dual LoRA, SVD basis) always has the adapters of ``adapter_mode`` folded
into its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn


@dataclass
class ExportableLM:
    """A method's LM as deployed.

    Attributes:
        model: an HF causal LM, a PEFT model around one, or a
            :class:`~lightning_rlm.adapters.wrapping.LinearWrappingModel` (dual LoRA, SVD) around one.
        tokenizer: its HF tokenizer (chat template included); ``None`` when the tokenizer is the
            DataModule's (the export then takes the one the run saved).
        adapter_mode: the adapter mode folded in (a ``LinearWrappingModel``'s ``MODES``), else ``None``.
        extras: ``{file name: object}`` saved beside the model with ``torch.save`` (what is not part of the
            HF model, e.g. Quiet-STaR's thought markers and mixing head).
        description: one line on what this LM is, for the export's ``EXPORT.json``.
    """

    model: nn.Module
    tokenizer: Any = None
    adapter_mode: Optional[str] = None
    extras: dict[str, Any] = field(default_factory=dict)
    description: str = ""
