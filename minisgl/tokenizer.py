"""Text to token ids and back: the checkpoint's own tokenizer, or a byte-level one for the tiny model."""

from pathlib import Path


class ByteTokenizer:
    "Bytes 0-255 are ids 0-255; 256 is BOS and 257 EOS. Enough to type a prompt into a random tiny model."
    bos_token_id, eos_token_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    "A transformers tokenizer behind the same two methods."

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id = self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path | None, vocab_size: int):
    "The checkpoint's tokenizer if it ships one; else bytes if the vocabulary has room; else None (ids only)."
    if model_dir is not None and any((Path(model_dir) / f).exists() for f in _TOKENIZER_FILES):
        return HFTokenizer(model_dir)
    if vocab_size >= 258:
        return ByteTokenizer()
    return None
