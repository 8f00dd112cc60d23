"""Hugging Face tokenizers: `HFTokenizer`, a directory as `save_pretrained` writes it
(tokenizer.json and tokenizer_config.json) behind data.tokenizer.Tokenizer's interface through the
`tokenizers` library; and `load_tokenizer`, which reads either kind a run may name.

Texts are encoded without the tokenizer's own special tokens (the packer adds bos and eos), so
`encode(text)` equals `AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)`. A
tokenizer without a bos token (Qwen's) starts documents with its eos token; without a pad token,
padding uses eos (padded positions carry no loss).
"""

import hashlib
import json
import os
import pathlib

import tokenizers

from data.tokenizer import SHIPPED_MODEL, Tokenizer, TokenizerLoadError, TokenizerNotFoundError


def load_tokenizer(spec: str | os.PathLike = "") -> "Tokenizer | HFTokenizer":
    """config.data.tokenizer: "" (the shipped sentencepiece model), a sentencepiece .model file,
    or a Hugging Face tokenizer directory."""
    if not spec:
        return Tokenizer(SHIPPED_MODEL)
    return HFTokenizer(spec) if pathlib.Path(spec).is_dir() else Tokenizer(spec)


class HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json for the special tokens) of `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.path = pathlib.Path(directory)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerNotFoundError(
                f"{file} not found: data.tokenizer takes a Hugging Face tokenizer directory "
                "(tokenizer.json, as save_pretrained writes it) or a sentencepiece .model file."
            )
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001  (tokenizers raises a bare Exception)
            raise TokenizerLoadError(f"{file} is not a valid tokenizer.json ({err}).") from None
        config_file = self.path / "tokenizer_config.json"
        try:
            self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except ValueError as err:
            raise TokenizerLoadError(f"{config_file} is not valid JSON ({err}).") from None
        eos = self._special_id("eos_token")
        if eos is None:
            raise TokenizerLoadError(
                f"{config_file} names no eos_token in the vocabulary: documents need an end."
            )
        self.eos_id = eos
        bos, pad = self._special_id("bos_token"), self._special_id("pad_token")
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad
        digest = hashlib.sha256(file.read_bytes())
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        self.fingerprint = digest.hexdigest()  # Keys caches of tokenized data.
        self.chat_template: str | None = self.config.get("chat_template")

    def _special_id(self, name: str) -> int | None:
        token = self.config.get(name)
        if isinstance(token, dict):  # {"content": "<s>", ...} in older files
            token = token.get("content")
        return self._tk.token_to_id(token) if token else None

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def piece(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """`text` with the tokenizer's own special tokens (e.g. Llama 3's <|begin_of_text|>), as
        the released model saw its inputs."""
        return self._tk.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts using all cores."""
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)
