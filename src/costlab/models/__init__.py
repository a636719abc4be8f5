"""The models a run trains: costlab's own GPT family (``gpt``), the Hugging Face wrapper (``hf``), their loss
and the one evaluation function (``loss``), the torch-free reading of a Hugging Face config (``hf_config``),
saved-model files (``saved``) and models built on the meta device for their shapes (``meta``)."""
