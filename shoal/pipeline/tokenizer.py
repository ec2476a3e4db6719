"""Tokenizers from ``tokenizer.json`` (the tokenizers package), chat templates, streaming decode."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from shoal.pipeline.errors import ModelLoadError

BYTE_SPECIALS = ("<|bos|>", "<|eos|>")


def byte_level_tokenizer() -> Tokenizer:
    """Token ``i`` is byte ``i`` for ``i < 256``; then ``<|bos|>`` (256) and ``<|eos|>`` (257)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


class TextTokenizer:
    """A model's tokenizer: encode/decode, its special ids and its chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        add_bos: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.add_bos = add_bos

    @classmethod
    def from_directory(
        cls, directory: Path, *, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()
    ) -> TextTokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(
                directory,
                "tokenizer.json is missing",
                "copy the model's tokenizer.json (the fast tokenizer file) into the directory",
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own untyped exception
            raise ModelLoadError(
                path, f"tokenizer.json is unreadable ({exc})", "re-download it"
            ) from None
        settings: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            settings = json.loads(config_path.read_text())
        template = settings.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            tokenizer,
            bos_id=bos_id,
            eos_ids=eos_ids,
            chat_template=template,
            add_bos=bool(settings.get("add_bos_token", bos_id is not None)),
        )

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else list(ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` (role/content dicts) with the model's chat template."""
        if self.chat_template is None:
            raise ModelLoadError(
                "tokenizer_config.json", "the model has no chat template", "send plain prompts"
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        eos = self.tokenizer.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        # bos_token is left out of the text: encode() adds the bos id itself
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos or ""
        )


def _raise_template_error(message: str) -> None:
    raise ModelLoadError(
        "tokenizer_config.json", f"the chat template refused: {message}", "check the messages"
    )


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        """Add one token; return the new text that is complete (may be empty)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece
