"""Format writers: GGUF (llama.cpp: text model + vision mmproj) and safetensors (transformers,
vLLM: compressed-tensors or bitsandbytes). Packing bits happens only in here."""
