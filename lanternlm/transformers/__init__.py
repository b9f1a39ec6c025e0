"""transformers' front door on Lantern: change one import line and the tutorials' code runs on Lantern.

    from lanternlm.transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")   # or an HF folder, a .gguf file
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=64)
    print(tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

A thin facade with no model logic: loading is `lanternlm.LLM`, tokens come from Lantern's tokenizer and chat
template, generation from Lantern's generator (one token-choosing path), the numbers from Lantern's model.
Arguments and results have transformers' names and shapes; an argument Lantern does not support raises
UnsupportedArgumentError naming it. `model.llm` is the LLM underneath, and `explain`, `logit_lens`,
`attention` and `describe` take the facade's objects directly.
"""

from .auto import AutoModel, AutoModelForCausalLM, AutoTokenizer
from .configs import GenerationConfig, PretrainedConfig
from .encoder import LanternEncoderModel
from .encoding import BatchEncoding
from .errors import UnsupportedArgumentError
from .look import attention, describe, explain, logit_lens
from .modeling import LanternForCausalLM, LanternModel
from .pipelines import FeatureExtractionPipeline, TextGenerationPipeline, pipeline
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .tokenizer import PreTrainedTokenizerFast

__all__ = [
    "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "BaseStreamer", "BatchEncoding",
    "FeatureExtractionPipeline", "GenerationConfig", "LanternEncoderModel", "LanternForCausalLM", "LanternModel",
    "PreTrainedTokenizerFast", "PretrainedConfig", "TextGenerationPipeline", "TextIteratorStreamer",
    "TextStreamer", "UnsupportedArgumentError", "attention", "describe", "explain", "logit_lens", "pipeline",
]
