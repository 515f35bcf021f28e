"""Report text encoder: a transformers encoder whose [CLS] vector represents a report.

``forward(texts)``: list of B strings -> (B, num_features) float, tokenised here (max ``max_length`` tokens).

``weights``:
- ``random`` (the default; nothing is downloaded): a BERT of the configured size, randomly initialised, with a
  vocabulary (frequent words + characters, read by WordPiece) fitted on the training reports by
  ``fit_vocabulary`` (GreenRFM trains its text encoder with labels, so a small random BERT learns; a
  radiology BERT starts better).
- a local folder (``save_pretrained`` layout; a broken one is an error) or a hub name, e.g.
  ``microsoft/BiomedVLP-CXR-BERT-general``: read from disk / the local Hugging Face cache; fetched only with
  ``download=true``. When a hub name cannot be had, a loud warning, the random BERT, and ``init_record``
  says so (results.json records it).

Decided by ``greenlab.backbones.weights.resolve_weights`` as the image backbones' ``weights``: a folder is
its path, a hub name is ``hub`` (``download=true``) or ``cached`` of that repo's snapshot.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from greenlab.backbones.weights import Pretrained, resolve_weights

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# a hub repo's files to download: config, tokenizer, PyTorch weights (not TF / Flax / ONNX)
REPO_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]
HINT = ("Falling back to a RANDOMLY INITIALISED BERT with a vocabulary fitted on the training reports.\n"
        "Give a local folder, or text_encoder.download=true when online.")  # fmt: skip


class TextEncoder(nn.Module):
    """Args: weights (see module doc), download (allow hub downloads), max_length (tokens), and for
    ``random``: vocab_size, hidden_size, num_layers, num_heads."""

    def __init__(self, weights: str | None, max_length: int, download: bool, vocab_size: int, hidden_size: int,
                 num_layers: int, num_heads: int):  # fmt: skip
        super().__init__()
        self.max_length = max_length
        hub_name = weights not in ("random", None) and not Path(str(weights)).expanduser().exists()
        asked = ("hub" if download else "cached") if hub_name else weights  # a hub name: that repo's snapshot
        repo = hub_repo(weights) if hub_name else None
        loaded, record = resolve_weights(
            asked, repo, f"text encoder {weights!r}", HINT, read=_load_pretrained
        )
        self.model, self.tokenizer = loaded or (None, None)
        self.init_record = {**record, "requested": str(weights), "used": "pretrained" if loaded else "random"}
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
        fitted = f"vocabulary of {len(self.tokenizer)} tokens ({len(words)} words + characters) fitted on {len(texts)} training reports"
        self.init_record["note"] = "; ".join(filter(None, [self.init_record["note"], fitted]))

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


def hub_repo(name: str) -> Pretrained:
    """A Hugging Face model repo's snapshot folder, in the local cache (with its weights) / from the hub."""
    from huggingface_hub import snapshot_download

    return Pretrained(name, lambda: _cached_snapshot(name),
                      lambda: Path(snapshot_download(name, allow_patterns=REPO_FILES)))  # fmt: skip


def _cached_snapshot(name: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not in the cache, or not a repo name
        return None
    return folder if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) else None


def _load_pretrained(folder: Path):
    """(model, tokenizer) from a local folder (``save_pretrained`` layout). CXR-BERT's own model class needs
    remote code; its BERT encoder loads as a plain ``BertModel``, as the official GreenRFM code does."""
    from transformers import AutoModel, AutoTokenizer, BertModel, PretrainedConfig

    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    kind = PretrainedConfig.get_config_dict(str(folder), local_files_only=True)[0].get("model_type")
    cls = BertModel if kind in ("bert", "cxr-bert") else AutoModel
    try:  # BERT-family models: drop the unused pooler (its parameters would get no gradient)
        model = cls.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
    except TypeError:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
