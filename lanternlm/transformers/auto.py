"""The `Auto*` classes: `from_pretrained` opens a model or tokenizer through Lantern and returns the facade
object. Names, folders and options are handled in loading.py."""

from __future__ import annotations

from .encoder import LanternEncoderModel
from .loading import open_llm, open_tokenizer
from .modeling import LanternForCausalLM, LanternModel
from .tokenizer import PreTrainedTokenizerFast


class AutoTokenizer:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, **kwargs) -> PreTrainedTokenizerFast:
        """The tokenizer of a catalogue name, HF folder or .gguf file (or folder + gguf_file=); no weights are
        read. padding_side= overrides the tokenizer_config.json setting."""
        tokenizer, settings = open_tokenizer("AutoTokenizer.from_pretrained", pretrained_model_name_or_path, kwargs)
        if kwargs.get("padding_side") is not None:
            settings = {**settings, "padding_side": kwargs["padding_side"]}
        return PreTrainedTokenizerFast(tokenizer, settings, str(pretrained_model_name_or_path))


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, **kwargs) -> LanternForCausalLM:
        """A decoder (Llama, Mistral, Qwen2/3, Phi-3, Gemma 3) from a catalogue name, HF folder or .gguf file."""
        return LanternForCausalLM(open_llm("AutoModelForCausalLM.from_pretrained", pretrained_model_name_or_path,
                                           kwargs))


class AutoModel:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, **kwargs) -> LanternEncoderModel | LanternModel:
        """An encoder (BERT family) as transformers' BertModel, or a decoder's base model (`model.model` of
        AutoModelForCausalLM: hidden states, no lm_head), as transformers' AutoModel gives them."""
        llm = open_llm("AutoModel.from_pretrained", pretrained_model_name_or_path, kwargs)
        if llm.kind == "embed":
            return LanternEncoderModel(llm)
        return LanternForCausalLM(llm).model
