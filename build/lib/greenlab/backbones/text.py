"""Report text encoder: a transformers encoder whose [CLS] vector represents a report.

``forward(texts)``: list of B strings -> (B, num_features) float, tokenised here (max ``max_length`` tokens).

``weights``:
- ``random`` (the default; nothing is downloaded): a BERT of the configured size, randomly initialised, with a
  vocabulary (frequent words + characters, read by WordPiece) fitted on the training reports by
  ``fit_vocabulary`` (GreenRFM trains its text encoder with labels, so a small random BERT learns; a
  radiology BERT starts better).
- a local folder (``save_pretrained`` layout) or a hub name, e.g. ``microsoft/BiomedVLP-CXR-BERT-general``:
  read from disk / the local Hugging Face cache; fetched only with ``download=true``. When that fails, a
  loud warning, the random BERT, and ``init_record`` says so (results.json records it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from greenlab.backbones.weights import init_record
from greenlab.warnings_banner import loud_warning

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TextEncoder(nn.Module):
    """Args: weights (see module doc), download (allow hub downloads), max_length (tokens), and for
    ``random``: vocab_size, hidden_size, num_layers, num_heads."""

    def __init__(self, weights: str | None, max_length: int, download: bool, vocab_size: int, hidden_size: int,
                 num_layers: int, num_heads: int):  # fmt: skip
        super().__init__()
        self.max_length = max_length
        self.init_record = init_record(weights)
        self.tokenizer = None
        if weights not in ("random", None):
            try:
                self.model, self.tokenizer = _load_pretrained(str(weights), download)
                self.init_record.update(used="pretrained", source=str(weights))
            except (OSError, ValueError) as err:
                self.init_record["note"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                loud_warning(
                    f"text encoder {weights!r} could not be loaded ({self.init_record['note']}).\n"
                    "Falling back to a RANDOMLY INITIALISED BERT with a vocabulary fitted on the training\n"
                    "reports. Give a local folder, or text_encoder.download=true when online.\n"
                    "results.json records init=random."
                )
        if self.tokenizer is None:
            from transformers import BertConfig, BertModel

            config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                                max_position_embeddings=max(512, max_length))  # fmt: skip
            self.model = BertModel(config, add_pooling_layer=False)
            self.vocab_size = vocab_size
        self.num_features = self.model.config.hidden_size
        used = "random" if self.init_record["used"] == "random" else weights  # what a rebuild must ask for
        self.recipe = {"factory": f"{__name__}.TextEncoder", "weights": used, "max_length": max_length,
                       "download": download, "vocab_size": vocab_size, "hidden_size": hidden_size,
                       "num_layers": num_layers, "num_heads": num_heads}  # fmt: skip

    @property
    def needs_vocabulary(self) -> bool:
        return self.tokenizer is None

    def fit_vocabulary(self, texts: list[str]) -> None:
        """Fit the random BERT's lower-cased vocabulary on ``texts``: every character seen (alone and as a
        ``##`` continuation) and the most frequent whole words, at most ``vocab_size`` tokens in all, read
        by BERT's WordPiece tokenizer (a word not in the vocabulary splits into its longest known pieces).

        Built by counting, in sorted order, so the same texts always give the same token ids (the
        ``tokenizers`` WordPiece trainer merges ties in a hash order that changes from process to process).
        """
        from collections import Counter

        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        normalizer, pre_tokenizer = (
            normalizers.BertNormalizer(lowercase=True),
            pre_tokenizers.BertPreTokenizer(),
        )
        counts = Counter(
            word
            for text in texts
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        )
        characters = sorted({c for word in counts for c in word})
        pieces = [*characters, *(f"##{c}" for c in characters)]
        room = max(0, self.vocab_size - len(SPECIAL_TOKENS) - len(pieces))
        frequent = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        words = [w for w, _ in frequent if len(w) > 1][:room]
        tokens = SPECIAL_TOKENS + pieces + sorted(words)
        wordpiece = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        wordpiece.normalizer, wordpiece.pre_tokenizer = normalizer, pre_tokenizer
        wordpiece.decoder = decoders.WordPiece()
        cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
        wordpiece.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]",
                                                 unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
        self.init_record["note"] = (
            (self.init_record["note"] or "")
            + f" vocabulary of {len(self.tokenizer)} tokens ({len(words)} words"
            f" + characters) fitted on {len(texts)} training reports"
        ).strip()

    def save_tokenizer(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    def forward(self, texts: list[str]) -> torch.Tensor:
        """B report strings -> (B, num_features) [CLS] vectors."""
        if self.tokenizer is None:
            raise RuntimeError("TextEncoder(weights=random) needs fit_vocabulary(training reports) first")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt", return_token_type_ids=False).to(device)  # fmt: skip
        return self.model(**tokens).last_hidden_state[:, 0]


def _load_pretrained(name: str, download: bool):
    """(model, tokenizer) from a local folder or the hub. CXR-BERT's own model class needs remote code; its
    BERT encoder loads as a plain ``BertModel``, as the official GreenRFM code does."""
    from transformers import AutoModel, AutoTokenizer, BertModel, PretrainedConfig

    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not download)
    kind = PretrainedConfig.get_config_dict(source, local_files_only=not download)[0].get("model_type")
    cls = BertModel if kind in ("bert", "cxr-bert") else AutoModel
    try:  # BERT-family models: drop the unused pooler (its parameters would get no gradient)
        model = cls.from_pretrained(source, local_files_only=not download, add_pooling_layer=False)
    except TypeError:
        model = cls.from_pretrained(source, local_files_only=not download)
    return model, tokenizer
