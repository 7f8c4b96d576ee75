"""Image-text checkpoints (Gemma 3 and 4, Qwen3.5, Llama 4 are published as such): which transformers class loads
them, so that their language model trains on text while the vision tower stays in the model that `lora merge` writes.

AutoModelForCausalLM loads Gemma 3 and 4 with their vision tower but Qwen3.5 and Llama 4 as their language model alone
(Llama 4 with a table of the vision weights it skipped); AutoModelForImageTextToText loads every one of them whole.
"""

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_image_text(config) -> bool:
    return getattr(config, "vision_config", None) is not None and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def auto_class(config):
    """The Auto class that loads this config's checkpoint whole: image-text models with their vision tower."""
    return AutoModelForImageTextToText if is_image_text(config) else AutoModelForCausalLM
