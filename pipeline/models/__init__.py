"""raysft.pipeline.models: where a base model comes from (hub id, local folder, GGUF), how it loads
(NF4 or plain, with LoRA), how adapters are saved and exported, and `raysft models fetch`."""
