"""Text sources, tokenizers and LightningDataModules shared by every method."""

from lightning_rlm.data.base import TextDataModule, split_documents_by_seed
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.data.lm_window import LMWindowDataModule
from lightning_rlm.data.pairs import KeywordPrefixCompletionDataModule, PairsDataModule
from lightning_rlm.data.paths import data_root, resolve_data_path
from lightning_rlm.data.prefix_completion import PrefixCompletionDataModule
from lightning_rlm.data.prompts import PromptDataModule
from lightning_rlm.data.rationales import RationalesDataModule
from lightning_rlm.data.sources import PRESETS, TextSource, split_documents
from lightning_rlm.data.tokenizers import CharTokenizer, HFTokenizer, TextTokenizer, build_tokenizer

__all__ = [
    "PRESETS", "CharTokenizer", "ChatFormat", "KeywordPrefixCompletionDataModule", "PairsDataModule", "HFTokenizer", "LMWindowDataModule", "PrefixCompletionDataModule",
    "PromptDataModule", "RationalesDataModule", "TextDataModule", "TextSource", "TextTokenizer", "build_tokenizer", "data_root",
    "resolve_data_path", "split_documents", "split_documents_by_seed",
]
