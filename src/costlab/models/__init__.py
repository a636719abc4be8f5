"""The models a run trains: costlab's own GPT family (``gpt``), the Hugging Face wrapper (``hf``), the
torch-free reading of a Hugging Face config (``hf_config``), and saved-model files (``saved``)."""
