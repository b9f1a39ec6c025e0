"""`AutoTokenizer.from_pretrained(...)` returns this: Lantern's tokenizer and chat template behind transformers'
tokenizer methods (`__call__`, `encode`, `decode`, `batch_decode`, `apply_chat_template`, special tokens).

Encoding, decoding and template rendering are Lantern's own (text/tokenizer.py, text/chat.py), which the
tests hold equal to transformers'; this file only shapes arguments and results. Differences: decoding never
applies `clean_up_tokenization_spaces` (transformers ignores it for byte-level BPE too; the argument is
accepted), and assistant-token masks are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import LanternError
from ..text.chat import ChatTemplate, no_template_error
from ..text.tokenizer import Tokenizer
from .encoding import BatchEncoding, as_output, pad_rows
from .errors import refuse_set

# Appended to the message being continued, so its end can be found in the rendered prompt. The trailing space
# shows whether the template trimmed the content (then the text before the marker is trimmed too).
CONTINUE_MARKER = "LANTERN_CONTINUE_HERE "


def _render_continuing(template: ChatTemplate, messages: list[dict], **render) -> str:
    """The prompt ending inside the final message (an assistant prefill), not after its end-of-turn."""
    if not messages or not isinstance(messages[-1].get("content"), str):
        raise LanternError("continue_final_message needs a final message with text content")
    marked = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE_MARKER}]
    text = template.render(marked, add_generation_prompt=False, **render)
    at = text.rfind(CONTINUE_MARKER.strip())
    if at < 0:
        raise LanternError("continue_final_message: the chat template drops the final message's text")
    kept_spacing = text[at:at + len(CONTINUE_MARKER)] == CONTINUE_MARKER
    return text[:at] if kept_spacing else text[:at].rstrip()


def _id_list(ids) -> list[int]:
    """Token ids as a flat list from an int, a list or a 0-d / 1-d tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise LanternError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}; "
                               "use batch_decode")
        return ids.reshape(-1).tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class PreTrainedTokenizerFast:
    """A model's tokenizer with transformers' interface. `lantern` holds Lantern's own Tokenizer."""

    def __init__(self, tokenizer: Tokenizer, settings: dict, name_or_path: str):
        self.lantern = tokenizer
        self.name_or_path = name_or_path
        self.padding_side = settings.get("padding_side", "right")
        self.truncation_side = settings.get("truncation_side", "right")
        self.model_max_length = settings.get("model_max_length", int(1e30))
        self.chat_template = tokenizer.chat_template
        self._pad_id = tokenizer.pad_token_id
        self._templates: dict[str, ChatTemplate] = {}

    # ------------------------------------------------------------------ special tokens

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.lantern.tokens([token_id])[0]

    bos_token = property(lambda self: self.lantern.bos_token)
    bos_token_id = property(lambda self: self.lantern.bos_token_id)
    eos_token = property(lambda self: self.lantern.eos_token)
    eos_token_id = property(lambda self: self.lantern.eos_token_id)
    unk_token_id = property(lambda self: self.lantern.unk_token_id)
    unk_token = property(lambda self: self._piece(self.lantern.unk_token_id))

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @pad_token_id.setter
    def pad_token_id(self, value: int | None) -> None:
        self._pad_id = value

    @property
    def pad_token(self) -> str | None:
        return self._piece(self._pad_id)

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:  # tutorials write `tokenizer.pad_token = tokenizer.eos_token`
        token_id = None if token is None else self.lantern.token_to_id(token)
        if token is not None and token_id is None:
            raise LanternError(f"pad_token {token!r} is not in the vocabulary")
        self._pad_id = token_id

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.lantern.special_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return self.lantern.tokens(self.all_special_ids)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' vocab_size; len() counts them too)."""
        return self.lantern.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.lantern.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self.lantern.backend.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"PreTrainedTokenizerFast(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"padding_side={self.padding_side!r}, special_tokens={{'bos_token': {self.bos_token!r}, "
                f"'eos_token': {self.eos_token!r}, 'pad_token': {self.pad_token!r}}})")

    # ------------------------------------------------------------------ encoding

    def _rows(self, texts: list[str], add_special_tokens: bool, truncation, max_length: int | None) -> list[list[int]]:
        rows = [self.lantern.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation not in (False, None, "do_not_truncate"):
            if max_length is None:
                raise LanternError("truncation needs max_length")
            keep = (lambda r: r[:max_length]) if self.truncation_side == "right" else (lambda r: r[-max_length:])
            rows = [keep(r) for r in rows]
        return rows

    def __call__(self, text: str | list[str], text_pair=None, *, add_special_tokens: bool = True, padding=False,
                 truncation=False, max_length: int | None = None, return_tensors=None,
                 return_attention_mask: bool | None = None, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None, return_token_type_ids=None) -> BatchEncoding:
        """input_ids and attention_mask for a text (flat lists) or a list of texts (one row each)."""
        refuse_set("tokenizer", "text_pair", text_pair, why="pairs of texts are not supported")
        refuse_set("tokenizer", "return_token_type_ids", return_token_type_ids, (None, False))
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        rows = self._rows(texts, add_special_tokens, truncation, max_length)
        rows, masks = pad_rows(rows, self._pad_id, padding_side or self.padding_side, padding, max_length,
                               pad_to_multiple_of)
        return as_output(rows, masks, batched, return_tensors, return_attention_mask is not False)

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors=None, truncation=False,
               max_length: int | None = None):
        """Token ids of one text: a list, or a (1, T) tensor with return_tensors="pt"."""
        ids = self._rows([text], add_special_tokens, truncation, max_length)[0]
        return as_output([ids], [], True, return_tensors, False)["input_ids"] if return_tensors else ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.lantern.tokens(self.lantern.encode(text, add_special_tokens=add_special_tokens))

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        single = isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0)
        ids = _id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.lantern.special_ids]
        pieces = self.lantern.tokens(ids)
        return pieces[0] if single else pieces

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self.lantern.token_to_id(tokens)
        return [self.lantern.token_to_id(t) for t in tokens]

    # ------------------------------------------------------------------ decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None) -> str:
        return self.lantern.decode(_id_list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces=None) -> list[str]:
        return [self.decode(seq, skip_special_tokens) for seq in sequences]

    # ------------------------------------------------------------------ chat templates

    def _template(self, source: str | None) -> ChatTemplate:
        source = source or self.chat_template
        if source is None:
            raise no_template_error(self.name_or_path)
        if source not in self._templates:  # compile once per template text
            self._templates[source] = ChatTemplate(source, bos_token=self.bos_token, eos_token=self.eos_token,
                                                   origin=f"{self.name_or_path} chat template")
        return self._templates[source]

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, padding=False, truncation: bool = False,
                            max_length: int | None = None, return_tensors=None, return_dict: bool = True,
                            return_assistant_tokens_mask: bool = False, tokenizer_kwargs: dict | None = None,
                            **template_kwargs):
        """The rendered prompt (tokenize=False) or its ids: a BatchEncoding (return_dict=True, transformers 5's
        default) or the ids alone. A list of conversations gives one row each. Extra keywords reach the
        template as variables (e.g. enable_thinking=False)."""
        where = "apply_chat_template"
        refuse_set(where, "return_assistant_tokens_mask", return_assistant_tokens_mask, (False,))
        refuse_set(where, "tokenizer_kwargs", tokenizer_kwargs, (None, {}))
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = self._template(chat_template)
        render = dict(tools=tools, documents=documents, extra_context=template_kwargs or None)
        if continue_final_message:
            if add_generation_prompt:
                raise LanternError("continue_final_message and add_generation_prompt cannot both be set")
            texts = [_render_continuing(template, list(c), **render) for c in conversations]
        else:
            texts = [template.render(list(c), add_generation_prompt=add_generation_prompt, **render)
                     for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        # The template writes any BOS itself, so no special tokens are added (as transformers does).
        rows = self._rows(texts, False, truncation, max_length)
        rows, masks = pad_rows(rows, self._pad_id, self.padding_side, padding, max_length)
        out = as_output(rows, masks, batched, return_tensors)
        return out if return_dict else out["input_ids"]
