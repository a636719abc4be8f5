"""The models a run trains: costlab's own GPT family (``gpt``), the Hugging Face wrapper (``hf``), their loss
and the one evaluation function (``loss``), the torch-free reading of a Hugging Face config (``hf_config``),
and saved-model files (``saved``)."""
